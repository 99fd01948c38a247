"""One frozen base causal LM with three LoRA adapters: compressor, generator and query reasoner.

- ``compress``: ``<ENC>`` + document tokens + ``<MEM0>…<MEM{n-1}>`` through the compressor adapter; the last
  layer's hidden states at the memory positions are the compressed document, [n, hidden].
- ``encode_queries``: the same with the question and the query-reasoner adapter.
- ``generate``: a chat prompt whose placeholder runs are overwritten with compressed vectors, decoded greedily by
  the generator adapter. ``generate_from_text``: the same base with every adapter off (the raw-text baseline).

The special tokens never go through the base's embedding matrix: their rows live in ``self.special`` (a
separate, trainable parameter) and ``embed`` splices them in. This keeps the base frozen bit for bit, needs no
``resize_token_embeddings`` (so checkpoints carry only these rows), and lets SCP train exactly those rows.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clara.config import ModelConfig
from clara.model.prompts import Prompter
from clara.model.base import cpu_has_native_bf16, load_base, resolve_device, resolve_dtype
from clara.model.decoding import Timing, greedy_decode
from clara.model.inference import MergedCopies, PrefixCache, copy_dtypes
from clara.model.memory import Encoded, clara_row, gather, initial_special_rows, ml_clara_rows, pad_rows
from clara.model.special import ENC_TOKEN, SEP_TOKEN, register, special_tokens

ADAPTERS = ("compressor", "generator", "query_reasoner")


class ClaraModel(nn.Module):
    """The CLaRa model. Build with ``ClaraModel.build(cfg)`` or load with ``clara.model.load_checkpoint``."""

    def __init__(self, cfg: ModelConfig, base: nn.Module, tokenizer, special: torch.Tensor | None = None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens(cfg)
        self.first_special_id = first = register(tokenizer, self.special_tokens)
        self.mem_ids = list(range(first, first + cfg.n_mem_max))
        self.enc_id, self.sep_id = first + cfg.n_mem_max, first + cfg.n_mem_max + 1
        self.prompter = Prompter(tokenizer, cfg.layout, self.special_tokens[: cfg.n_mem_max], SEP_TOKEN)

        def lora() -> LoraConfig:
            return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")

        # PEFT keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype), as mixed precision wants.
        # LoRA A matrices are drawn at random: seed them so a model is a pure function of its config.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.peft = get_peft_model(base, lora(), adapter_name=ADAPTERS[0])
            for name in ADAPTERS[1:]:
                self.peft.add_adapter(name, lora())
        self._adapter_params = {
            name: [p for n, p in self.peft.named_parameters() if "lora_" in n and f".{name}." in n]
            for name in ADAPTERS
        }
        self._trainable: set[str] = set()
        self._train_special = False

        emb = self.input_embeddings.weight
        if special is None:
            special = initial_special_rows(emb.detach().float().cpu(), len(self.special_tokens), cfg.memory_init,
                                           cfg.seed)
        self.special = nn.Parameter(special.float().to(emb.device))
        self._apply_trainable()
        self.eval()  # built for inference, as Hugging Face loads a model (``_inference``); trainers switch and back
        # Autocast only makes sense over fp32 weights; on CPUs without native bf16 it would be slower, not faster.
        native = emb.device.type == "cuda" or (emb.device.type == "cpu" and cpu_has_native_bf16())
        self.uses_amp = emb.dtype == torch.float32 and (cfg.amp == "bf16" or (cfg.amp == "auto" and native))
        # not nn.Module attributes: serving snapshots, out of state_dict, checkpoints and parameter lists
        object.__setattr__(self, "_merged", MergedCopies())
        object.__setattr__(self, "_prefix_cache", None)
        self._in_use: str | None = ADAPTERS[0]  # the adapter the enclosing ``adapter()`` made active

    # ---------------------------------------------------------------------------------------------- build

    @classmethod
    def build(cls, cfg: ModelConfig, special: torch.Tensor | None = None, base_dir=None) -> "ClaraModel":
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        base, tok = load_base(cfg.base, device=device, dtype=dtype, seed=cfg.seed, tiny_hidden=cfg.tiny_hidden,
                              tiny_layers=cfg.tiny_layers, local_dir=base_dir)
        return cls(cfg, base, tok, special)

    @property
    def base_model(self) -> nn.Module:
        """The causal LM with the LoRA layers injected (the active adapter decides what they add)."""
        return self.peft.get_base_model()

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.peft.get_base_model().get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.special.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings.weight.shape[1]

    # ------------------------------------------------------------------------------------------- adapters

    def set_trainable(self, adapters: Sequence[str] = (), special: bool = False) -> None:
        """Which adapters (and whether the special-token rows) receive gradients; the base never does."""
        unknown = set(adapters) - set(ADAPTERS)
        if unknown:
            raise ValueError(f"unknown adapter(s) {sorted(unknown)}; known: {ADAPTERS}")
        self._trainable = set(adapters)
        self._train_special = special
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        # peft's set_adapter flips requires_grad to "active adapter only"; our policy is per stage, so re-apply it.
        for name, params in self._adapter_params.items():
            for p in params:
                p.requires_grad_(name in self._trainable)
        self.special.requires_grad_(self._train_special)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for name in ADAPTERS if name in self._trainable for p in self._adapter_params[name]]
        return params + ([self.special] if self._train_special else [])

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self._adapter_params[name])

    @contextlib.contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run the enclosed calls with adapter ``name`` active (``None``: the bare base model)."""
        if name is not None and name not in ADAPTERS:
            raise ValueError(f"unknown adapter {name!r}; known: {ADAPTERS}")
        outer, self._in_use = self._in_use, name
        # Where a merged copy runs it (no gradients), peft's own switch is not needed, and it walks every module
        # twice per call (~45 ms on SmolLM2, as long as the query reasoner's whole forward).
        switch = self._merged.get(name) is None
        try:
            if not switch:
                yield
            elif name is None:
                with self.peft.disable_adapter():
                    yield
            else:
                previous = self.peft.active_adapter
                self.peft.set_adapter(name)
                self._apply_trainable()
                try:
                    yield
                finally:
                    self.peft.set_adapter(previous)
        finally:
            self._in_use = outer
            if switch:
                # peft's switches (re-enabling included) flip requires_grad to "active adapter only", and autograd
                # then drops the gradients of every other adapter in a graph built before (e.g. a teacher pass)
                self._apply_trainable()

    @contextlib.contextmanager
    def _inference(self, name: str | None) -> Iterator[None]:
        """Adapter ``name`` active, dropout off, the training mode restored after. ``eval()`` / ``train()`` walk every
        module (~30 ms each on SmolLM2, per call), so they run only when the mode really changes (while training)."""
        was_training = self.peft.training
        if was_training:
            self.peft.eval()
        try:
            with self.adapter(name):
                yield
        finally:
            if was_training:
                self.peft.train()

    def copy_adapter(self, src: str, dst: str) -> None:
        """Overwrite adapter ``dst`` with the weights of ``src`` (E2E starts the query reasoner this way)."""
        with torch.no_grad():
            for ps, pd in zip(self._adapter_params[src], self._adapter_params[dst], strict=True):
                pd.copy_(ps)

    def adapter_is_zero(self, name: str) -> bool:
        """True when adapter ``name`` adds nothing to the base (every LoRA B is zero: never trained)."""
        return all(not bool(p.detach().any()) for n, p in self.peft.named_parameters()
                   if "lora_B" in n and f".{name}." in n)

    def ensure_query_reasoner(self) -> bool:
        """Before E2E the query reasoner is untrained (zero); give it the compressor's weights, the paper's
        initialisation. Returns True if it did (the query reasoner is then a compressor copy)."""
        if not self.adapter_is_zero("query_reasoner"):
            return False
        self.copy_adapter("compressor", "query_reasoner")
        return True

    def reset_adapter(self, name: str) -> None:
        """Re-initialise adapter ``name`` as a fresh LoRA (B = 0, so it starts as the identity)."""
        for module in self.peft.modules():
            if hasattr(module, "reset_lora_parameters") and name in getattr(module, "lora_A", {}):
                module.reset_lora_parameters(name, True)

    # ------------------------------------------------------------------------------------------ embedding

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids``, with the special tokens' rows taken from ``self.special``."""
        emb = self.input_embeddings
        is_special = ids >= self.first_special_id
        base = emb(torch.where(is_special, torch.zeros_like(ids), ids).clamp(max=emb.num_embeddings - 1))
        if not bool(is_special.any()):
            return base
        rows = self.special.to(base.dtype)[(ids - self.first_special_id).clamp(min=0, max=len(self.special) - 1)]
        return torch.where(is_special.unsqueeze(-1), rows, base)

    def amp(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around a forward when ``cfg.amp`` asks for it (see ``ModelConfig.amp``), else nothing.
        Gradients still land in the fp32 adapter weights; losses are computed in fp32."""
        if not self.uses_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _decode_hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (after the final norm) without computing vocabulary logits."""
        copy = self._merged.get(self._in_use)
        lm = copy or self.base_model
        with contextlib.nullcontext() if copy is not None else self.amp():  # a copy runs in its own dtype
            out = lm.get_decoder()(inputs_embeds=embeds.to(lm.dtype), attention_mask=mask, use_cache=False)
        # Under autocast the states may come out bf16; memory vectors are stored and compared in the weights' dtype.
        return out.last_hidden_state.to(self.dtype)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.amp():
            logits = self.base_model.get_output_embeddings()(hidden)
        logits = logits.float()
        cap = getattr(self.base_model.config, "final_logit_softcapping", None)
        if cap:  # Gemma-2 style models squash logits; keep them equal to the model's own forward.
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------------------------------- compress

    def tokenize_texts(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]

    def encode_texts(self, texts: Sequence[str], *, max_len: int, query: bool = False) -> Encoded:
        """Encode a batch under the currently active adapter, with gradients if enabled by the caller.

        Rows are right-padded: in a causal model padding after the memory tokens cannot change them.
        Queries always get ``n_mem_max`` slots so that they cover every slot a document can use.
        """
        if self.cfg.layout == "ml-clara":
            rows, text_spans = ml_clara_rows(self.tokenizer, texts, max_len, ENC_TOKEN, self.mem_ids)
            text_pos = [list(range(a, b)) for a, b in text_spans]
            mem_pos = [list(range(len(r) - self.cfg.n_mem_max, len(r))) for r in rows]
        else:
            built = [clara_row(t, self.cfg.n_mem_max if query else self.cfg.n_mem_for(len(t)), self.cfg.memory_slots,
                               self.enc_id, self.mem_ids) for t in self.tokenize_texts(texts, max_len)]
            rows, text_pos, mem_pos = (list(x) for x in zip(*built))
        ids, mask, _ = pad_rows(rows, self.tokenizer.pad_token_id, left=False, device=self.device)
        hidden = self._decode_hidden(self.embed(ids), mask)
        return gather(hidden, text_pos, mem_pos, self.cfg.n_mem_max, self._readout, self.cfg.memory_slots == "pooled")

    def _readout(self, states: torch.Tensor) -> torch.Tensor:
        """Memory vectors from the compressor's states (``ModelConfig.memory_readout``)."""
        if self.cfg.memory_readout == "states":
            return states
        probs = torch.softmax(self._logits(states) / self.cfg.readout_temperature, dim=-1)
        weight = self.input_embeddings.weight
        return (probs.to(weight.dtype) @ weight).to(states.dtype)

    @torch.no_grad()
    def compress(self, docs: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """Compress documents with the compressor adapter: one [n_i, hidden] tensor per document, in order."""
        return self._encode_all(docs, batch_size, adapter="compressor", query=False)

    @torch.no_grad()
    def encode_queries(self, questions: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """Encode questions with the query-reasoner adapter into the documents' memory space: [n_max, hidden]."""
        return self._encode_all(questions, batch_size, adapter="query_reasoner", query=True)

    def _encode_all(self, texts: Sequence[str], batch_size: int, adapter: str, query: bool) -> list[torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        texts = list(texts)
        if not texts:
            return []
        max_len = self.cfg.query_max_len if query else self.cfg.doc_max_len
        # Length-sorted batches waste less compute on padding; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        with self._inference(adapter):
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                enc = self.encode_texts([texts[i] for i in chunk], max_len=max_len, query=query)
                for i, m in zip(chunk, enc.unpad()):
                    out[i] = m
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------- prompts

    def embed_prompts(self, rows: list[list[int]], memories: list[list[torch.Tensor]], left_pad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Embed token rows (padded), overwriting each placeholder run with its document's memory vectors.

        Returns (embeds [B, L, H], attention mask [B, L], the pad offset of each row).
        """
        ids, mask, offsets = pad_rows(rows, self.tokenizer.pad_token_id, left=left_pad, device=self.device)
        embeds = self.embed(ids)
        slots = (ids >= self.mem_ids[0]) & (ids <= self.mem_ids[-1]) & mask.bool()
        vectors = [m for mems in memories for m in mems]
        if vectors:
            flat = torch.cat(vectors, 0).to(embeds.dtype)
            if flat.shape[0] != int(slots.sum()):
                raise ValueError(f"prompt has {int(slots.sum())} memory slots but {flat.shape[0]} vectors were given")
            # masked_scatter fills slots in row-major order: row by row, document after document.
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), flat)
        elif bool(slots.any()):
            raise ValueError("prompt has memory placeholders but no memory vectors were given")
        return embeds, mask, offsets

    # ------------------------------------------------------------------------------------------ training

    def response_loss(self, prompts_ids: list[list[int]], targets: list[list[int]],
                      memories: list[list[torch.Tensor]], fed: list[list[int]] | None = None,
                      reduction: str = "mean") -> torch.Tensor:
        """Mean cross-entropy over response tokens only (prompt and padding are not scored); ``reduction="none"``:
        each response token's, row after row.

        Uses the active adapter; gradients flow into the memory vectors and through them into the compressor.
        ``fed``: the response tokens given as input (teacher forcing), when they differ from the labels
        ``targets`` (target dropout); same lengths.
        """
        if fed is not None and [len(f) for f in fed] != [len(t) for t in targets]:
            raise ValueError("fed responses must have the targets' lengths")
        rows = [p + t for p, t in zip(prompts_ids, fed if fed is not None else targets)]
        embeds, mask, _ = self.embed_prompts(rows, memories, left_pad=False)
        hidden = self._decode_hidden(embeds, mask)
        # Only positions that predict a response token go through the (large) vocabulary projection.
        b_idx = [b for b, t in enumerate(targets) for _ in t]
        t_idx = [len(p) + j - 1 for p, t in zip(prompts_ids, targets) for j in range(len(t))]
        labels = [tok for t in targets for tok in t]
        if not labels:
            raise ValueError("no response tokens to score")
        h = hidden[torch.tensor(b_idx, device=self.device), torch.tensor(t_idx, device=self.device)]
        logits = self._logits(h)
        return F.cross_entropy(logits, torch.tensor(labels, device=self.device), reduction=reduction)

    # ------------------------------------------------------------------------------------------ generate

    def merge_adapters(self, names: Sequence[str | None] = ("generator", "query_reasoner")) -> None:
        """Run each named adapter (``None``: the bare base, the raw-text baseline) from a plain copy of the base with
        its LoRA merged in, in a fixed dtype and without autocast (``clara.model.inference.copy_dtypes``):
        base-model speed for one more copy of the base weights each (``clara.model.inference.MergedCopies``). For
        serving: the corpus is compressed offline, so a served question needs only the query reasoner's forward and
        the generator's decoding. Used only without gradients; a snapshot: ``unmerge_adapters`` before training
        again."""
        unknown = [n for n in names if n is not None and n not in ADAPTERS]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; known: {ADAPTERS}")
        self._merged.merge(self.peft, names, lambda n: copy_dtypes(n, self.uses_amp, self.dtype, self.device.type))
        self._forget_prefixes()

    def unmerge_adapters(self) -> None:
        self._merged.clear()
        self._forget_prefixes()

    @property
    def merged_adapters(self) -> list[str | None]:
        return self._merged.names()

    def _forget_prefixes(self) -> None:
        if self._prefix_cache is not None:
            self._prefix_cache.clear()

    def cache_prefix(self, on: bool = True) -> None:
        """Keep the key/value cache of the fixed start every prompt of a kind has (``clara.model.inference.
        PrefixCache``), so a question's prefill covers only its own documents and question. CLaRa and the raw-text
        baseline share the QA system prompt, so both gain it. A snapshot like ``merge_adapters``: for serving and
        benchmarks, not while the weights change (``cache_prefix(False)`` before training again)."""
        if not on:
            object.__setattr__(self, "_prefix_cache", None)
            return
        object.__setattr__(self, "_prefix_cache", PrefixCache(self.prompter.fixed_prefixes()))

    def greedy_decode(self, rows: list[list[int]], memories: list[list[torch.Tensor]], max_new_tokens: int,
                      eos_token_id: int | Sequence[int] | None = None, timing: Timing | None = None) -> list[list[int]]:
        """Greedy decoding of prompt rows (memory vectors spliced in) under the active adapter (its merged copy
        when ``merge_adapters`` made one; the prefix cache keeps a prefix per adapter)."""
        eos = eos_token_id if eos_token_id is not None else self.tokenizer.eos_token_id
        # The special tokens are inputs only; the model must never emit them.
        banned = (self.first_special_id, self.first_special_id + len(self.special_tokens))
        copy = self._merged.get(self._in_use)
        lm = copy or self.base_model
        prefill = self._merged.prefill(self._in_use)  # runs the prompt where it is faster than ``lm``
        first = prefill or lm
        amp = contextlib.nullcontext if copy is not None else self.amp  # a copy runs in its own dtype

        def embed(ids: torch.Tensor, dtype: torch.dtype = lm.dtype) -> torch.Tensor:
            return self.embed(ids).to(dtype)

        n, past = 0, None
        if self._prefix_cache is not None:
            n, past = self._prefix_cache.shared(rows, first, self._in_use, lambda ids: embed(ids, first.dtype), amp)
        embeds, mask, _ = self.embed_prompts([r[n:] for r in rows], memories, left_pad=True)
        with amp():
            return greedy_decode(lm, embed, embeds.to(first.dtype), mask, max_new_tokens,
                                 [eos] if isinstance(eos, int) else list(eos), banned, timing, past, n, prefill)

    @torch.no_grad()  # decoding never trains; and merged copies serve only calls without gradients
    def _run_generation(self, rows, memories, adapter: str | None, max_new_tokens: int, eos_token_id=None,
                        timing: Timing | None = None):
        with self._inference(adapter):
            ids = self.greedy_decode(rows, memories, max_new_tokens, eos_token_id, timing)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]

    def generate(self, questions: Sequence[str], memories: Sequence[Sequence[torch.Tensor]],
                 max_new_tokens: int = 64, eos_token_id: int | None = None, timing: Timing | None = None
                 ) -> list[str]:
        """Answer each question from its compressed documents (a list of [n_i, hidden] tensors each).
        ``timing``: filled in with time to first token and decoding speed (``clara.model.decoding.Timing``)."""
        if len(questions) != len(memories):
            raise ValueError(f"{len(questions)} questions but {len(memories)} document lists")
        rows = [self.prompter.qa_prompt(q, [m.shape[0] for m in mems]) for q, mems in zip(questions, memories)]
        mems = [[m.to(self.device) for m in ms] for ms in memories]
        return self._run_generation(rows, mems, "generator", max_new_tokens, eos_token_id, timing)

    def generate_from_text(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                           max_new_tokens: int = 64, timing: Timing | None = None,
                           eos_token_id: int | None = None, adapter: str | None = None) -> list[str]:
        """The raw-text baseline: the same base, adapters off (or ``adapter``: a generator tuned to read text),
        documents as text in the same QA prompt. A question with no documents is answered closed book."""
        rows = [self.prompter.text_qa_prompt(q, docs) for q, docs in zip(questions, documents, strict=True)]
        return self._run_generation(rows, [[] for _ in rows], adapter, max_new_tokens, eos_token_id, timing)

    def paraphrase(self, memories: Sequence[torch.Tensor], max_new_tokens: int = 128) -> list[str]:
        """What the generator reads back from each compressed document (to inspect a compressor)."""
        rows = [self.prompter.paraphrase_prompt(m.shape[0]) for m in memories]
        return self._run_generation(rows, [[m.to(self.device)] for m in memories], "generator", max_new_tokens)

