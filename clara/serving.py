"""Answering questions from the compressed corpus, and the MLflow ``pyfunc`` models that package it.

``Answerer`` is the library: a checkpoint (query reasoner + generator) and one published pgvector build
(the corpus compressed by that checkpoint's compressor). ``ClaraQAModel`` wraps it for MLflow, so
``mlflow.pyfunc.load_model("models:/clara@production")`` and ``mlflow models serve`` answer questions;
``CompressorModel`` does the same for a compressor (documents in, memory tokens out).

The registered model records *which* build it answers from (``build_id``); the database is found at load time
(``$CLARA_DATABASE_URL``, else the embedded server on this machine), so no credentials travel with a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc


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


def _questions(model_input: Any, column: str = "question") -> list[str]:
    """Accept what ``mlflow models serve`` and ``predict`` hand over: a DataFrame, dicts, strings."""
    if hasattr(model_input, "columns"):
        if column not in model_input.columns:
            raise ValueError(f"input needs a {column!r} column; got {list(model_input.columns)}")
        return [str(x) for x in model_input[column].tolist()]
    if isinstance(model_input, dict):
        value = model_input.get(column)
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(model_input, str):
        return [model_input]
    return [str(x[column]) if isinstance(x, dict) else str(x) for x in model_input]


class ClaraQAModel(mlflow.pyfunc.PythonModel):
    """Questions in (column ``question``), answers out with the retrieved documents and their scores."""

    def load_context(self, context) -> None:
        import os

        cfg = dict(context.model_config or {})
        self.answerer = Answerer.load(context.artifacts["checkpoint"], int(cfg["build_id"]),
                                      database_url=os.environ.get("CLARA_DATABASE_URL") or cfg.get("database_url"),
                                      device=cfg.get("device"), k=int(cfg.get("k", 5)),
                                      max_new_tokens=int(cfg.get("max_new_tokens", 64)))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        k = int(params["k"]) if params and params.get("k") else None
        answers = self.answerer.ask(_questions(model_input), k=k)
        return pd.DataFrame([a.__dict__ for a in answers],
                            columns=["question", "answer", "doc_ids", "titles", "scores"])


class CompressorModel(mlflow.pyfunc.PythonModel):
    """Documents in (column ``text``), memory tokens out: ``n_mem`` and the [n_mem, hidden] tensor as lists."""

    def load_context(self, context) -> None:
        from clara.model.checkpoint import load_checkpoint

        cfg = dict(context.model_config or {})
        self.model = load_checkpoint(context.artifacts["checkpoint"], device=cfg.get("device"))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        texts = _questions(model_input, column="text")
        mems = self.model.compress(texts)
        return pd.DataFrame({"n_mem": [int(m.shape[0]) for m in mems],
                             "memory": [m.float().cpu().numpy().tolist() for m in mems]})
