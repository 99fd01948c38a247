"""pgvector store benchmark: load throughput, search latency and ANN-stage recall, with same-run baselines.

Baselines measured in the same run: row-by-row INSERT vs binary COPY (load), exact brute-force search vs
ANN + re-score (latency), exact top-10 vs what the ANN stage hands to the re-score (recall).

    python benchmarks/store_bench.py --docs 10000 --scale-rows 1000000 --out runs/store_bench.json
    python benchmarks/store_bench.py --model runs/bench/scp --real-docs 1000   # real compressed vectors too
    python benchmarks/store_bench.py --docs 0 --scale-rows 0 --hybrid-rows 1000000   # first stages at scale
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

from clara.store.builds import BuildWriter
from clara.store.db import connect
from clara.store.search import LEXICAL_POSTINGS_PER_TERM, first_stage, search


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def load_random(engine, key, n_docs, n_mem, hidden, seed, batch=2000, publish=True):
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with BuildWriter.open(engine, *key, hidden_size=hidden, n_mem_max=n_mem) as w:
        w.add_documents(key[2], ((f"d{i}", f"title {i}", f"body {i}") for i in range(n_docs)))
        t_docs = time.perf_counter()
        for s in range(0, n_docs, batch):
            n = min(batch, n_docs - s)
            mems = rng.standard_normal((n, n_mem, hidden), dtype=np.float32)
            w.add([f"d{i}" for i in range(s, s + n)], list(mems))
        t_load = time.perf_counter()
        build = w.publish(maintenance_work_mem="2GB") if publish else w.build
        t_index = time.perf_counter()
    return build, {"load_rows_per_s": n_docs / (t_load - t_docs), "load_seconds": t_load - t_docs,
                   "index_seconds": t_index - t_load, "documents_copy_seconds": t_docs - t0}


def insert_baseline(engine, n_rows, n_mem, hidden, seed):
    """Row-by-row INSERT of the same kind of rows (the baseline for binary COPY)."""
    rng = np.random.default_rng(seed)
    key = (f"bench-insert-{seed}", 16, "insert")
    with BuildWriter.open(engine, *key, hidden_size=hidden, n_mem_max=n_mem) as w:
        t0 = time.perf_counter()
        with w.raw.cursor() as cur:
            for i in range(n_rows):
                m = rng.standard_normal((n_mem, hidden), dtype=np.float32)
                cur.execute("INSERT INTO memories (build_id, doc_id, n_mem, memory, ann) VALUES (%s, %s, %s, %s, %s)",
                            (w.build.id, f"i{i}", n_mem, m.astype("<f2").tobytes(), m.mean(0)))
        w.raw.commit()
        return n_rows / (time.perf_counter() - t0)


def query_stats(engine, build, queries, k=5, candidates=100, exact_queries=None, sources=None):
    """Latency and recall. ``sources``: for queries made from a stored document, that document's id; on random
    vectors the planted source is the only meaningful neighbour (the rest of an exact top-10 is noise)."""
    ann_t, exact_t, recall_ann, recall_final, planted_top1, planted_cand = [], [], [], [], [], []
    exact_queries = len(queries) if exact_queries is None else exact_queries
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        hits = search(engine, build, q, k=k, candidates=candidates)
        ann_t.append(time.perf_counter() - t0)
        if sources is not None:
            planted_top1.append(float(hits[0].doc_id == sources[i]))
            cands = {d for d, _ in first_stage(engine, build, "clara", candidates, query=q)}
            planted_cand.append(float(sources[i] in cands))
        if i < exact_queries:
            t0 = time.perf_counter()
            exact = search(engine, build, q, k=10, exact=True)
            exact_t.append(time.perf_counter() - t0)
            truth = {h.doc_id for h in exact}
            cands = {d for d, _ in first_stage(engine, build, "clara", candidates, query=q)}
            recall_ann.append(len(truth & cands) / len(truth))
            recall_final.append(len({h.doc_id for h in hits} & {h.doc_id for h in exact[:k]}) / k)
    out = {"queries": len(queries), "k": k, "candidates": candidates,
           "search_ms_p50": percentile(ann_t, 50), "search_ms_p99": percentile(ann_t, 99),
           "exact_ms_p50": percentile(exact_t, 50) if exact_t else None,
           "exact_ms_p99": percentile(exact_t, 99) if exact_t else None,
           "ann_stage_recall@10": statistics.mean(recall_ann) if recall_ann else None,
           f"final_top{k}_overlap_with_exact": statistics.mean(recall_final) if recall_final else None}
    if exact_t:
        out["speedup_vs_exact"] = statistics.median(exact_t) / statistics.median(ann_t)
    if sources is not None:
        out["planted_in_ann_candidates"] = statistics.mean(planted_cand)
        out["planted_top1_after_rescore"] = statistics.mean(planted_top1)
    return out


def perturbed_queries(engine, build, n, noise, seed):
    """Queries near stored documents: a document's memory plus noise (random vectors have no other structure)."""
    rng = np.random.default_rng(seed)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT doc_id, n_mem, memory FROM memories WHERE build_id = :b "
                                 "ORDER BY random() LIMIT :n"),
                            {"b": build.id, "n": n}).all()
    out, ids = [], []
    for doc_id, n_mem, blob in rows:
        m = np.frombuffer(blob, dtype="<f2").reshape(n_mem, build.hidden_size).astype(np.float32)
        out.append(m + noise * rng.standard_normal(m.shape).astype(np.float32))
        ids.append(doc_id)
    return out, ids


def real_vectors(engine, model_path, n_docs, n_queries):
    from clara.data.corpus import ingest_bundled
    from clara.model.checkpoint import load_checkpoint
    from clara.store.loading import index_corpus

    model = load_checkpoint(model_path, device="cpu")
    docs = [d for d in ingest_bundled()[0] if d.parent_id is None and d.meta.get("description")][:n_docs]
    t0 = time.perf_counter()
    build = index_corpus(engine, model, docs, model_uri=str(model_path), corpus_version=f"bench-real-{n_docs}")
    seconds = time.perf_counter() - t0
    questions = [d.meta["description"] for d in docs[:n_queries]]
    queries = [q.float().numpy() for q in model.encode_queries(questions)]
    stats = query_stats(engine, build, queries)
    # Retrieval quality of the description -> article test (gold = the article the description belongs to).
    gold_hits = 0
    for d, q in zip(docs[:n_queries], queries):
        gold_hits += d.id in {h.doc_id for h in search(engine, build, q, k=5, candidates=100)}
    stats.update({"docs": len(docs), "compress_and_load_seconds": seconds, "docs_per_s": len(docs) / seconds,
                  "description_to_article_recall@5": gold_hits / len(queries)})
    return stats


def hybrid_scale(engine, rows: int, dim: int = 384, words: int = 12, vocab: int = 50_000, n_queries: int = 100,
                 seed: int = 6, batch: int = 20_000) -> dict:
    """The dense, lexical and hybrid first stages over ``rows`` random documents: random unit vectors, and texts of
    Zipf-distributed synthetic words (a few frequent words and a long tail, as in natural text) so that BM25's
    posting lists have realistic lengths. Load, index and per-query SQL latency (p50/p99, 20 candidates)."""
    rng = np.random.default_rng(seed)

    def texts(n):
        return [" ".join(f"w{int(i)}" for i in row) for row in rng.zipf(1.3, size=(n, words)) % vocab]

    def unit(n):
        v = rng.standard_normal((n, dim), dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    version = f"hybrid-scale-{rows}-{seed}"
    t0 = time.perf_counter()
    with BuildWriter.open(engine, f"bench-hybrid-{rows}", 16, version, hidden_size=8, n_mem_max=1,
                          dense_model="random", dense_dim=dim) as w:
        for s in range(0, rows, batch):
            n = min(batch, rows - s)
            w.add_documents(version, ((f"d{s + i}", "", t) for i, t in enumerate(texts(n))))
        t_docs = time.perf_counter()
        for s in range(0, rows, batch):
            n = min(batch, rows - s)
            w.add([f"d{s + i}" for i in range(n)], list(rng.standard_normal((n, 1, 8), dtype=np.float32)),
                  dense=unit(n))
        t_load = time.perf_counter()
        build = w.publish(maintenance_work_mem="2GB")
        t_pub = time.perf_counter()
    out = {"rows": rows, "dense_dim": dim, "words_per_doc": words, "vocab": vocab,
           "documents_seconds": t_docs - t0, "memories_dense_copy_seconds": t_load - t_docs,
           "publish_seconds (HNSW x2 + BM25 statistics)": t_pub - t_load}
    questions = texts(n_queries)
    qvec = unit(n_queries)
    # Lexical runs twice: pruned (the default, LEXICAL_POSTINGS_PER_TERM best postings per term) and exact (every
    # posting, the baseline), with the overlap of their top 20s.
    tops: dict[str, list[set[str]]] = {}
    for name, mode, per_term in (("dense", "dense", None), ("lexical", "lexical", None),
                                 ("lexical_exact", "lexical", 10**9), ("hybrid", "hybrid", None)):
        times, tops[name] = [], []
        for q, v in zip(questions, qvec):
            t = time.perf_counter()
            got = first_stage(engine, build, mode, 20, text_query=" ".join(q.split()[:4]), dense_query=v,
                              **({"postings_per_term": per_term} if per_term else {}))
            times.append(time.perf_counter() - t)
            tops[name].append({d for d, _ in got})
        out[f"{name}_ms_p50"], out[f"{name}_ms_p99"] = percentile(times, 50), percentile(times, 99)
    out["lexical_postings_per_term"] = LEXICAL_POSTINGS_PER_TERM
    out["lexical_p50_speedup_vs_exact"] = out["lexical_exact_ms_p50"] / out["lexical_ms_p50"]
    out["lexical_top20_overlap_with_exact"] = float(np.mean([len(a & b) / max(1, len(b)) for a, b in
                                                            zip(tops["lexical"], tops["lexical_exact"])]))
    with engine.connect() as conn:
        out["postings"] = conn.execute(text("SELECT count(*) FROM lexical_postings WHERE corpus_version = :c"),
                                       {"c": version}).scalar()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--n-mem", type=int, default=8)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--scale-rows", type=int, default=1_000_000)
    ap.add_argument("--scale-hidden", type=int, default=64)
    ap.add_argument("--scale-n-mem", type=int, default=4)
    ap.add_argument("--scale-exact-queries", type=int, default=10)
    ap.add_argument("--model", type=Path, default=None, help="SCP checkpoint for real compressed vectors")
    ap.add_argument("--real-docs", type=int, default=1000)
    ap.add_argument("--hybrid-rows", type=int, default=0, help="Random rows for the first stages at scale.")
    ap.add_argument("--out", type=Path, default=Path("runs/store_bench.json"))
    args = ap.parse_args()

    url = args.database_url
    if url is None:
        from clara.store.server import embedded_server, sqlalchemy_url

        url = sqlalchemy_url(embedded_server(Path(tempfile.mkdtemp(prefix="clara-bench-")) / "pg").get_uri())
    engine = connect(url)
    tag = str(int(time.time()))
    results: dict = {"hidden": args.hidden, "n_mem": args.n_mem}

    if args.docs:
        insert_rps = insert_baseline(engine, 2000, args.n_mem, args.hidden, seed=1)
        build, load = load_random(engine, (f"bench-{tag}", 16, "random-10k"), args.docs, args.n_mem, args.hidden,
                                  2)
        load["insert_rows_per_s"] = insert_rps
        load["copy_vs_insert"] = load["load_rows_per_s"] / insert_rps
        queries, sources = perturbed_queries(engine, build, args.queries, 0.5, 3)
        results["random_10k"] = {"docs": args.docs, **load,
                                 **query_stats(engine, build, queries, sources=sources)}
        print(json.dumps(results, indent=2), flush=True)

    if args.model is not None:
        results["real_compressed"] = real_vectors(engine, args.model, args.real_docs, min(args.queries, 100))
        print(json.dumps(results["real_compressed"], indent=2), flush=True)

    if args.scale_rows:
        build, load = load_random(engine, (f"bench-scale-{tag}", 16, "random-scale"), args.scale_rows,
                                  args.scale_n_mem, args.scale_hidden, 4, batch=10_000)
        q, src = perturbed_queries(engine, build, 50, 0.5, 5)
        results["scale"] = {"rows": args.scale_rows, "hidden": args.scale_hidden, "n_mem": args.scale_n_mem,
                            **load, **query_stats(engine, build, q, exact_queries=args.scale_exact_queries,
                                                  sources=src)}
        with engine.connect() as conn:
            results["scale"]["table_bytes"] = conn.execute(
                text("SELECT pg_total_relation_size('memories')")).scalar()
    if args.hybrid_rows:
        results["hybrid_scale"] = hybrid_scale(engine, args.hybrid_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
