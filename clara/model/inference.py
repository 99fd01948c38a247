"""What a served model keeps beside its weights to answer faster: plain copies of the base with an adapter merged
in, and the key/value cache of the prompt start every question shares. Both are snapshots of the weights: for
serving and benchmarks, never while training changes them.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn


def copy_dtypes(name: str | None, uses_amp: bool, dtype: torch.dtype, device_type: str
                ) -> tuple[torch.dtype, torch.dtype | None]:
    """The dtype of adapter ``name``'s merged copy, and of its prompt twin (None: no twin).

    bf16 where the model computes in it (``ClaraModel.amp``), except for the copies that decode on a CPU (the
    generator's, and the bare base's for the raw-text baseline): one token at a time, this CPU's bf16 kernels run
    ~3x slower than fp32 (``MergedCopies``), while a whole text's forward (a prompt, the query reasoner) gains from
    bf16, so those get a bf16 twin for their prompts. On a GPU bf16 wins both."""
    if not uses_amp:
        return dtype, None
    if device_type == "cpu" and name in ("generator", None):
        return dtype, torch.bfloat16
    return torch.bfloat16, None


class MergedCopies:
    """One plain copy of the base per adapter (``None``: the bare base, no LoRA), the adapter's LoRA merged into its
    weights (``W + s·BA``) and held in a fixed dtype chosen per adapter (``copy_dtypes``).

    Why: an unmerged LoRA runs two extra matmuls per projection per token (210 on SmolLM2), and under bf16
    autocast every forward casts all fp32 weights again; a merged copy in a fixed dtype does neither. Measured on
    2 cores (SmolLM2-135M): the query reasoner's forward over a 24-token question 143 ms unmerged under autocast,
    50 ms merged in bf16 (78 in fp32); decoding 6.2 tokens/s unmerged under autocast, 5.9 merged in bf16, 17.4
    merged in fp32 (one token at a time, this CPU's bf16 kernels lose to fp32: a matrix times one vector, which
    the vocabulary head is for every prompt too). So a decoding copy kept in fp32 on a CPU gets a bf16 twin whose
    layers prefill the prompt (209 prompt tokens: 132 ms in bf16, 293 in fp32); the cache is cast before decoding.
    Costs one copy of the base weights per adapter (at 7B ~14 GB each in bf16: merge only where memory allows).
    Kept in a dict, not as submodules: they must stay out of ``state_dict``, checkpoints and parameter lists.
    """

    def __init__(self) -> None:
        self._copies: dict[str | None, nn.Module] = {}
        self._prefill: dict[str | None, nn.Module] = {}

    def merge(self, peft, names: Sequence[str | None],
              dtypes: Callable[[str | None], tuple[torch.dtype, torch.dtype | None]]) -> None:
        """Copies for ``names``: ``dtypes(name)`` gives the dtype each is held and run in (no autocast) and, where
        not None, the dtype of a second copy that runs its prompts (``copy_dtypes``)."""
        for name in names:
            twin = copy.deepcopy(peft)
            if name is None:
                plain = twin.unload()
            else:
                twin.set_adapter(name)
                plain = twin.merge_and_unload(adapter_names=[name])
            held, prompts = dtypes(name)
            plain.to(held).requires_grad_(False).eval()
            self._copies[name] = plain
            self._prefill.pop(name, None)
            if prompts is not None and prompts != held:
                self._prefill[name] = copy.deepcopy(plain).to(prompts).eval()

    def get(self, name: str | None) -> nn.Module | None:
        """The copy for adapter ``name``; none while gradients are on (training needs the adapter's own weights)."""
        if torch.is_grad_enabled():
            return None
        return self._copies.get(name)

    def prefill(self, name: str | None) -> nn.Module | None:
        """The copy that runs prompts for adapter ``name`` where it has one of its own."""
        return None if torch.is_grad_enabled() else self._prefill.get(name)

    def names(self) -> list[str | None]:
        return list(self._copies)

    def clear(self) -> None:
        self._copies.clear()
        self._prefill.clear()


class PrefixCache:
    """The key/value cache of the fixed start some prompts share (the chat template's system turn and the user
    turn's header: ~30 tokens of the QA prompt), computed once per model copy and adapter and reused by every
    later decoding, so a question's prefill covers only its own documents and question."""

    def __init__(self, prefixes: Sequence[Sequence[int]]):
        self.prefixes = sorted(tuple(p) for p in prefixes if p)
        self._kv: dict = {}

    def __len__(self) -> int:
        return len(self._kv)

    def clear(self) -> None:
        self._kv.clear()  # computed by a model copy that is gone: recomputed on next use

    def shared(self, rows: list[list[int]], lm: nn.Module, adapter: str | None,
               embed: Callable[[torch.Tensor], torch.Tensor], amp) -> tuple[int, object]:
        """(length, a batch-sized copy of its cache) of a cached prefix every row starts with, else (0, None)."""
        for prefix in self.prefixes:
            n = len(prefix)
            if all(len(r) > n and tuple(r[:n]) == prefix for r in rows):
                break
        else:
            return 0, None
        key = (id(lm), adapter, prefix)
        if key not in self._kv:
            ids = torch.tensor([list(prefix)], device=next(lm.parameters()).device)
            with torch.no_grad(), amp():
                self._kv[key] = lm(inputs_embeds=embed(ids), use_cache=True, logits_to_keep=1).past_key_values
        past = copy.deepcopy(self._kv[key])  # decoding appends to it: the stored one stays the prefix's own
        if len(rows) > 1:
            past.batch_repeat_interleave(len(rows))
        return n, past
