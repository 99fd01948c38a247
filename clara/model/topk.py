"""Differentiable top-k selection with a straight-through estimator (docs/design.md §7)."""

from __future__ import annotations

from typing import Sequence

import torch


def differentiable_topk(scores: torch.Tensor, k: int, tau: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the k best candidates so that the forward pass is exactly hard top-k and gradients reach ``scores``.

    For slot j the hard pick is the j-th best candidate; the soft pick is
    ``softmax(scores / tau + log(1 - taken + 1e-8))`` where ``taken`` (no gradient) marks the earlier hard picks,
    so a candidate already chosen gets ~zero soft weight. ``W = hard + soft - stopgrad(soft)``: its value equals
    ``hard`` exactly (``x - x`` is 0 in floating point) while its gradient is the soft one.

    Args:
        scores: [B, N] relevance scores (e.g. cosine similarities).
        k: how many to select (1 <= k <= N).
        tau: temperature of the soft picks; smaller is closer to hard top-k, with sharper gradients.

    Returns:
        (W [B, k, N] selection weights, idx [B, k] the picked candidate indices, best first).
        ``W @ M`` (M: [B, N, ...]) gives the selected items in order.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    idx = scores.detach().topk(k, dim=-1).indices  # sorted, distinct
    logits = scores / tau
    taken = torch.zeros_like(scores, dtype=torch.float32).detach()
    slots = []
    for j in range(k):
        hard = torch.nn.functional.one_hot(idx[:, j], n).to(scores.dtype)
        soft = torch.softmax(logits + torch.log(1.0 - taken + 1e-8).to(scores.dtype), dim=-1)
        # Parenthesised so that the value is exactly `hard`: (soft - soft) is 0, (hard + soft) - soft is not.
        slots.append(hard + (soft - soft.detach()))
        taken = taken + hard.float()
    return torch.stack(slots, dim=1), idx


def flat_unit(memories: torch.Tensor) -> torch.Tensor:
    """The vector the paper's score compares: a [..., n, H] memory tensor flattened to [..., n*H] and scaled to
    unit length (fp32). Slots a document does not use are zero, so they add nothing to its norm; a pool is
    turned into these once and scored many times with ``unit_scores``."""
    return torch.nn.functional.normalize(memories.flatten(-2).float(), dim=-1)


def unit_scores(query: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Cosine scores of ``flat_unit`` vectors: query [B, F] against docs [N, F] (the same for every query) or
    [B, N, F] (per-query candidates); returns [B, N]. Differentiable in both arguments."""
    if docs.dim() == 2:
        return query @ docs.T
    return torch.einsum("bf,bnf->bn", query, docs)


def flat_cosine(query: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """The paper's score: cosine between the flattened query tensor and each flattened document tensor.
    The store's numpy twin is ``clara.store.search.flat_cosine_np`` (a test keeps them equal).

    Args:
        query: [B, n, H].
        docs: [N, n, H] (the same candidates for every query) or [B, N, n, H] (per-query candidates).
    Returns:
        [B, N] scores in [-1, 1].
    """
    return unit_scores(flat_unit(query), flat_unit(docs))


def pad_memories(memories: Sequence[torch.Tensor], n_max: int) -> torch.Tensor:
    """Stack [n_i, H] memory tensors into [D, n_max, H] with zero rows for unused slots (the convention
    ``flat_cosine`` relies on)."""
    if not memories:
        raise ValueError("no memories to stack")
    out = memories[0].new_zeros(len(memories), n_max, memories[0].shape[-1])
    for i, m in enumerate(memories):
        out[i, : m.shape[0]] = m
    return out
