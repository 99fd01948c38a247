"""Answering questions from the compressed corpus: a checkpoint (query reasoner + generator) and one published
pgvector build (the corpus compressed by that checkpoint's compressor). ``flows/models.py`` packages it as the
MLflow model that ``models:/clara@production`` and ``mlflow models serve`` load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class Answer:
    question: str
    answer: str
    doc_ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


class Answerer:
    def __init__(self, model, engine, build, k: int = 5, candidates: int = 100, max_new_tokens: int = 64):
        if build.compression_rate != model.cfg.compression_rate:
            raise ValueError(f"build {build.id} holds rate-{build.compression_rate} memories; the model is "
                             f"rate {model.cfg.compression_rate}")
        if build.hidden_size != model.hidden_size:
            raise ValueError(f"build {build.id} has hidden size {build.hidden_size}; the model {model.hidden_size}")
        self.model, self.engine, self.build = model, engine, build
        self.k, self.candidates, self.max_new_tokens = k, candidates, max_new_tokens

    @classmethod
    def load(cls, checkpoint: str | Path, build_id: int, *, database_url: str | None = None,
             device: str | None = None, **kwargs) -> "Answerer":
        from clara.model.checkpoint import load_checkpoint
        from clara.store.builds import ready_build
        from clara.store.db import connect

        engine = connect(database_url)
        build = ready_build(engine, build_id)
        return cls(load_checkpoint(checkpoint, device=device), engine, build, **kwargs)

    def ask(self, questions: Sequence[str], k: int | None = None) -> list[Answer]:
        import torch

        from clara.store.search import search

        questions = [str(q) for q in questions]
        if not questions:
            return []
        if any(not q.strip() for q in questions):
            raise ValueError("empty question")
        k = k or self.k
        queries = self.model.encode_queries(questions)
        hits = [search(self.engine, self.build, q.float().cpu().numpy(), k=k, candidates=max(self.candidates, k))
                for q in queries]
        memories = [[torch.from_numpy(h.memory) for h in hs] for hs in hits]
        answers = self.model.generate(questions, memories, max_new_tokens=self.max_new_tokens)
        return [Answer(q, a, [h.doc_id for h in hs], [h.title for h in hs], [round(h.score, 4) for h in hs])
                for q, a, hs in zip(questions, answers, hits)]
