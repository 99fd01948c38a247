"""Import a checkpoint released by the authors (apple/ml-clara: CLaRa-7B-Base / -Instruct / -E2E, one
``compression-N`` folder) into our checkpoint format, once; it then compresses, answers, evaluates, registers and
serves like any model we train.

Their folder, as their ``save_pretrained`` writes it:

- ``config.json``: ``compr_rate``, ``doc_max_length`` (memory tokens n = doc_max_length // compr_rate),
  ``lora_r`` (alpha = 2r, dropout 0.1, every linear layer), ``training_stage`` (``stage1`` Base, ``stage1_2``
  Instruct, ``stage2`` E2E), ``decoder_model_name`` (the base; their own path, so ``--base`` usually names it),
  ``different_mem_tokens``, ``compr_model_name`` (null: the base with ``encoder_adapter`` is the compressor).
- ``adapters.pth``: ``torch.save`` of ``{adapter name: {PEFT key without prefix or adapter name: tensor}}`` with
  ``encoder_adapter`` and ``decoder_adapter``, and ``query_reasoner_adapter`` after E2E. An adapter's dict may
  also hold full ``model.embed_tokens.weight`` / ``lm_head.weight`` copies (PEFT saves resized embeddings):
  only ``lora_`` tensors are taken from it.
- ``decoder_first_last_layers.pth``: ``model.embed_tokens.weight`` and ``lm_head.weight`` after the tokenizer
  grew ``<MEM0>…<MEM{n-1}>``, ``<AE>``, ``<ENC>``, ``<SEP>`` (ids from the base vocabulary size on).

Both ``.pth`` files are read with ``torch.load(weights_only=True)``: anything but plain tensors in plain dicts
is refused. Every adapter must be complete (the authors' own loader silently drops the trained decoder adapter
of an Instruct checkpoint); the embedding rows below the base vocabulary must equal the base's (otherwise these
weights belong to another base). Our checkpoint keeps the rows of ``<MEM…>``, ``<ENC>`` and ``<SEP>`` (``<AE>``
is never an input here) and records ``layout = "ml-clara"``, so compression, query encoding and the stage-1
prompts follow the authors' input layout. The generator's output rows of the special tokens are not kept: our
decoder never emits special tokens.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from clara.config import ALL_LINEAR, LoraSettings, ModelConfig
from clara.model.clara_model import ClaraModel
from clara.model.special import ENC_TOKEN, SEP_TOKEN
from clara.model.memory import mem_token

ADAPTER_NAMES = {"encoder_adapter": "compressor", "decoder_adapter": "generator",
                 "query_reasoner_adapter": "query_reasoner"}
REQUIRED = {"stage1": ("encoder_adapter", "decoder_adapter"), "stage1_2": ("encoder_adapter", "decoder_adapter"),
            "stage2": ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter")}
KNOWN_BASES = {"Mistral-7B-Instruct-v0.2": "mistralai/Mistral-7B-Instruct-v0.2"}
PEFT_PREFIX = "base_model.model."


class ReleaseError(ValueError):
    """A release folder that cannot be imported: the message says which file and what is wrong."""


def read_tensors(path: Path) -> dict[str, Any]:
    """A ``.pth`` file of plain tensors (possibly in nested dicts), loaded without running any pickled code."""
    if not path.is_file():
        raise ReleaseError(f"{path.parent}: missing {path.name}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ReleaseError(f"{path}: refused: it holds more than plain tensors, and loading it would run "
                           f"pickled code ({str(exc).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError) as exc:  # a truncated or corrupt archive
        raise ReleaseError(f"{path}: unreadable (truncated or not a torch file): "
                           f"{str(exc).splitlines()[0][:200]}") from None

    def check(obj: Any, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise ReleaseError(f"{path}: {where} has a non-string key {k!r}")
                check(v, f"{where}[{k!r}]")
        elif not isinstance(obj, torch.Tensor):
            raise ReleaseError(f"{path}: {where} is a {type(obj).__name__}, not a tensor")

    if not isinstance(data, dict):
        raise ReleaseError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    check(data, "the file")
    return data


def release_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ReleaseError(f"{folder}: missing config.json (is this one compression-N folder of a release?)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ReleaseError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for key in ("compr_rate", "doc_max_length", "lora_r"):
        if key not in cfg:
            raise ReleaseError(f"{path}: no {key!r}")
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ReleaseError(f"{path}: {key!r} must be a positive integer, got {cfg[key]!r}")
    if cfg.get("compr_model_name"):
        raise ReleaseError(f"{path}: compr_model_name={cfg['compr_model_name']!r}: a separate compressor model is "
                           "not supported (only the base-with-encoder-adapter compressor the releases use)")
    if cfg.get("different_mem_tokens") is False:
        raise ReleaseError(f"{path}: different_mem_tokens=false (one shared <MEM> token) is not supported")
    return cfg


def base_of(cfg: dict[str, Any], base: str | None) -> str:
    """The base model: ``base`` if given, else the release's ``decoder_model_name`` (their local path is mapped to
    the hub id of a base we know by its folder name)."""
    if base:
        return base
    name = str(cfg.get("decoder_model_name") or "")
    return KNOWN_BASES.get(Path(name).name, name)


def _load_adapter(model: ClaraModel, ours: str, theirs: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Their adapter ``theirs`` into our ``ours``, refused with the reason unless every LoRA tensor fits exactly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model.peft, adapter_name=ours)
    given = {PEFT_PREFIX + k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items() if "lora_" in k}
    lacking = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if lacking or extra:
        raise ReleaseError(
            f"{source}: {theirs} does not fit {model.cfg.base!r} with LoRA r={model.cfg.lora.r} on every "
            f"linear layer: {len(lacking)} of {len(expected)} LoRA tensors missing"
            f"{' (e.g. ' + lacking[0].removeprefix(PEFT_PREFIX) + ')' if lacking else ''}, {len(extra)} unknown"
            f"{' (e.g. ' + extra[0].removeprefix(PEFT_PREFIX) + ')' if extra else ''}")
    for k, v in given.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ReleaseError(f"{source}: {theirs} {k.removeprefix(PEFT_PREFIX)} is "
                               f"{tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    set_peft_model_state_dict(model.peft, {k: v.to(expected[k].dtype) for k, v in given.items()}, adapter_name=ours)


def import_ml_clara(folder: str | Path, out: str | Path, *, base: str | None = None, device: str | None = None,
                    dtype: str | None = None) -> Path:
    """Convert one release folder to our checkpoint at ``out``; returns ``out``."""
    from clara.atomic import check_replaceable
    from clara.model.checkpoint import CONFIG_FILE, save_checkpoint

    check_replaceable(out, CONFIG_FILE)  # these two before the weights and base model load (minutes at 7B)
    ModelConfig(**({"device": device} if device else {}), **({"dtype": dtype} if dtype else {}))
    folder = Path(folder)
    cfg = release_config(folder)
    stage = cfg.get("training_stage", "stage1")
    if stage not in REQUIRED:
        raise ReleaseError(f"{folder / 'config.json'}: unknown training_stage {stage!r}")
    adapters = read_tensors(folder / "adapters.pth")
    layers = read_tensors(folder / "decoder_first_last_layers.pth")
    missing = [a for a in REQUIRED[stage] if a not in adapters]
    if missing:
        raise ReleaseError(f"{folder / 'adapters.pth'}: a {stage} checkpoint needs {', '.join(REQUIRED[stage])}; "
                           f"missing {', '.join(missing)} (found {', '.join(sorted(adapters)) or 'none'})")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key not in layers:
            raise ReleaseError(f"{folder / 'decoder_first_last_layers.pth'}: no {key!r}")

    rate, doc_max, r = int(cfg["compr_rate"]), int(cfg["doc_max_length"]), int(cfg["lora_r"])
    model_cfg = ModelConfig(base=base_of(cfg, base), compression_rate=rate, doc_max_len=doc_max,
                            query_max_len=doc_max, length_mode="fixed", layout="ml-clara",
                            lora=LoraSettings(r=r, alpha=2 * r, dropout=0.1, target_modules=ALL_LINEAR),
                            **({"device": device} if device else {}), **({"dtype": dtype} if dtype else {}))
    model = ClaraModel.build(model_cfg)
    n = model_cfg.n_mem_max

    # The rows: the base vocabulary unchanged, then <MEM0..n-1>, <AE>, <ENC>, <SEP> in that order.
    emb = layers["model.embed_tokens.weight"]
    base_emb = model.input_embeddings.weight.detach().cpu()
    vocab = base_emb.shape[0]
    if tuple(emb.shape) != (vocab + n + 3, base_emb.shape[1]):
        raise ReleaseError(f"{folder / 'decoder_first_last_layers.pth'}: embed_tokens is {tuple(emb.shape)}; base "
                           f"{model_cfg.base!r} with {n} memory tokens needs ({vocab + n + 3}, {base_emb.shape[1]})")
    if not torch.equal(emb[:vocab].to(base_emb.dtype), base_emb):
        worst = (emb[:vocab].float() - base_emb.float()).abs().max().item()
        raise ReleaseError(f"{folder / 'decoder_first_last_layers.pth'}: the rows of the base vocabulary differ from "
                           f"{model_cfg.base!r}'s embeddings (max difference {worst:.3g}): these weights were trained "
                           "on another base; pass --base")
    row_of = {mem_token(i): vocab + i for i in range(n)} | {ENC_TOKEN: vocab + n + 1, SEP_TOKEN: vocab + n + 2}
    with torch.no_grad():
        model.special.copy_(torch.stack([emb[row_of[t]].float() for t in model.special_tokens]))

    notes: dict[str, Any] = {"imported_from": "apple/ml-clara", "source": str(folder.resolve()),
                             "training_stage": stage, "generation_top_k": cfg.get("generation_top_k")}
    for theirs, ours in ADAPTER_NAMES.items():
        if theirs in adapters:
            _load_adapter(model, ours, theirs, adapters[theirs], folder / "adapters.pth")
    if "query_reasoner_adapter" in adapters:
        notes["query_reasoner"] = "imported"
    else:
        model.copy_adapter("compressor", "query_reasoner")  # the authors' initialisation of E2E
        notes["query_reasoner"] = "a copy of the compressor (this checkpoint has none: not trained end to end)"
    return save_checkpoint(model, out, extra=notes)
