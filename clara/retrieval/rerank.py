"""CLaRa's retriever: the query reasoner's tensor scored against compressed documents (flattened cosine), over a
store build's first stage or an exact in-memory index of the whole corpus. It also hands back the compressed
documents it found, for the generator."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from clara.data.corpus import Document
from clara.model.topk import flat_cosine, flat_unit, pad_memories, unit_scores
from clara.retrieval.first_stage import Ranked
from clara.retrieval.timing import StageTimes, timed

RERANK = ("auto", "always", "never")
"""When the query reasoner re-ranks a store's first stage (``use_rerank``)."""


def use_rerank(setting: str, trained: bool, mode: str) -> bool:
    """Whether retrieval in ``mode`` runs the query reasoner: always for ``clara`` and ``exact``, its own searches;
    over another first stage as ``setting`` says: ``always``, ``never``, or ``auto``: only when E2E trained it
    (``trained``). A query reasoner that never went through E2E is a copy of the compressor (the paper's
    initialisation), and re-ranking with it does not pay: over the release's build of 2,000 bundled passages its
    re-rank (fused with the hybrid rank at weight 2) lost R@1 against the hybrid first stage alone (descriptions
    43.3 vs 66.7, dev set 52.0 vs 98.7), never gained R@5, and cost ~75 ms per question (docs/benchmarks.md)."""
    if setting not in RERANK:
        raise ValueError(f"rerank must be one of {', '.join(RERANK)}, got {setting!r}")
    return mode in ("clara", "exact") or setting == "always" or (setting == "auto" and trained)


def measured_rerank(first: dict, reranked: dict, k: int) -> tuple[bool, str] | None:
    """``auto``'s answer for an E2E-trained query reasoner, from the retrieval rows of an evaluation (the first
    stage alone and re-ranked, same questions): re-rank only where it found more gold documents among the ``k`` the
    generator reads (recall at the first measured depth >= ``k``), or as many with more at rank 1. A tie goes to
    the first stage: the re-rank costs the query reasoner's forward on every question. None when the rows hold no
    recall (questions without gold). E2E training alone is no evidence: the demo pipeline's 10 E2E steps gave a
    re-rank that lost R@1 75 vs 100 to its own first stage (docs/quality.md). Returns (re-rank, why)."""
    depths = sorted(int(key.split("@")[1]) for key in first if key.startswith("recall@"))
    if not depths or any(first.get(f"recall@{d}") is None or reranked.get(f"recall@{d}") is None
                         for d in (1, depths[-1])):
        return None
    at = next((d for d in depths if d >= k), depths[-1])
    # rounded: equal counts of hits must compare equal whatever order a float sum took
    ours = (round(reranked[f"recall@{at}"], 9), round(reranked["recall@1"], 9))
    theirs = (round(first[f"recall@{at}"], 9), round(first["recall@1"], 9))
    why = (f"re-ranked R@{at} {100 * ours[0]:.1f} / R@1 {100 * ours[1]:.1f} vs first stage "
           f"{100 * theirs[0]:.1f} / {100 * theirs[1]:.1f} on {reranked.get('n', '?')} questions")
    return ours > theirs, why


class ClaraRetriever:
    """The query reasoner against compressed documents.

    With a store build: ``mode``'s first stage in Postgres, then the flattened-cosine re-rank
    (``clara.store.search.search``), or the first stage's own order with ``rerank=False`` (``use_rerank``; the query
    reasoner then never runs). Without one (``mode="exact"``): exact flattened cosine over an in-memory
    compression of the whole corpus.
    """

    name = "clara"

    def __init__(self, model, docs: Sequence[Document], *, engine=None, build=None, mode: str = "exact",
                 candidates: int | None = None, fuse: float = 0.0, rerank: bool = True,
                 compress_batch_size: int = 16):
        from clara.store.search import DEFAULT_CANDIDATES, MODES

        if mode not in MODES + ("exact",):
            raise ValueError(f"unknown retrieval mode {mode!r}; known: {', '.join(MODES + ('exact',))}")
        if build is None and mode != "exact":
            raise ValueError(f"retrieval mode {mode!r} needs a store build (evaluate with --use-store)")
        if not rerank and mode in ("exact", "clara"):
            raise ValueError(f"retrieval mode {mode!r} is the query reasoner's own search: it cannot skip it")
        self.model, self.engine, self.build = model, engine, build
        self.mode, self.fuse, self.rerank = mode, fuse, rerank
        self.n_candidates = candidates or DEFAULT_CANDIDATES.get(mode, 20)
        self.ids = [d.id for d in docs]
        self.memory: dict[str, torch.Tensor] = {}
        self.titles: dict[str, str] = {}  # of the documents a store search returned
        self._dense = None
        self.times: StageTimes | None = None
        """Set to a ``StageTimes`` to record where each retrieval's time goes (benchmarks, evaluation)."""
        if build is None:
            mems = [m.float().cpu() for m in model.compress([d.full_text for d in docs],
                                                             batch_size=compress_batch_size)]
            self.memory = dict(zip(self.ids, mems))
            # Normalised once: a query's scores are then one matrix product (the flattened cosine).
            self.flat = flat_unit(pad_memories(mems, model.cfg.n_mem_max))

    def encode(self, questions: Sequence[str]) -> list[torch.Tensor]:
        """The query reasoner's tensor of each question (one batched forward)."""
        with timed(self.times, "query reasoner", len(questions)):
            return [q.float().cpu() for q in self.model.encode_queries(list(questions))]

    def dense_queries(self, questions: Sequence[str], mode: str | None = None) -> list[np.ndarray | None]:
        """Each question's sentence vector when ``mode`` needs one (one batched forward), else Nones. Not cached:
        every timed retrieval includes encoding its question, and a long-lived server would keep every question
        it was asked."""
        mode = mode or self.mode
        if mode not in ("dense", "hybrid") or self.build is None or self.build.dense_model is None:
            return [None] * len(questions)
        if self._dense is None:
            from clara.retrieval.dense import MINILM, DenseEncoder

            if self.build.dense_model != MINILM:
                raise ValueError(f"build {self.build.id} holds {self.build.dense_model} vectors; "
                                 f"this version embeds questions with {MINILM} only")
            self._dense = DenseEncoder()
        with timed(self.times, "question embedding", len(questions)):
            return list(self._dense.embed(list(questions)))

    def first_stage(self, question: str, mode: str, n: int) -> Ranked:
        """A first stage alone (store only): ``n`` (doc_id, score), best first."""
        from clara.store.search import first_stage

        query = self.encode([question])[0].numpy() if mode == "clara" else None
        return first_stage(self.engine, self.build, mode, n, query=query, text_query=question,
                           dense_query=self.dense_queries([question], mode)[0])

    def retrieve(self, question: str, query: torch.Tensor | None, k: int, mode: str | None = None,
                 dense_query: np.ndarray | None = None) -> Ranked:
        """The top ``k`` for one question whose query-reasoner tensor is ``query`` (None: the first stage's order)
        and sentence vector ``dense_query`` (when it was computed with others' in a batch:
        ``dense_queries``)."""
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
        if dense_query is None:
            dense_query = self.dense_queries([question], mode)[0]
        hits = search(self.engine, self.build, None if query is None else query.numpy(), k=k, mode=mode,
                      candidates=max(n, k), text_query=question, dense_query=dense_query, fuse=self.fuse,
                      times=self.times)
        return self._keep(hits)

    def retrieve_batch(self, questions: Sequence[str], k: int, mode: str | None = None,
                       rerank: bool | None = None) -> list[Ranked]:
        """The served retrieval of questions asked together: the top ``k`` of each, re-ranked by the query
        reasoner as ``rerank`` says (default: the retriever's setting). The query reasoner and the sentence encoder
        run once for the whole batch. (Reading the store in a thread beside the query reasoner's forward was
        measured and saves nothing on 2 cores: docs/benchmarks.md, Latency.)"""
        mode = mode or self.mode
        rerank = self.rerank if rerank is None else rerank
        queries = self.encode(questions) if rerank else [None] * len(questions)
        dense = self.dense_queries(questions, mode)
        return [self.retrieve(q, t, k, mode=mode, dense_query=d) for q, t, d in zip(questions, queries, dense)]

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
