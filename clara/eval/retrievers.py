"""Retrievers compared in evaluation: BM25, MiniLM (dense) and CLaRa's query reasoner (over a store's first stage).

Each returns, per question, the ranked (doc_id, score) list. The CLaRa retriever also hands back the compressed
documents, from the pgvector store or from an exact in-memory index over the corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clara.data.corpus import Document
from clara.model.topk import flat_cosine, flat_unit, pad_memories, unit_scores

Ranked = list[tuple[str, float]]


class BM25Retriever:
    name = "bm25"

    def __init__(self, docs: Sequence[Document]):
        import bm25s

        self.ids = [d.id for d in docs]
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([d.full_text for d in docs], stopwords="en", show_progress=False),
                         show_progress=False)

    def retrieve(self, questions: Sequence[str], k: int) -> list[Ranked]:
        import bm25s

        k = min(k, len(self.ids))
        tokens = bm25s.tokenize(list(questions), stopwords="en", show_progress=False)
        idx, scores = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [[(self.ids[int(i)], float(s)) for i, s in zip(row_i, row_s)] for row_i, row_s in zip(idx, scores)]


class MiniLMRetriever:
    """all-MiniLM-L6-v2 (``clara.dense``) with cosine similarity over an in-memory matrix."""

    name = "minilm"

    def __init__(self, docs: Sequence[Document], model_path: str | Path | None = None, batch_size: int = 32):
        from clara.dense import DenseEncoder

        self.encoder = DenseEncoder(model_path, batch_size=batch_size)
        self.ids = [d.id for d in docs]
        self.matrix = self.encoder.embed([d.full_text for d in docs])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.embed(texts)

    def retrieve(self, questions: Sequence[str], k: int) -> list[Ranked]:
        scores = self.embed(questions) @ self.matrix.T
        k = min(k, len(self.ids))
        out = []
        for row in scores:
            top = np.argsort(-row)[:k]
            out.append([(self.ids[i], float(row[i])) for i in top])
        return out


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


def baseline(name: str, docs: Sequence[Document]):
    """A raw-text retriever by name: bm25, minilm or hybrid."""
    kinds = {"bm25": BM25Retriever, "minilm": MiniLMRetriever, "hybrid": HybridRetriever}
    if name not in kinds:
        raise ValueError(f"unknown baseline retriever {name!r}; known: {', '.join(kinds)}")
    return kinds[name](docs)


class ClaraRetriever:
    """The query reasoner against compressed documents.

    With a store build: ``mode``'s first stage in Postgres, then the flattened-cosine re-rank
    (``clara.store.search.search``). Without one (``mode="exact"``): exact flattened cosine over an in-memory
    compression of the whole corpus.
    """

    name = "clara"

    def __init__(self, model, docs: Sequence[Document], *, engine=None, build=None, mode: str = "exact",
                 candidates: int | None = None, fuse: float = 0.0, compress_batch_size: int = 16):
        from clara.store.search import DEFAULT_CANDIDATES, MODES

        if mode not in MODES + ("exact",):
            raise ValueError(f"unknown retrieval mode {mode!r}; known: {', '.join(MODES + ('exact',))}")
        if build is None and mode != "exact":
            raise ValueError(f"retrieval mode {mode!r} needs a store build (evaluate with --use-store)")
        self.model, self.engine, self.build = model, engine, build
        self.mode, self.fuse = mode, fuse
        self.n_candidates = candidates or DEFAULT_CANDIDATES.get(mode, 20)
        self.ids = [d.id for d in docs]
        self.memory: dict[str, torch.Tensor] = {}
        self.titles: dict[str, str] = {}  # of the documents a store search returned
        self._dense = None
        if build is None:
            mems = [m.float().cpu() for m in model.compress([d.full_text for d in docs],
                                                             batch_size=compress_batch_size)]
            self.memory = dict(zip(self.ids, mems))
            # Normalised once: a query's scores are then one matrix product (the flattened cosine).
            self.flat = flat_unit(pad_memories(mems, model.cfg.n_mem_max))

    def encode(self, questions: Sequence[str]) -> list[torch.Tensor]:
        return [q.float().cpu() for q in self.model.encode_queries(list(questions))]

    def _dense_query(self, question: str, mode: str) -> np.ndarray | None:
        """The question's sentence vector when ``mode`` needs one. Not cached: every timed retrieval includes
        encoding its question, and a long-lived server would keep every question it was asked."""
        if mode not in ("dense", "hybrid") or self.build is None or self.build.dense_model is None:
            return None
        if self._dense is None:
            from clara.dense import MINILM, DenseEncoder

            if self.build.dense_model != MINILM:
                raise ValueError(f"build {self.build.id} holds {self.build.dense_model} vectors; "
                                 f"this version embeds questions with {MINILM} only")
            self._dense = DenseEncoder()
        return self._dense.embed([question])[0]

    def first_stage(self, question: str, mode: str, n: int) -> Ranked:
        """A first stage alone (store only): ``n`` (doc_id, score), best first."""
        from clara.store.search import first_stage

        query = self.encode([question])[0].numpy() if mode == "clara" else None
        return first_stage(self.engine, self.build, mode, n, query=query, text_query=question,
                           dense_query=self._dense_query(question, mode))

    def retrieve(self, question: str, query: torch.Tensor, k: int, mode: str | None = None) -> Ranked:
        """The top ``k`` for one question whose query-reasoner tensor is ``query``."""
        mode = mode or self.mode
        if mode == "exact":
            if self.build is not None:
                from clara.store.search import search

                hits = search(self.engine, self.build, query.numpy(), k=k, exact=True)
                return self._keep(hits)
            scores = unit_scores(flat_unit(query.unsqueeze(0)), self.flat)[0]
            top = scores.topk(min(k, len(self.ids)))
            return [(self.ids[int(i)], float(s)) for i, s in zip(top.indices, top.values)]
        from clara.store.search import DEFAULT_CANDIDATES, search

        n = self.n_candidates if mode == self.mode else DEFAULT_CANDIDATES[mode]
        hits = search(self.engine, self.build, query.numpy(), k=k, mode=mode, candidates=max(n, k),
                      text_query=question, dense_query=self._dense_query(question, mode), fuse=self.fuse)
        return self._keep(hits)

    def _keep(self, hits) -> Ranked:
        for h in hits:
            self.memory.setdefault(h.doc_id, torch.from_numpy(h.memory))
            self.titles[h.doc_id] = h.title
        return [(h.doc_id, h.score) for h in hits]

    def score_docs(self, query: torch.Tensor, doc_ids: Sequence[str]) -> list[float]:
        """Flattened cosine of one query against given documents (the oracle-candidates setting)."""
        docs = pad_memories([self.memory_of(d) for d in doc_ids], self.model.cfg.n_mem_max)
        return flat_cosine(query.unsqueeze(0), docs)[0].tolist()

    def memory_of(self, doc_id: str) -> torch.Tensor:
        if doc_id not in self.memory:
            if self.build is None:
                raise KeyError(doc_id)
            from clara.store.search import memories_of

            found = memories_of(self.engine, self.build, [doc_id])
            if doc_id not in found:
                raise KeyError(f"document {doc_id!r} is not in build {self.build.id}")
            self.memory[doc_id] = torch.from_numpy(found[doc_id])
        return self.memory[doc_id]
