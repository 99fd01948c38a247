"""Retrieval from an index build: a first stage proposes candidates, the query reasoner re-ranks them.

First stages (``MODES``), each one SQL query:
- ``clara``: the build's HNSW index over each document's mean memory vector (halfvec cosine, or Hamming
  distance over the binary-quantised vector above 4,000 dimensions) - CLaRa alone, over the whole corpus;
- ``dense``: the build's HNSW index over its sentence-encoder vectors (``clara.retrieval.dense``);
- ``lexical``: BM25 over Postgres full text (statistics in ``lexical_*``, see migration 002), each query term
  reading only its ``LEXICAL_POSTINGS_PER_TERM`` highest-weight postings (migration 003);
- ``hybrid``: reciprocal-rank fusion (RRF) of ``dense`` and ``lexical``.
The re-rank decodes the candidates' memory tensors and scores them with the paper's flattened cosine against the
query reasoner's tensor. The first-stage rank can be fused into the final order (``fuse``): the final score is
``1/(RRF_K + rank_clara) + fuse/(RRF_K + rank_first_stage)``. ``exact=True`` scores every document of the build.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, text

from clara.retrieval.timing import StageTimes, timed
from clara.store.builds import Build, StoreError

MODES = ("clara", "dense", "lexical", "hybrid")
RRF_K = 60  # the constant of Cormack et al.'s reciprocal-rank fusion: ranks past ~60 matter little
LEXICAL_POSTINGS_PER_TERM = 2000
"""Impact-ordered pruning of BM25. Each query term's postings are read in descending weight order, at most M of
them; the documents with the best partial sums (10x the number asked for) then get their exact BM25 over every
query term (one primary-key probe per document and term). A list is cut only when it is longer than M, i.e. for a
frequent, low-idf term, and a document then loses at most ``idf * w_M`` of that term before re-scoring. With no list
cut (every term rarer than M) the result is exact BM25. Cost per query is bounded by M per term instead of growing
with the corpus: lossless on the bundled corpus's questions
(``benchmarks/results/experiments/lexical_pruning.json``), and 1M-row figures in
``benchmarks/results/store_hybrid_1m.json``."""
DEFAULT_CANDIDATES = {"clara": 100, "dense": 20, "lexical": 20, "hybrid": 20}
"""Candidates per mode: the paper re-ranks 20 from a dense retriever; CLaRa's own ANN over mean vectors is a
coarse proxy of its re-rank score, so it passes more."""


@dataclass
class Hit:
    doc_id: str
    score: float
    """The re-rank score: the flattened cosine, or the fused score when ``fuse`` > 0."""
    title: str
    text: str
    memory: np.ndarray
    """[n_mem, hidden] float32, ready to hand to the generator."""
    first_rank: int | None = None
    """1-based rank in the first stage (None for exact search)."""


def decode_memory(blob: bytes, n_mem: int, hidden: int) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f2").reshape(n_mem, hidden).astype(np.float32)


def flat_cosine_np(query: np.ndarray, memories: list[np.ndarray], n_mem_max: int) -> np.ndarray:
    """Cosine between the flattened query [n_max, H] and each flattened, zero-padded memory [n_i, H]."""
    q = np.zeros((n_mem_max, query.shape[1]), dtype=np.float32)
    q[: min(n_mem_max, query.shape[0])] = query[:n_mem_max]
    qn = np.linalg.norm(q) or 1.0
    scores = np.empty(len(memories), dtype=np.float32)
    for i, m in enumerate(memories):
        n = m.shape[0]
        scores[i] = float((q[:n] * m).sum()) / (qn * (np.linalg.norm(m) or 1.0))
    return scores


def _check_query(build: Build, query: np.ndarray) -> np.ndarray:
    query = np.asarray(query, dtype=np.float32)
    if query.ndim != 2 or query.shape[1] != build.hidden_size:
        raise StoreError(f"query of shape {query.shape} does not match build {build.id} "
                         f"(hidden {build.hidden_size})")
    return query


def _vector_literal(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, dtype=np.float32).ravel()) + "]"


def _nearest_sql(build: Build, column: str) -> str:
    """ORDER BY expression of an HNSW search; it must match the partial index's expression exactly, and its
    dimensions come from our own build row."""
    if column == "dense":
        return f"{build.dense_expr} <=> CAST(:q AS vector({int(build.dense_dim or 0)}))"
    if build.ann_kind == "halfvec":
        return f"{build.ann_expr} <=> CAST(:q AS halfvec({int(build.hidden_size)}))"
    return f"{build.ann_expr} <~> binary_quantize(CAST(:q AS vector({int(build.hidden_size)})))"


_LEXICAL_SQL = """
    WITH q AS (SELECT t.lexeme, t.idf
               FROM (SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('english', :text))) AS lexeme) l
               JOIN lexical_terms t ON t.corpus_version = :c AND t.lexeme = l.lexeme),
    lists AS (SELECT p.doc_id, p.w * q.idf AS s FROM q
              CROSS JOIN LATERAL (SELECT doc_id, w FROM lexical_postings
                                  WHERE corpus_version = :c AND lexeme = q.lexeme
                                  ORDER BY w DESC, doc_id LIMIT :per_term) p),
    pool AS (SELECT doc_id FROM lists GROUP BY doc_id ORDER BY sum(s) DESC, doc_id LIMIT :pool)
    SELECT pool.doc_id, sum(p.w * q.idf) AS score
    FROM pool CROSS JOIN q
    JOIN lexical_postings p ON p.corpus_version = :c AND p.lexeme = q.lexeme AND p.doc_id = pool.doc_id
    GROUP BY pool.doc_id ORDER BY score DESC, pool.doc_id LIMIT :depth"""
_LEXICAL_POOL = 10  # candidates re-scored exactly per result: the pool is the best 10x by the partial score


def _check_first_stage(build: Build, mode: str, n: int, postings_per_term: int, query: np.ndarray | None,
                       text_query: str | None, dense_query: np.ndarray | None) -> None:
    """What ``first_stage`` needs for ``mode``, refused with the reason before any SQL runs."""
    if mode not in MODES:
        raise ValueError(f"unknown retrieval mode {mode!r}; known: {', '.join(MODES)}")
    if n < 1:
        raise ValueError("n must be >= 1")
    if postings_per_term < 1:
        raise ValueError("postings_per_term must be >= 1")
    needs_dense = mode in ("dense", "hybrid")
    if needs_dense and build.dense_model is None:
        raise StoreError(f"build {build.id} has no dense vectors (built without a dense model); "
                         f"rebuild it or use mode 'clara' or 'lexical'")
    if needs_dense and dense_query is None:
        raise ValueError(f"mode {mode!r} needs the question's {build.dense_model} vector (dense_query)")
    if mode in ("lexical", "hybrid") and not text_query:
        raise ValueError(f"mode {mode!r} needs the question text (text_query)")
    if mode == "clara" and query is None:
        raise ValueError("mode 'clara' needs the query reasoner's tensor (query)")


def first_stage(engine: Engine, build: Build, mode: str, n: int, *, query: np.ndarray | None = None,
               text_query: str | None = None, dense_query: np.ndarray | None = None,
               depth: int | None = None, postings_per_term: int = LEXICAL_POSTINGS_PER_TERM
               ) -> list[tuple[str, float]]:
    """First stage: the ``n`` best (doc_id, score) of ``mode``, best first.

    Args:
        query: the query reasoner's tensor [n, hidden] (mode ``clara``).
        text_query: the question (``lexical``, ``hybrid``).
        dense_query: the question's sentence vector from the build's dense model (``dense``, ``hybrid``).
        depth: how deep each list of ``hybrid`` goes before fusion (default 2n).
        postings_per_term: BM25 pruning, see ``LEXICAL_POSTINGS_PER_TERM`` (``lexical``, ``hybrid``).
    """
    _check_first_stage(build, mode, n, postings_per_term, query, text_query, dense_query)
    params: dict = {"b": build.id, "c": build.corpus_version, "n": n, "text": text_query, "depth": n,
                    "per_term": postings_per_term}
    if mode == "clara":
        params["q"] = _vector_literal(_check_query(build, query).mean(0))
        sql = (f"SELECT doc_id, 1 - ({_nearest_sql(build, 'ann')}) FROM memories WHERE build_id = CAST(:b AS bigint) "
               f"ORDER BY {_nearest_sql(build, 'ann')} LIMIT :n")
    elif mode == "lexical":
        sql = _LEXICAL_SQL
    else:
        dense_query = np.asarray(dense_query, dtype=np.float32).ravel()
        if dense_query.shape[0] != build.dense_dim:
            raise StoreError(f"dense query of dimension {dense_query.shape[0]} does not match build {build.id} "
                             f"({build.dense_model}, {build.dense_dim})")
        params["q"] = _vector_literal(dense_query)
        dense_sql = (f"SELECT doc_id, 1 - ({_nearest_sql(build, 'dense')}) AS score FROM memories "
                     f"WHERE build_id = CAST(:b AS bigint) ORDER BY {_nearest_sql(build, 'dense')} LIMIT :depth")
        if mode == "dense":
            sql = dense_sql
        else:
            params["depth"] = depth or 2 * n
            sql = (f"WITH d AS (SELECT doc_id, row_number() OVER (ORDER BY score DESC) AS r FROM ({dense_sql}) x), "
                   f"l AS (SELECT doc_id, row_number() OVER (ORDER BY score DESC, doc_id) AS r FROM ({_LEXICAL_SQL}) y) "
                   f"SELECT doc_id, coalesce(1.0 / ({RRF_K} + d.r), 0) + coalesce(1.0 / ({RRF_K} + l.r), 0) AS score "
                   f"FROM d FULL JOIN l USING (doc_id) ORDER BY score DESC, doc_id LIMIT :n")
    params["pool"] = _LEXICAL_POOL * params["depth"]
    with engine.begin() as conn:
        # Custom plans so the planner sees the literal build id and can use that build's partial index.
        # (one statement for both settings: each statement is a round trip on the served path)
        conn.execute(text("SELECT set_config('plan_cache_mode', 'force_custom_plan', true), "
                          "set_config('hnsw.ef_search', :ef, true)"), {"ef": str(max(40, params["depth"], n))})
        rows = conn.execute(text(sql), params).all()
    return [(r[0], float(r[1])) for r in rows]


def memories_of(engine: Engine, build: Build, doc_ids: list[str]) -> dict[str, np.ndarray]:
    """Decoded memory tensors of ``doc_ids`` in ``build`` (documents not in the build are absent)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT doc_id, n_mem, memory FROM memories WHERE build_id = :b "
                                 "AND doc_id = ANY(:ids)"), {"b": build.id, "ids": list(doc_ids)}).all()
    return {r[0]: decode_memory(r[2], r[1], build.hidden_size) for r in rows}


def candidates_of(engine: Engine, build: Build, doc_ids: list[str]
                  ) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]]]:
    """The candidates' decoded memories and their (title, text), in one round trip: the served path re-ranks by the
    memories and returns the winners' rows, and a second query would cost as much as the re-rank itself."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT m.doc_id, m.n_mem, m.memory, d.title, d.body FROM memories m "
                                 "LEFT JOIN documents d ON d.corpus_version = :c AND d.doc_id = m.doc_id "
                                 "WHERE m.build_id = :b AND m.doc_id = ANY(:ids)"),
                            {"b": build.id, "c": build.corpus_version, "ids": list(doc_ids)}).all()
    return ({r[0]: decode_memory(r[2], r[1], build.hidden_size) for r in rows},
            {r[0]: (r[3] or "", r[4] or "") for r in rows})


def rerank(query: np.ndarray, first: list[tuple[str, float]], memories: dict[str, np.ndarray], n_mem_max: int,
           fuse: float = 0.0) -> list[tuple[str, float, int]]:
    """Order first-stage candidates by the flattened cosine (fused with their first-stage rank when ``fuse`` > 0).

    Returns (doc_id, score, first-stage rank), best first.
    """
    ids = [d for d, _ in first if d in memories]
    if not ids:
        return []
    cos = flat_cosine_np(query, [memories[d] for d in ids], n_mem_max)
    first_rank = {d: i + 1 for i, (d, _) in enumerate(first)}
    if fuse <= 0:
        order = sorted(range(len(ids)), key=lambda i: (-cos[i], first_rank[ids[i]]))
        return [(ids[i], float(cos[i]), first_rank[ids[i]]) for i in order]
    clara_rank = {ids[i]: r + 1 for r, i in enumerate(sorted(range(len(ids)), key=lambda i: -cos[i]))}
    fused = {d: 1.0 / (RRF_K + clara_rank[d]) + fuse / (RRF_K + first_rank[d]) for d in ids}
    return [(d, fused[d], first_rank[d]) for d in sorted(ids, key=lambda d: (-fused[d], first_rank[d]))]


def _hits(engine: Engine, build: Build, doc_ids: list[str], scores: dict[str, float],
          memories: dict[str, np.ndarray]) -> list[Hit]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT doc_id, title, body FROM documents WHERE corpus_version = :c "
                                 "AND doc_id = ANY(:ids)"), {"c": build.corpus_version, "ids": doc_ids}).all()
    docs = {r[0]: (r[1], r[2]) for r in rows}
    return [Hit(d, scores[d], *docs.get(d, ("", "")), memories[d]) for d in doc_ids]


def search(engine: Engine, build: Build, query: np.ndarray | None, k: int = 5, *, mode: str = "clara",
           candidates: int | None = None, text_query: str | None = None, dense_query: np.ndarray | None = None,
           fuse: float = 0.0, exact: bool = False, times: StageTimes | None = None) -> list[Hit]:
    """Top-k documents of ``build`` for a query memory tensor [n, hidden], best first. ``query=None``: no re-rank,
    the first stage's top k in its own order and scores (``clara.retrieval.rerank.use_rerank``).

    Args:
        mode: the first stage (``MODES``); ``text_query`` / ``dense_query`` as ``first_stage`` needs them.
        candidates: how many the first stage passes to the re-rank (default ``DEFAULT_CANDIDATES[mode]``).
        fuse: weight of the first-stage rank in the final score (0: the flattened cosine alone).
        exact: score every document of the build (brute force; for evaluation and for measuring recall).
        times: where to record each stage's milliseconds (``clara.retrieval.timing``).
    """
    if query is None and (exact or mode == "clara"):
        raise ValueError("exact search and mode 'clara' need the query reasoner's tensor (query)")
    query = None if query is None else _check_query(build, query)
    if k < 1:
        raise ValueError("k must be >= 1")
    if exact:
        return exact_search(engine, build, query, k)
    # as deep with or without the re-rank: hybrid's fusion depth follows n, so its top k stays what was measured
    n = max(candidates or DEFAULT_CANDIDATES.get(mode, 20), k)
    with timed(times, "first stage"):
        first = first_stage(engine, build, mode, n, query=query, text_query=text_query, dense_query=dense_query)
    if query is None:  # the first stage's order is the answer: only its top k are fetched
        first = first[:k]
    with timed(times, "candidate fetch"):
        mems, rows = candidates_of(engine, build, [d for d, _ in first])
    if query is None:
        ranked = [(d, score, i + 1) for i, (d, score) in enumerate(first) if d in mems]
    else:
        with timed(times, "re-rank"):
            ranked = rerank(query, first, mems, build.n_mem_max, fuse)[:k]
    return [Hit(d, score, *rows[d], mems[d], first_rank=r) for d, score, r in ranked]


def exact_search(engine: Engine, build: Build, query: np.ndarray, k: int, chunk: int = 2000) -> list[Hit]:
    """Brute-force flattened cosine over every document of the build, streamed in chunks."""
    heap: list[tuple[float, str]] = []
    kept: dict[str, np.ndarray] = {}
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(
            text("SELECT doc_id, n_mem, memory FROM memories WHERE build_id = :b"), {"b": build.id})
        for part in result.partitions():
            ids = [r[0] for r in part]
            mems = [decode_memory(r[2], r[1], build.hidden_size) for r in part]
            for d, m, sc in zip(ids, mems, flat_cosine_np(query, mems, build.n_mem_max).tolist()):
                if len(heap) < k:
                    heapq.heappush(heap, (sc, d))
                    kept[d] = m
                elif sc > heap[0][0]:
                    _, out = heapq.heappushpop(heap, (sc, d))
                    kept.pop(out, None)
                    kept[d] = m
    top = sorted(heap, reverse=True)
    return _hits(engine, build, [d for _, d in top], {d: s for s, d in top}, kept)
