"""Answering questions from the compressed corpus: a checkpoint (query reasoner + generator) and one published
pgvector build (the corpus compressed by that checkpoint's compressor). ``flows/models.py`` packages it as the
MLflow model that ``models:/clara@production`` and ``mlflow models serve`` load.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

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
    """Answers from one build: ``mode``'s first stage in Postgres, the query reasoner's re-rank where it pays
    (``rerank``, ``clara.retrieval.rerank.use_rerank``), the generator. Retrieval is the evaluation's own
    (``clara.retrieval.rerank.ClaraRetriever``), so what is served is what was measured."""

    def __init__(self, model, engine, build, k: int = 5, mode: str = "hybrid", candidates: int | None = None,
                 fuse: float = 2.0, rerank: str = "auto", max_new_tokens: int = 64):
        from clara.retrieval.rerank import ClaraRetriever, use_rerank

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
        # a query reasoner E2E never trained is the compressor's copy, as in evaluation (an untrained adapter would
        # leave the bare base encoding the questions)
        reranks = use_rerank(rerank, not model.adapter_is_zero("query_reasoner"), mode)
        if reranks:
            model.ensure_query_reasoner()
        self.retriever = ClaraRetriever(model, [], engine=engine, build=build, mode=mode, candidates=candidates,
                                        fuse=fuse, rerank=reranks)

    @classmethod
    def load(cls, checkpoint: str | Path, build_id: int, *, database_url: str | None = None,
             device: str | None = None, merge: bool = True, **kwargs) -> "Answerer":
        """``merge``: run the generator (and the query reasoner where it re-ranks) from plain copies of the base with
        their LoRA merged in (``ClaraModel.merge_adapters``: base-model speed for more copies of the base weights,
        ~1.1 GB on SmolLM2 on a CPU).
        The QA prompt's fixed system turn is prefilled once and its key/value cache reused by every question
        (``ClaraModel.cache_prefix``): a served model's weights never change."""
        from clara.model.checkpoint import load_checkpoint
        from clara.store.builds import ready_build
        from clara.store.db import connect

        engine = connect(database_url)
        build = ready_build(engine, build_id)
        model = load_checkpoint(checkpoint, device=device)
        answerer = cls(model, engine, build, **kwargs)  # first: it may give the query reasoner its weights
        if merge:
            model.merge_adapters(["generator"] + (["query_reasoner"] if answerer.retriever.rerank else []))
        model.cache_prefix()
        return answerer

    def ask(self, questions: Sequence[str], k: int | None = None) -> list[Answer]:
        questions = check_questions(questions)
        if not questions:
            return []
        from clara.store.db import reachable

        k = k or self.k
        with reachable(self.engine):  # the query reasoner and the sentence encoder: one batch each
            ranked = self.retriever.retrieve_batch(questions, k)
            memories = [[self.retriever.memory_of(d) for d, _ in r] for r in ranked]
        answers = self.model.generate(questions, memories, max_new_tokens=self.max_new_tokens)
        titles = self.retriever.titles  # the search already read them with the documents
        return [Answer(q, a, [d for d, _ in r], [titles.get(d, "") for d, _ in r], [round(s, 4) for _, s in r])
                for q, a, r in zip(questions, answers, ranked)]


class _Slot(Generic[T, R]):
    def __init__(self, items: list[T]):
        self.items = items
        self.result: list[R] | None = None
        self.error: BaseException | None = None


class Batcher(Generic[T, R]):
    """Concurrent callers' items answered together, one model call at a time.

    A web server hands each request to its own thread; letting them run the model at once makes every call
    fight for the same cores (measured: 16 concurrent clients got half the requests/s of one, RSS grew). Here
    the first caller to get the model runs everything queued so far as one batch (at most ``max_batch`` items)
    and hands each caller its own results; the others wait. If a batch fails, its callers are retried one by
    one, so one request cannot fail the others'.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.fn, self.max_batch = fn, max_batch
        self._pending: list[_Slot[T, R]] = []
        self._pending_lock = threading.Lock()
        self._model_lock = threading.Lock()
        # bounded: a server lives long, and only the recent sizes say anything about how batching goes
        self.batches: deque[int] = deque(maxlen=1000)
        """Items per recent model call (failed ones included), oldest first."""

    def __call__(self, items: Sequence[T]) -> list[R]:
        slot: _Slot[T, R] = _Slot(list(items))
        with self._pending_lock:
            self._pending.append(slot)
        with self._model_lock:
            while slot.result is None and slot.error is None:
                self._run_one_batch()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _run_one_batch(self) -> None:
        with self._pending_lock:
            batch, size = [], 0
            while self._pending and (not batch or size + len(self._pending[0].items) <= self.max_batch):
                s = self._pending.pop(0)
                batch.append(s)
                size += len(s.items)
        if not batch:
            return
        self.batches.append(size)
        try:
            results = self.fn([x for s in batch for x in s.items])
        except Exception as e:
            if len(batch) == 1:
                batch[0].error = e
                return
            for s in batch:  # one bad request must not fail the others
                self.batches.append(len(s.items))
                try:
                    s.result = self.fn(s.items)
                except Exception as e1:
                    s.error = e1
            return
        at = 0
        for s in batch:
            s.result = results[at: at + len(s.items)]
            at += len(s.items)
