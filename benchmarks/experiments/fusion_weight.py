"""What weight of the dense list in the hybrid first stage's reciprocal-rank fusion keeps hybrid at or above its
best single stage, on the article descriptions and the dev set (retrieval only).

A weight picked on ``retrieval_bench.py``'s sample of descriptions is checked on the descriptions it left
out (``descriptions held out``). Reads the store's dense and lexical first stages once per question (each
2 x 20 deep, as the served hybrid fuses them), fuses them here for each weight with the store's own formula and
tie-break, and checks that weight 1 reproduces the store's ``hybrid`` order. Same build as
``retrieval_bench.py`` (``--corpus-limit``; found, not rebuilt, when that benchmark ran with the same checkpoint).

    python benchmarks/experiments/fusion_weight.py releases/clara-smollm2-r16 --corpus-limit 2000 \
        --descriptions 300 --out benchmarks/results/experiments/fusion_weight.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Sequence

WEIGHTS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
"""Weight of the dense list (the lexical list keeps 1)."""


def fuse(dense: Sequence[str], lexical: Sequence[str], weight: float, n: int) -> list[str]:
    """The store's hybrid formula (``clara.store.search.first_stage``) with the dense term weighted: score =
    weight / (60 + dense rank) + 1 / (60 + lexical rank), ties by doc_id."""
    from clara.store.search import RRF_K

    score: dict[str, float] = {}
    for r, d in enumerate(dense, 1):
        score[d] = score.get(d, 0.0) + weight / (RRF_K + r)
    for r, d in enumerate(lexical, 1):
        score[d] = score.get(d, 0.0) + 1.0 / (RRF_K + r)
    return sorted(score, key=lambda d: (-score[d], d))[:n]


def run(checkpoint: str, corpus_limit: int | None, descriptions: int, dev: Path, seed: int = 0,
        build_id: int | None = None) -> dict[str, Any]:
    from clara.data.corpus import corpus_version_of, ingest_corpus
    from clara.data.records import QARecord, load_qa_records
    from clara.eval.datasets import description_retrieval, subsample
    from clara.eval.run import RECALL_AT, Gold, _Acc
    from clara.model.checkpoint import load_checkpoint
    from clara.retrieval.dense import DenseEncoder
    from clara.store.builds import ready_build
    from clara.store.db import connect
    from clara.store.search import DEFAULT_CANDIDATES, first_stage

    model = load_checkpoint(checkpoint)
    docs, _ = ingest_corpus("bundled", model.cfg)
    dev_qa = [QARecord(r.id, r.question, [], r.gold_doc_ids) for r in load_qa_records(dev)]
    if corpus_limit is not None:  # the cut retrieval_bench.py makes
        _, docs = subsample(dev_qa, docs, None, corpus_limit, seed)
    engine = connect()
    version = corpus_version_of(docs)
    if build_id is None:
        build = ready_build(engine, model_uri=str(Path(checkpoint).resolve()), corpus_version=version)
    else:  # ready_build reads a given id without filters: check its corpus here
        build = ready_build(engine, build_id)
        if build.corpus_version != version:
            raise SystemExit(f"build {build.id} holds corpus {build.corpus_version}, not {version}")
    desc = description_retrieval(docs)
    picked = random.Random(seed).sample(desc, min(descriptions, len(desc)))  # retrieval_bench.py's sample
    # the descriptions that sample left out: a weight chosen on the sample is checked on questions it never saw
    chosen = {p.id for p in picked}
    rest = [r for r in desc if r.id not in chosen]
    sets = {"descriptions": picked, "dev": dev_qa, "descriptions held out": rest}
    gold, encoder = Gold(docs), DenseEncoder()
    n = DEFAULT_CANDIDATES["hybrid"]
    out: dict[str, Any] = {"checkpoint": checkpoint, "build_id": build.id, "corpus_passages": len(docs),
                           "depth": 2 * n, "weights": list(WEIGHTS), "sets": {}}
    for name, qa in sets.items():
        vectors = encoder.embed([r.question for r in qa])
        accs = {w: _Acc() for w in WEIGHTS}
        singles = {"dense": _Acc(), "lexical": _Acc()}
        anchored = _Acc()
        mismatched = 0
        for r, v in zip(qa, vectors):
            dense = [d for d, _ in first_stage(engine, build, "dense", 2 * n, dense_query=v)]
            lexical = [d for d, _ in first_stage(engine, build, "lexical", 2 * n, text_query=r.question)]
            store = [d for d, _ in first_stage(engine, build, "hybrid", n, text_query=r.question, dense_query=v)]
            mismatched += fuse(dense, lexical, 1.0, n)[:5] != store[:5]
            gold.recalls(r, dense, singles["dense"])
            gold.recalls(r, lexical, singles["lexical"])
            for w in WEIGHTS:
                gold.recalls(r, fuse(dense, lexical, w, n), accs[w])
            # dense's top n as the set, the fusion's order inside it: never below dense at any depth <= n
            order = {d: i for i, d in enumerate(fuse(dense, lexical, 1.0, 4 * n))}
            gold.recalls(r, sorted(dense[:n], key=lambda d: order[d]), anchored)

        def recalls(acc) -> dict[str, float]:
            return {f"recall@{k}": sum(acc.recalls[k]) / len(acc.recalls[k]) for k in RECALL_AT if k <= n}

        out["sets"][name] = {"questions": len(qa), "store_top5_differs_at_weight_1": mismatched,
                             **{m: recalls(a) for m, a in singles.items()},
                             **{f"hybrid w={w}": recalls(a) for w, a in accs.items()},
                             "dense set, hybrid order": recalls(anchored)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--corpus-limit", type=int, default=None)
    ap.add_argument("--descriptions", type=int, default=300)
    ap.add_argument("--dev", type=Path, default=Path(__file__).parents[1] / "dev" / "natural_dev.jsonl")
    ap.add_argument("--build-id", type=int, default=None,
                    help="Read this ready build (first stages only: its memory vectors are never read, so a "
                         "--random-memory build of the same corpus serves).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args.checkpoint, args.corpus_limit, args.descriptions, args.dev, build_id=args.build_id)
    for name, s in result["sets"].items():
        print(f"{name} ({s['questions']} questions; store hybrid top 5 differs from weight 1 on "
              f"{s['store_top5_differs_at_weight_1']})")
        for row, rec in s.items():
            if isinstance(rec, dict):
                print(f"  {row:14s} " + "  ".join(f"R@{k.split('@')[1]} {100 * v:5.1f}" for k, v in rec.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
