"""Whole-corpus retrieval: ANN over the compact per-document vector, then the paper's exact flattened cosine.

Stage 1 asks the build's partial HNSW index for the ``candidates`` nearest documents by the mean memory vector
(halfvec cosine, or Hamming distance over the binary-quantised vector above 4,000 dimensions). Stage 2 decodes
those documents' memory tensors and re-scores them with the cosine between flattened [n, hidden] tensors, the
score CLaRa trains (spec section 7). ``exact=True`` skips stage 1 and scores every document of the build.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, text

from clara.store.builds import Build, StoreError


@dataclass
class Hit:
    doc_id: str
    score: float
    title: str
    text: str
    memory: np.ndarray
    """[n_mem, hidden] float32, ready to hand to the generator."""


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


def ann_candidates(engine: Engine, build: Build, query: np.ndarray, candidates: int) -> list[str]:
    """Stage 1: document ids of the ``candidates`` nearest mean vectors, from the build's HNSW index."""
    query = _check_query(build, query)
    q_mean = query.mean(0)
    # The expression must match the partial index's exactly; its dimension comes from our own build row.
    if build.ann_kind == "halfvec":
        order = f"{build.ann_expr} <=> CAST(:q AS halfvec({int(build.hidden_size)}))"
    else:
        order = f"{build.ann_expr} <~> binary_quantize(CAST(:q AS vector({int(build.hidden_size)})))"
    with engine.begin() as conn:
        # Custom plans so the planner sees the literal build id and can use that build's partial index.
        conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        conn.execute(text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": str(max(40, candidates))})
        rows = conn.execute(text(f"SELECT doc_id FROM memories WHERE build_id = CAST(:b AS bigint) "
                                 f"ORDER BY {order} LIMIT :n"),
                            {"b": build.id, "q": "[" + ",".join(f"{x:.7g}" for x in q_mean) + "]",
                             "n": candidates}).all()
    return [r[0] for r in rows]


def _hits(engine: Engine, build: Build, doc_ids: list[str], scores: dict[str, float],
          memories: dict[str, np.ndarray]) -> list[Hit]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT doc_id, title, body FROM documents WHERE corpus_version = :c "
                                 "AND doc_id = ANY(:ids)"), {"c": build.corpus_version, "ids": doc_ids}).all()
    docs = {r[0]: (r[1], r[2]) for r in rows}
    return [Hit(d, scores[d], *docs.get(d, ("", "")), memories[d]) for d in doc_ids]


def search(engine: Engine, build: Build, query: np.ndarray, k: int = 5, candidates: int = 100,
           exact: bool = False) -> list[Hit]:
    """Top-k documents of ``build`` for a query memory tensor [n, hidden], best first.

    Args:
        candidates: how many the ANN stage passes to the exact re-score (ignored with ``exact``).
        exact: score every document of the build (brute force; for evaluation and for measuring recall).
    """
    query = _check_query(build, query)
    if k < 1:
        raise ValueError("k must be >= 1")
    if exact:
        return exact_search(engine, build, query, k)
    ids = ann_candidates(engine, build, query, max(candidates, k))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT doc_id, n_mem, memory FROM memories WHERE build_id = :b "
                                 "AND doc_id = ANY(:ids)"), {"b": build.id, "ids": ids}).all()
    mems = {r[0]: decode_memory(r[2], r[1], build.hidden_size) for r in rows}
    order = list(mems)
    s = flat_cosine_np(query, [mems[d] for d in order], build.n_mem_max)
    scores = dict(zip(order, s.tolist()))
    top = sorted(order, key=lambda d: -scores[d])[:k]
    return _hits(engine, build, top, scores, mems)


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
