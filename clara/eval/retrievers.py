"""Retrievers compared in evaluation: BM25, MiniLM (dense) and CLaRa's query reasoner.

Each returns, per question, the ranked (doc_id, score) list. The CLaRa retriever also hands back the compressed
documents, from the pgvector store or from an exact in-memory index over the corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clara.data.corpus import Document
from clara.model.topk import flat_cosine, pad_memories

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


class ClaraRetriever:
    """The query reasoner against compressed documents: the pgvector store (ANN + exact re-score) when a build
    is given, else exact flattened cosine over an in-memory compression of the corpus."""

    name = "clara"

    def __init__(self, model, docs: Sequence[Document], *, engine=None, build=None, candidates: int = 100,
                 compress_batch_size: int = 16):
        self.model = model
        self.engine, self.build, self.candidates = engine, build, candidates
        self.ids = [d.id for d in docs]
        self.memory: dict[str, torch.Tensor] = {}
        if build is None:
            mems = [m.float().cpu() for m in model.compress([d.full_text for d in docs],
                                                             batch_size=compress_batch_size)]
            self.memory = dict(zip(self.ids, mems))
            # Normalised once: a query's scores are then one matrix product (the flattened cosine).
            self.flat = torch.nn.functional.normalize(pad_memories(mems, model.cfg.n_mem_max).flatten(1), dim=-1)

    def encode(self, questions: Sequence[str]) -> list[torch.Tensor]:
        return [q.float().cpu() for q in self.model.encode_queries(list(questions))]

    def retrieve_encoded(self, queries: Sequence[torch.Tensor], k: int) -> list[Ranked]:
        if self.build is not None:
            from clara.store.search import search

            out = []
            for q in queries:
                hits = search(self.engine, self.build, q.numpy(), k=k, candidates=max(self.candidates, k))
                for h in hits:
                    self.memory.setdefault(h.doc_id, torch.from_numpy(h.memory))
                out.append([(h.doc_id, h.score) for h in hits])
            return out
        q = torch.nn.functional.normalize(torch.stack([x.flatten() for x in queries]), dim=-1)
        scores = q @ self.flat.T
        top = scores.topk(min(k, len(self.ids)), dim=-1)
        return [[(self.ids[int(i)], float(s)) for i, s in zip(ti, ts)] for ti, ts in zip(top.indices, top.values)]

    def retrieve(self, questions: Sequence[str], k: int) -> list[Ranked]:
        return self.retrieve_encoded(self.encode(questions), k)

    def score_docs(self, query: torch.Tensor, doc_ids: Sequence[str]) -> list[float]:
        """Flattened cosine of one query against given documents (for Oracle candidates)."""
        docs = pad_memories([self.memory_of(d) for d in doc_ids], self.model.cfg.n_mem_max)
        return flat_cosine(query.unsqueeze(0), docs)[0].tolist()

    def memory_of(self, doc_id: str) -> torch.Tensor:
        if doc_id not in self.memory:
            if self.build is None:
                raise KeyError(doc_id)
            from sqlalchemy import text

            from clara.store.search import decode_memory

            with self.engine.connect() as conn:
                row = conn.execute(text("SELECT n_mem, memory FROM memories WHERE build_id = :b AND doc_id = :d"),
                                   {"b": self.build.id, "d": doc_id}).first()
            if row is None:
                raise KeyError(f"document {doc_id!r} is not in build {self.build.id}")
            self.memory[doc_id] = torch.from_numpy(decode_memory(row[1], row[0], self.build.hidden_size))
        return self.memory[doc_id]
