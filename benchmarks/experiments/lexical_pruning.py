"""Impact-ordered BM25 pruning on the bundled corpus: what reading only each query term's M best postings costs in
recall, against exact BM25 (every posting) measured in the same run on the same store.

Self-contained (no model): the bundled corpus's passages go into a fresh store with a placeholder memory per
passage, because the lexical statistics belong to the corpus version, not to a model. Two query sets: each
article's human-written description (a seeded sample) and the hand-written dev set's questions. Per M: R@1/5/20,
the overlap of the top 20 with exact BM25's, and SQL latency p50/p99 (with the ratio to exact).

    python benchmarks/experiments/lexical_pruning.py --out benchmarks/results/experiments/lexical_pruning.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

EXACT = 10**9  # more postings than any corpus has: every posting is read
PER_TERM = (100, 250, 500, 1000, 2000, EXACT)


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", default=None, help="Default: a fresh embedded Postgres in a temp folder.")
    ap.add_argument("--descriptions", type=int, default=600)
    ap.add_argument("--dev", type=Path, default=Path("benchmarks/dev/natural_dev.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="smollm2-135m", help="Model preset whose passage length splits the corpus.")
    ap.add_argument("--out", type=Path, default=Path("runs/lexical_pruning.json"))
    args = ap.parse_args()

    from clara.data.corpus import ingest_corpus
    from clara.config import preset
    from clara.data.records import load_qa_records
    from clara.eval.datasets import description_retrieval
    from clara.store.builds import BuildWriter
    from clara.store.db import connect
    from clara.data.corpus import corpus_version_of
    from clara.store.search import first_stage

    url = args.database_url
    if url is None:
        from clara.store.server import embedded_server, sqlalchemy_url

        url = sqlalchemy_url(embedded_server(Path(tempfile.mkdtemp(prefix="clara-lex-")) / "pg").get_uri())
    engine = connect(url)
    docs, _ = ingest_corpus("bundled", preset(args.preset))  # the preset's passage length: the dev set's gold ids
    version = corpus_version_of(docs)
    t0 = time.perf_counter()
    placeholder = np.random.default_rng(args.seed).standard_normal((len(docs), 1, 8), dtype=np.float32)
    with BuildWriter.open(engine, "lexical-pruning-bench", 16, version, hidden_size=8, n_mem_max=1) as w:
        w.add_documents(version, ((d.id, d.title, d.text) for d in docs))
        w.add([d.id for d in docs], list(placeholder))
        build = w.publish()
    load_s = time.perf_counter() - t0
    article = {d.id: d.parent_id or d.id for d in docs}

    desc = description_retrieval(docs)
    sets = {"descriptions": random.Random(args.seed).sample(desc, min(args.descriptions, len(desc))),
            "dev": load_qa_records(args.dev)}
    result: dict = {"passages": len(docs), "corpus_version": version, "load_publish_seconds": load_s, "sets": {}}
    for name, qa in sets.items():
        exact_top: list[list[str]] = []
        rows = []
        for m in sorted(PER_TERM, reverse=True):  # exact first: the reference for the overlap
            recalls = {1: [], 5: [], 20: []}
            overlap, times = [], []
            for i, r in enumerate(qa):
                t = time.perf_counter()
                got = [d for d, _ in first_stage(engine, build, "lexical", 20, text_query=r.question,
                                                 postings_per_term=m)]
                times.append(time.perf_counter() - t)
                gold = set(r.gold_doc_ids)
                for k in recalls:
                    recalls[k].append(any(d in gold or article[d] in gold for d in got[:k]))
                if m == EXACT:
                    exact_top.append(got)
                overlap.append(len(set(got) & set(exact_top[i])) / max(1, len(exact_top[i])))
            rows.append({"postings_per_term": "exact" if m == EXACT else m,
                         **{f"R@{k}": 100.0 * statistics.mean(v) for k, v in recalls.items()},
                         "top20_overlap_with_exact": statistics.mean(overlap),
                         "ms_p50": percentile(times, 50), "ms_p99": percentile(times, 99)})
        base = rows[0]["ms_p50"]
        for row in rows:
            row["p50_vs_exact"] = row["ms_p50"] / base
        result["sets"][name] = {"questions": len(qa), "rows": rows}
        print(f"\n{name} ({len(qa)} questions, {len(docs)} passages)")
        print(f"{'M':>6} {'R@1':>6} {'R@5':>6} {'R@20':>6} {'overlap':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50/exact':>9}")
        for row in rows:
            print(f"{row['postings_per_term']!s:>6} {row['R@1']:6.1f} {row['R@5']:6.1f} {row['R@20']:6.1f} "
                  f"{row['top20_overlap_with_exact']:8.3f} {row['ms_p50']:8.2f} {row['ms_p99']:8.2f} "
                  f"{row['p50_vs_exact']:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
