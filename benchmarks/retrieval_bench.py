"""Retrieval benchmark: every first stage and CLaRa's re-rank on the same questions, in one run, from one store.

Two query sets over one corpus: each article's human-written description -> that article (a seeded sample; any
passage of the article counts), and the hand-written natural-question dev set (retrieval only; its answers are
not used). Rows: BM25 and MiniLM in memory; the store's lexical (Postgres BM25), dense (MiniLM in pgvector), hybrid
(RRF) and clara (ANN over mean memory vectors) first stages, alone and re-ranked by the query reasoner; then
hybrid + re-rank with the first-stage rank fused in at several weights (the ``+rerank`` rows are fuse 0).
R@1/5/20 and per-question latency (p50/p99), all measured in this run. A checkpoint without E2E uses its compressor as the query reasoner.

    python benchmarks/retrieval_bench.py CHECKPOINT --descriptions 1000 --out benchmarks/results/retrieval.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

FUSE_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def run(checkpoint: str, *, corpus: str = "bundled", descriptions: int = 1000, dev: Path | None = None,
        database_url: str | None = None, seed: int = 0, corpus_limit: int | None = None,
        out_dir: Path) -> dict[str, Any]:
    from clara.data.corpus import ingest_corpus
    from clara.data.records import QARecord, load_qa_records
    from clara.retrieval.dense import DenseEncoder
    from clara.eval.datasets import description_retrieval, subsample
    from clara.eval.run import EvalConfig, evaluate
    from clara.model.checkpoint import load_checkpoint
    from clara.store.db import connect
    from clara.data.corpus import corpus_version_of
    from clara.store.loading import index_corpus

    t0 = time.perf_counter()
    model = load_checkpoint(checkpoint)
    docs, _ = ingest_corpus(corpus, model.cfg)
    dev_qa = [QARecord(r.id, r.question, [], r.gold_doc_ids) for r in load_qa_records(dev)] if dev else []
    if corpus_limit is not None:  # a seeded cut that keeps every dev gold passage; descriptions follow the cut
        _, docs = subsample(dev_qa, docs, None, corpus_limit, seed)
    engine = connect(database_url)
    build = index_corpus(engine, model, docs, model_uri=str(Path(checkpoint).resolve()),
                         corpus_version=corpus_version_of(docs), dense=DenseEncoder(), reuse=True)
    build_s = time.perf_counter() - t0
    sets: dict[str, list[QARecord]] = {}
    desc = description_retrieval(docs)
    sets["descriptions"] = random.Random(seed).sample(desc, min(descriptions, len(desc)))
    if dev is not None:  # retrieval only: the answers are dropped above, so nothing is generated
        sets["dev"] = dev_qa
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "corpus_passages": len(docs),
                              "articles": len({d.parent_id or d.id for d in docs}), "build_id": build.id,
                              "build_seconds": build_s, "sets": {}}
    for name, qa in sets.items():
        rows = evaluate(qa, docs, {model.cfg.compression_rate: model}, out_dir / name,
                        # every clara row re-ranks, whatever the product default decides for this checkpoint
                        EvalConfig(settings=("normal",), mode="hybrid", fuse=FUSE_WEIGHTS[0], closed_book=False,
                                   rerank="always"),
                        stores={model.cfg.compression_rate: (engine, build)})
        table = [_slim(r) for r in rows if r["setting"] in ("normal", "retrieval")]
        for w in FUSE_WEIGHTS[1:]:
            fused = evaluate(qa, docs, {model.cfg.compression_rate: model}, out_dir / f"{name}-fuse{w}",
                             EvalConfig(settings=(), mode="hybrid", fuse=w, baselines=(), closed_book=False,
                                        retrieval_modes=("hybrid",)),
                             stores={model.cfg.compression_rate: (engine, build)})
            table += [{**_slim(r), "retriever": f"hybrid+rerank fuse={w}"} for r in fused
                      if r["retriever"] == "hybrid+rerank"]
        result["sets"][name] = {"questions": len(qa), "rows": table}
    result["store_sql_ms"] = sql_latency(engine, build, model, [r.question for r in sets["descriptions"]][:300])
    result["seconds"] = time.perf_counter() - t0
    return result


def sql_latency(engine, build, model, questions: Sequence[str], n: int = 20) -> dict[str, dict[str, float]]:
    """The candidate stage alone: one first-stage SQL query per question with its vectors computed beforehand
    (the rows above also count encoding the question). p50/p99 in ms per mode."""
    import numpy as np

    from clara.retrieval.dense import DenseEncoder
    from clara.store.search import MODES, first_stage

    dense = DenseEncoder().embed(list(questions))
    tensors = [q.float().cpu().numpy() for q in model.encode_queries(list(questions))]
    out = {}
    for mode in MODES:
        times = []
        for q, d, t in zip(questions, dense, tensors):
            t0 = time.perf_counter()
            first_stage(engine, build, mode, n, query=t, text_query=q, dense_query=d)
            times.append((time.perf_counter() - t0) * 1000.0)
        out[mode] = {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)),
                     "queries": len(times), "candidates": n}
    return out


def _slim(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("system", "retriever", "setting", "n", "recall@1", "recall@5", "recall@20", "retrieval_ms_p50",
            "retrieval_ms_p99", "query_reasoner")
    return {k: r.get(k) for k in keep}


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for name, s in result["sets"].items():
        lines += ["", f"### {name}: {s['questions']} questions, {result['corpus_passages']} passages "
                      f"({result['articles']} articles)", "",
                  "| system | R@1 | R@5 | R@20 | ms p50 | ms p99 |", "|---|---|---|---|---|---|"]
        for r in s["rows"]:
            label = f"{r['system']} {r['retriever']}" if r["system"] != "raw-text" else f"in-memory {r['retriever']}"
            cells = [f"{100 * r[k]:.1f}" if r[k] is not None else "–" for k in ("recall@1", "recall@5", "recall@20")]
            cells += [f"{r[k]:.1f}" if r[k] is not None else "–" for k in ("retrieval_ms_p50", "retrieval_ms_p99")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Store, candidate stage alone (SQL, vectors precomputed), {result['corpus_passages']} passages:", "",
              "| mode | ms p50 | ms p99 |", "|---|---|---|"]
    lines += [f"| {m} | {v['p50']:.1f} | {v['p99']:.1f} |" for m, v in result["store_sql_ms"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--corpus", default="bundled")
    ap.add_argument("--descriptions", type=int, default=1000, help="Seeded sample of description queries.")
    ap.add_argument("--dev", default=str(Path(__file__).parent / "dev" / "natural_dev.jsonl"),
                    help="Natural-question dev set ('none' to skip).")
    ap.add_argument("--corpus-limit", type=int, default=None,
                    help="A seeded cut of the corpus to N passages that keeps every dev gold passage (faster builds).")
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--work", type=Path, default=Path("runs/retrieval_bench"), help="Evaluation reports.")
    ap.add_argument("--out", type=Path, default=None, help="JSON result.")
    args = ap.parse_args(argv)
    dev = None if args.dev.lower() == "none" else Path(args.dev)
    result = run(args.checkpoint, corpus=args.corpus, descriptions=args.descriptions, dev=dev,
                 database_url=args.database_url, corpus_limit=args.corpus_limit, out_dir=args.work)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
