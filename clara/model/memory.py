"""Where a text's memory tokens sit and how their states become the compressed text.

A ``clara``-layout row is ``<ENC>`` + the text's tokens with ``n`` memory tokens after them (``after``) or one
after each of ``n`` contiguous chunks (``interleaved``), or no memory tokens, each chunk's mean state standing for it
(``pooled``, ``ModelConfig.memory_slots``); the authors' ``ml-clara``
layout is a left-padded ``<ENC><s>{text}</s>`` followed by the memory tokens. ``gather`` reads a batch's last-layer
states back at the memory positions, together with what the alignment term compares them with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from clara.config import ModelConfig


def mem_token(i: int) -> str:
    return f"<MEM{i}>"


def initial_special_rows(emb: torch.Tensor, n: int, mode: str, seed: int) -> torch.Tensor:
    """Starting rows of the special tokens (``ModelConfig.memory_init``), from the base's embedding matrix.

    Both stay in distribution for the frozen layers (centred on the mean embedding). ``mean`` adds 0.1 std of
    noise, so rows are near-identical; ``orthogonal`` adds orthonormal directions scaled to the mean distance of
    a real token from the mean, so the rows are as far apart as two unrelated tokens."""
    gen = torch.Generator().manual_seed(seed)
    centre = emb.mean(0)
    if mode == "mean":
        return centre + torch.randn(n, emb.shape[1], generator=gen) * emb.std(0) * 0.1
    if mode != "orthogonal":
        raise ValueError(f"memory_init must be 'mean' or 'orthogonal', got {mode!r}")
    if n > emb.shape[1]:
        raise ValueError(f"{n} orthogonal rows need a hidden size >= {n}, got {emb.shape[1]}")
    q, _ = torch.linalg.qr(torch.randn(emb.shape[1], n, generator=gen))  # orthonormal columns
    radius = (emb - centre).norm(dim=1).mean()
    return centre + q.T * radius


def chunk_bounds(n_tokens: int, n_chunks: int) -> list[tuple[int, int]]:
    """``n_chunks`` contiguous spans covering ``range(n_tokens)`` as evenly as integers allow (some are empty when
    there are fewer tokens than chunks). Chunk i is what memory slot i stands for."""
    return [(i * n_tokens // n_chunks, (i + 1) * n_tokens // n_chunks) for i in range(n_chunks)]


def clara_row(tokens: list[int], n: int, slots: str, enc_id: int, mem_ids: Sequence[int]
              ) -> tuple[list[int], list[int], list[int]]:
    """One ``clara``-layout row for ``tokens`` with ``n`` memory tokens placed as ``slots`` says
    (``ModelConfig.memory_slots``): the row, the positions of its text tokens and of its memory tokens (``pooled``:
    of each chunk's last token, or of the one before an empty chunk; only their number counts, ``gather``)."""
    if slots == "pooled":  # token t sits at row position 1 + t, so a chunk [a, e) ends at position e
        return [enc_id] + tokens, list(range(1, 1 + len(tokens))), [e for _, e in chunk_bounds(len(tokens), n)]
    if slots == "after":
        row = [enc_id] + tokens + list(mem_ids[:n])
        return row, list(range(1, 1 + len(tokens))), list(range(1 + len(tokens), len(row)))
    row, text_pos, mem_pos = [enc_id], [], []
    for j, (a, e) in enumerate(chunk_bounds(len(tokens), n)):
        text_pos.extend(range(len(row), len(row) + e - a))
        row.extend(tokens[a:e])
        mem_pos.append(len(row))
        row.append(mem_ids[j])
    return row, text_pos, mem_pos


def ml_clara_rows(tokenizer, texts: Sequence[str], max_len: int, enc_token: str, mem_ids: Sequence[int]
                  ) -> tuple[list[list[int | None]], list[tuple[int, int]]]:
    """The authors' layout: the string ``<ENC><s>{text}</s>`` tokenized as one (so the tokenizer treats the
    markers exactly as theirs did), cut to ``max_len + 3`` tokens (``</s>`` is lost when the text is longer
    than ``max_len + 1``), left-padded to that width, then the memory tokens. Pad positions are ``None``
    (masked); the rows are all the same width, so positions count from the left edge as in their forward.
    Returns the rows and each row's text span (after ``<ENC><s>``, before ``</s>``)."""
    width = max_len + 3
    strings = [f"{enc_token}{tokenizer.bos_token}{t}{tokenizer.eos_token}" for t in texts]
    encoded = tokenizer(strings, add_special_tokens=False, truncation=True, max_length=width)["input_ids"]
    rows, spans = [], []
    for e in encoded:
        left = width - len(e)
        rows.append([None] * left + e + list(mem_ids))
        spans.append((left + 2, left + len(e) - (1 if e[-1] == tokenizer.eos_token_id else 0)))
    return rows, spans


@dataclass
class Encoded:
    """A batch of compressed texts (documents or queries), padded to ``n_mem_max`` slots.

    Attributes:
        memory: [B, n_max, H] hidden states at the memory positions; unused slots are zero.
        n_mem: [B] memory tokens each text got.
        n_tokens: [B] text tokens each text kept after truncation.
        mem_mean: [B, H] mean of the memory states (MSE alignment, ANN vector).
        text_mean: [B, H] mean of the text-token states (MSE alignment target).
        states: [B, n_max, H] the memory states before the readout (zeros in unused slots).
        chunk_mean: [B, n_max, H] mean text state of the chunk each slot stands for (``chunk_bounds``).
        chunk_used: [B, n_max] slots in use whose chunk holds at least one token.
    """

    memory: torch.Tensor
    n_mem: torch.Tensor
    n_tokens: torch.Tensor
    mem_mean: torch.Tensor
    text_mean: torch.Tensor
    states: torch.Tensor
    chunk_mean: torch.Tensor
    chunk_used: torch.Tensor

    def unpad(self) -> list[torch.Tensor]:
        return [self.memory[i, : int(n)] for i, n in enumerate(self.n_mem)]


def gather(hidden: torch.Tensor, text_pos: list[list[int]], mem_pos: list[list[int]], n_max: int,
           readout: Callable[[torch.Tensor], torch.Tensor], pooled: bool = False) -> Encoded:
    """The batch's memory from its last-layer states ``hidden`` [B, L, H]: the states at each row's memory
    positions gathered into ``n_max`` slots (zeros where a text uses fewer), ``readout`` of them as the memory,
    and the means the alignment term compares (of the memory states, of the text states, of each slot's chunk).
    ``pooled``: each slot's state is its chunk's mean state instead (``ModelConfig.memory_slots``)."""
    b, width, h = hidden.shape
    device = hidden.device
    pos = torch.zeros(b, n_max, dtype=torch.long, device=device)
    slot_used = torch.zeros(b, n_max, dtype=torch.bool, device=device)
    text_mask = torch.zeros(b, width, dtype=hidden.dtype, device=device)
    # chunk_weights @ hidden = the mean text state of each slot's chunk
    chunk_weights = torch.zeros(b, n_max, width, dtype=hidden.dtype, device=device)
    for i, (tp, mp) in enumerate(zip(text_pos, mem_pos)):
        n = len(mp)
        pos[i, :n] = torch.tensor(mp, device=device)
        slot_used[i, :n] = True
        if tp:
            text_mask[i, tp] = 1.0
        for j, (a, e) in enumerate(chunk_bounds(len(tp), n)):
            if e > a:
                chunk_weights[i, j, tp[a:e]] = 1.0 / (e - a)
    chunk_mean = torch.bmm(chunk_weights, hidden)
    chunk_used = (chunk_weights.sum(-1) > 0) & slot_used
    if pooled:  # an empty chunk (a text shorter than its slots) gives a zero vector
        states = chunk_mean * chunk_used.unsqueeze(-1)
    else:
        states = hidden.gather(1, pos.unsqueeze(-1).expand(b, n_max, h)) * slot_used.unsqueeze(-1)
    n_mem = torch.tensor([len(mp) for mp in mem_pos], device=device)
    n_tok = torch.tensor([len(tp) for tp in text_pos], device=device)
    # The alignment compares states with states, whatever the readout makes of them.
    mem_mean = states.sum(1) / n_mem.unsqueeze(-1)
    text_mean = (hidden * text_mask.unsqueeze(-1)).sum(1) / n_tok.clamp(min=1).unsqueeze(-1)
    memory = readout(states) * slot_used.unsqueeze(-1)
    return Encoded(memory, n_mem, n_tok, mem_mean, text_mean, states, chunk_mean, chunk_used)


def compression_stats(cfg: "ModelConfig", token_counts: Sequence[int]) -> dict[str, float]:
    """Nominal rate and the real one (document tokens kept / memory tokens) over documents of ``token_counts``
    tokens (after truncation, ``ClaraModel.tokenize_texts``)."""
    mems = [cfg.n_mem_for(t) for t in token_counts]
    return {
        "nominal_rate": float(cfg.compression_rate),
        "real_ratio": sum(token_counts) / max(1, sum(mems)),
        "doc_tokens_mean": sum(token_counts) / max(1, len(token_counts)),
        "mem_tokens_mean": sum(mems) / max(1, len(mems)),
    }


def pad_rows(rows: Sequence[Sequence[int | None]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[int]]:
    """A batch of token rows as ids [B, L] and attention mask [B, L], padded on the right (``left``: on the left,
    as decoding wants). ``None`` inside a row is a pad too (the ``ml-clara`` layout's left pad). Also returns
    each row's left offset."""
    width = max(len(r) for r in rows)
    offsets = [width - len(r) if left else 0 for r in rows]
    ids = [[pad] * o + [pad if x is None else x for x in r] + [pad] * (width - len(r) - o)
           for r, o in zip(rows, offsets)]
    mask = [[0] * o + [0 if x is None else 1 for x in r] + [0] * (width - len(r) - o) for r, o in zip(rows, offsets)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device), offsets
