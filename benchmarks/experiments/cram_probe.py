"""Diagnostic: can the generator read memory vectors at all? Optimise the memory vectors of 4 held-out passages
directly (no compressor; Adam on the vectors), with a checkpoint's generator adapter (or ``none``: the bare base),
and print the reconstruction CE every 10 steps. If it falls far below what the compressor's vectors give, the
generator can read and the compressor is the limit (docs/quality.md, "Where the limit is not").

    python benchmarks/experiments/cram_probe.py CHECKPOINT generator|none STEPS LR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # quality_probe, a product benchmark


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="A CLaRa checkpoint folder.")
    ap.add_argument("adapter", choices=["generator", "none"], help="Read with the generator adapter or the bare base.")
    ap.add_argument("steps", type=int, help="Adam steps on the memory vectors.")
    ap.add_argument("lr", type=float, help="Adam's learning rate.")
    args = ap.parse_args(argv)

    import torch

    from clara.data.corpus import ingest_corpus
    from clara.data.mixes import heldout
    from clara.model.checkpoint import load_checkpoint
    from quality_probe import first_articles

    adapter = None if args.adapter == "none" else args.adapter
    model = load_checkpoint(args.checkpoint)
    docs, _ = ingest_corpus("bundled", model.cfg)
    held = [d for d in first_articles(docs, 2000) if heldout(d)][:4]
    texts = [p.full_text for p in held]
    targets = [model.prompter.target_ids(t, 1024) for t in texts]
    mems = model.compress(texts)
    rows = [model.prompter.paraphrase_prompt(m.shape[0]) for m in mems]
    model.set_trainable([], special=False)
    vecs = [torch.nn.Parameter(m.detach().float().clone()) for m in mems]
    opt = torch.optim.Adam(vecs, lr=args.lr)
    model.peft.eval()
    t0 = time.time()
    for step in range(args.steps + 1):
        with model.adapter(adapter):
            loss = model.response_loss(rows, targets, [[v] for v in vecs])
        if step % 10 == 0:
            print(json.dumps({"step": step, "ce": round(loss.item(), 3),
                              "norm": round(vecs[0].norm(dim=-1).mean().item(), 1),
                              "s": round(time.time() - t0)}), flush=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
