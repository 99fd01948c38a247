"""Batched greedy decoding with a KV cache over input embeddings, shared by the CLaRa generator and the
local teacher LM."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch


@dataclass
class Timing:
    """Where one generation call's time went, filled in by ``greedy_decode``. ``start`` is set by the caller when
    the request begins (so prompt assembly counts toward the first token)."""

    start: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    """Time to first token: prompt assembly + prefill + the first token's logits (synchronised)."""
    total_s: float | None = None
    new_tokens: int = 0
    """Tokens produced by the longest row (EOS included)."""

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decoding (None with fewer than two tokens)."""
        if self.first_token_s is None or self.total_s is None or self.new_tokens < 2:
            return None
        return (self.new_tokens - 1) / max(1e-9, self.total_s - self.first_token_s)


def cast_cache(past: Any, dtype: torch.dtype) -> Any:
    """A key/value cache (``DynamicCache``) with every layer's keys and values cast to ``dtype``, in place."""
    for layer in past.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            layer.dtype = dtype
    return past


@torch.no_grad()
def _run_prompt(lm, prefill: Any, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past: Any) -> Any:
    """The prompt's forward: the last position's logits and the key/value cache, in ``lm``'s dtype."""
    if prefill is None:
        return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                  logits_to_keep=1)
    # the prompt through the prefill copy's layers; the last state through lm's own head, in lm's dtype
    states = prefill.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=past,
                                   use_cache=True)
    logits = lm.get_output_embeddings()(states.last_hidden_state[:, -1:].to(lm.dtype))
    return SimpleNamespace(logits=logits, past_key_values=cast_cache(states.past_key_values, lm.dtype))


def greedy_decode(lm, embed: Callable[[torch.Tensor], torch.Tensor], embeds: torch.Tensor, mask: torch.Tensor,
                  max_new_tokens: int, eos_ids: Sequence[int], banned: tuple[int, int] | None = None,
                  timing: Timing | None = None, past: Any = None, past_len: int = 0,
                  prefill: Any = None) -> list[list[int]]:
    """Decode greedily from left-padded prompt embeddings; each row stops at its first EOS (not returned).

    Args:
        lm: a causal LM taking ``inputs_embeds`` / ``position_ids`` / ``past_key_values``.
        embed: maps new token ids [B, 1] to input embeddings.
        embeds, mask: [B, L, H] left-padded prompt embeddings and their attention mask.
        banned: a [lo, hi) id range never to emit (CLaRa's input-only special tokens).
        timing: filled in with time to first token, total time and tokens produced.
        past, past_len: the key/value cache of a prefix every row shares (``past_len`` tokens, batch B), which
            ``embeds`` continue: only the rest is prefilled. The padding then sits between the prefix and the
            rest, masked out, and positions count real tokens only, so the result is the uncached one.
        prefill: a model whose layers run the prompt instead of ``lm``'s (the same weights in another dtype: on a
            CPU the layers run a whole prompt faster in bf16, while one token at a time, and the vocabulary head
            always, run faster in fp32); ``embeds`` and ``past`` are in its dtype, the first token's logits come from
            ``lm``'s head, and the cache is cast to ``lm``'s dtype before decoding.
    """
    eos = set(int(e) for e in eos_ids)
    b = embeds.shape[0]
    if past is not None:
        mask = torch.cat([mask.new_ones(b, past_len), mask], dim=1)
    # Explicit positions: with left padding each row's first real token must be position 0.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    out = _run_prompt(lm, prefill, embeds, mask, pos, past)
    done = [False] * b
    produced: list[list[int]] = [[] for _ in range(b)]
    steps = 0
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if banned is not None and banned[0] < logits.shape[-1]:
            logits[:, banned[0] : banned[1]] = float("-inf")
        nxt = logits.argmax(-1)
        tokens = nxt.tolist()  # one device sync per step, not per row
        steps += 1
        if timing is not None and timing.first_token_s is None:
            timing.first_token_s = time.perf_counter() - timing.start
        for i, tok in enumerate(tokens):
            if not done[i]:
                if tok in eos:
                    done[i] = True
                else:
                    produced[i].append(tok)
        if all(done) or steps == max_new_tokens:  # no forward for a token that will not be read
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = lm(inputs_embeds=embed(nxt.unsqueeze(1)), attention_mask=mask, position_ids=pos,
                 past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    if timing is not None:
        timing.total_s = time.perf_counter() - timing.start
        timing.new_tokens = steps
    return produced
