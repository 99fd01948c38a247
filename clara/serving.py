"""Answering questions from the compressed corpus: a checkpoint (query reasoner + generator) and one published
pgvector build (the corpus compressed by that checkpoint's compressor). ``flows/models.py`` packages it as the
MLflow model that ``models:/clara@production`` and ``mlflow models serve`` load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


MAX_QUESTION_CHARS = 2000
"""Longer input is refused rather than truncated: a question is a sentence or two, and a megabyte of text would
turn into thousands of lexical query terms (a denial of service, not a question)."""


MAX_DOCUMENT_CHARS = 1_000_000
"""Documents sent to the served compressor: it reads only the first ``doc_max_len`` tokens anyway."""


def check_questions(questions: Sequence[object], max_chars: int = MAX_QUESTION_CHARS,
                    what: str = "question") -> list[str]:
    """The inputs as strings, or a ``ValueError`` naming the first bad one (its position and what is wrong)."""
    out = []
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise ValueError(f"{what} {i}: expected a string, got {type(q).__name__}")
        if not q.strip():
            raise ValueError(f"{what} {i}: empty {what}")
        if len(q) > max_chars:
            raise ValueError(f"{what} {i}: {len(q):,} characters; at most {max_chars:,} are accepted")
        out.append(q)
    return out


@dataclass
class Answer:
    question: str
    answer: str
    doc_ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


class Answerer:
    """Answers from one build: ``mode``'s first stage in Postgres, the query reasoner's re-rank, the generator.
    Retrieval is the evaluation's own (``clara.eval.retrievers.ClaraRetriever``), so what is served is what was
    measured."""

    def __init__(self, model, engine, build, k: int = 5, mode: str = "hybrid", candidates: int | None = None,
                 fuse: float = 2.0, max_new_tokens: int = 64):
        from clara.eval.retrievers import ClaraRetriever

        if build.compression_rate != model.cfg.compression_rate:
            raise ValueError(f"build {build.id} holds rate-{build.compression_rate} memories; the model is "
                             f"rate {model.cfg.compression_rate}")
        if build.hidden_size != model.hidden_size:
            raise ValueError(f"build {build.id} has hidden size {build.hidden_size}; the model {model.hidden_size}")
        if mode in ("dense", "hybrid") and build.dense_model is None:
            raise ValueError(f"retrieval mode {mode!r} needs dense vectors and build {build.id} has none; "
                             f"rebuild it (clara compress) or serve with mode 'clara' or 'lexical'")
        self.model, self.engine, self.build = model, engine, build
        self.k, self.max_new_tokens = k, max_new_tokens
        self.retriever = ClaraRetriever(model, [], engine=engine, build=build, mode=mode, candidates=candidates,
                                        fuse=fuse)

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
        questions = check_questions(questions)
        if not questions:
            return []
        k = k or self.k
        queries = self.retriever.encode(questions)
        ranked = [self.retriever.retrieve(q, t, k) for q, t in zip(questions, queries)]
        memories = [[self.retriever.memory_of(d) for d, _ in r] for r in ranked]
        answers = self.model.generate(questions, memories, max_new_tokens=self.max_new_tokens)
        titles = self.retriever.titles  # the search already read them with the documents
        return [Answer(q, a, [d for d, _ in r], [titles.get(d, "") for d, _ in r], [round(s, 4) for _, s in r])
                for q, a, r in zip(questions, answers, ranked)]
