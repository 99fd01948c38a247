"""Raw-text first stages over an in-memory corpus: BM25 and MiniLM (dense). Each returns, per question, the ranked
(doc_id, score) list, best first."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from clara.data.corpus import Document

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
    """all-MiniLM-L6-v2 (``clara.retrieval.dense``) with cosine similarity over an in-memory matrix."""

    name = "minilm"

    def __init__(self, docs: Sequence[Document], model_path: str | Path | None = None, batch_size: int = 32):
        from clara.retrieval.dense import DenseEncoder

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
