"""One SCP recipe, measured where it matters: train stage 1 on reconstruction of every non-held-out passage for a
fixed number of steps, then the quality probe's part (a) on held-out passages (memory CE beside no document and
the raw document, and the share of that gap the memory closes). Run it once per variant and compare the JSON:

    python benchmarks/experiments/scp_recipe.py --name base --lr 5e-4 --rank 16 --rate 16 --steps 50 \
        --out benchmarks/results/experiments/scp_recipe/base.json

Everything but the named knobs is the pipeline's: SmolLM2-135M, 128-token passages, batch 8, bf16 autocast where
the CPU has it, MSE weight 0.1. Checkpoints go to ``--work`` (resumable); the JSON holds the probe numbers, the
mean training CE of the first and last 10 steps and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--rate", type=int, default=16, help="compression rate")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--work", type=Path, default=None, help="training folder (default: the cache folder)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality_probe import first_articles, reconstruction

    from clara.data.corpus import ingest_corpus
    from clara.config import LoraSettings, OptimSettings, SCPConfig, TrainConfig, preset
    from clara.data.mixes import heldout, reconstruction_rows
    from clara.data.records import parse_scp_record
    from clara.model.base import cache_dir
    from clara.model.clara_model import ClaraModel
    from clara.training.scp import train_scp

    cfg = preset("smollm2-135m", compression_rate=args.rate,
                 lora=LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.1))
    docs, _ = ingest_corpus("bundled", cfg)
    records = [parse_scp_record(row, f"reconstruction row {i}")
               for i, row in enumerate(reconstruction_rows(d for d in docs if not heldout(d)))]
    held = [d for d in first_articles(docs, 2000) if heldout(d)][: args.heldout]
    model = ClaraModel.build(cfg)
    work = args.work or cache_dir() / "scp_recipe" / args.name
    t0 = time.time()
    train = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, checkpoint_every=25,
                        optim=OptimSettings(lr=args.lr))
    train_scp(model, records, SCPConfig(model=cfg, train=train), work, progress=False)
    train_s = time.time() - t0
    probe = reconstruction(model, held)
    ce = [json.loads(line)["ce"] for line in (work / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]
    result = {"name": args.name, "lr": args.lr, "rank": args.rank, "rate": args.rate, "steps": args.steps,
              "batch_size": args.batch_size, "train_s": round(train_s), **probe,
              "train_ce_first10": sum(ce[:10]) / max(1, len(ce[:10])),
              "train_ce_last10": sum(ce[-10:]) / max(1, len(ce[-10:]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
