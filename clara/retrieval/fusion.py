"""Reciprocal-rank fusion of first stages, the in-memory hybrid retriever, and the raw-text baselines by name."""

from __future__ import annotations

from typing import Sequence

from clara.data.corpus import Document
from clara.retrieval.first_stage import BM25Retriever, MiniLMRetriever, Ranked


def rrf(ranked_lists: Sequence[Ranked], n: int, k: int = 60) -> Ranked:
    """Reciprocal-rank fusion (Cormack et al.): score = sum over lists of 1 / (k + rank); ties by doc id. The same
    formula as the store's ``hybrid`` mode, which computes it in SQL."""
    scores: dict[str, float] = {}
    for ranked in ranked_lists:
        for rank, (d, _) in enumerate(ranked, 1):
            scores[d] = scores.get(d, 0.0) + 1.0 / (k + rank)
    return [(d, scores[d]) for d in sorted(scores, key=lambda d: (-scores[d], d))[:n]]


class HybridRetriever:
    """BM25 and MiniLM fused by reciprocal rank, in memory (each list ``depth`` = 2n deep, as the store does)."""

    name = "hybrid"

    def __init__(self, docs: Sequence[Document]):
        self.bm25, self.dense = BM25Retriever(docs), MiniLMRetriever(docs)

    def retrieve(self, questions: Sequence[str], k: int) -> list[Ranked]:
        lex, den = self.bm25.retrieve(questions, 2 * k), self.dense.retrieve(questions, 2 * k)
        return [rrf([a, b], k) for a, b in zip(lex, den)]


BASELINES = ("bm25", "minilm", "hybrid")
"""The raw-text retrievers ``baseline`` builds by name."""


def baseline(name: str, docs: Sequence[Document]):
    """A raw-text retriever by name: bm25, minilm or hybrid."""
    kinds = dict(zip(BASELINES, (BM25Retriever, MiniLMRetriever, HybridRetriever)))
    if name not in kinds:
        raise ValueError(f"unknown baseline retriever {name!r}; known: {', '.join(kinds)}")
    return kinds[name](docs)
