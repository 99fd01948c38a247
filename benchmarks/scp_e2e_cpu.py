"""SCP then a short E2E run with a real base model on the bundled Wikipedia summaries; writes JSON results.

Until the synthesis stage lands, the training data is made honestly from the corpus itself (no teacher):
- reconstruction ("paraphrase" records whose target is the document itself, under the rewording instructions);
- QA from human-written fields: "What is <title>?" -> the article's Wikipedia description, and
  "Which topic does <title> belong to?" -> its Vital-Articles topic.
E2E questions: "Which article is described as '<description>'?" -> the title, gold = that article.

Reported, all measured in this run: held-out reconstruction loss (nats/token, given only memory tokens) of the
untrained and the trained compressor, beside two references with the bare base model — no document at all and
the raw document in the prompt; SCP steps/s; documents compressed per second; E2E Recall@k before/after.

    python benchmarks/scp_e2e_cpu.py --preset smollm2-135m --train-docs 400 --scp-steps 150 --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from clara.config import E2EConfig, OptimSettings, SCPConfig, TrainConfig, preset
from clara.data.records import QARecord, SCPRecord
from clara.data.wiki import load_wiki_summaries
from clara.model import ClaraModel, prompts
from clara.model.topk import flat_unit
from clara.training.e2e import compress_pool, selection_recall, train_e2e
from clara.training.scp import train_scp


def doc_text(row: dict) -> str:
    return f"{row['title']}\n{row['text']}"


def scp_records(rows: list[dict]) -> list[SCPRecord]:
    out = []
    for r in rows:
        doc = doc_text(r)
        out.append(SCPRecord("paraphrase", [], [r["text"]], [doc]))
        qs, ans = [], []
        if r["description"]:
            qs.append(f"What is {r['title']}?")
            ans.append(r["description"])
        if r["topic"] and r["topic"] != "Uncategorized":
            qs.append(f"Which topic does {r['title']} belong to?")
            ans.append(r["topic"])
        if qs:
            out.append(SCPRecord("qa", qs, ans, [doc]))
    return out


@torch.no_grad()
def reconstruction_loss(model: ClaraModel, rows: list[dict], mode: str, max_target_len: int = 128) -> float:
    """Mean nats/token of regenerating each document's text.

    mode: ``memory`` (generator + compressed doc), ``raw`` (bare base, document as text), ``none`` (bare base,
    no document).
    """
    model.peft.eval()
    losses, weights = [], []
    for s in range(0, len(rows), 4):
        batch = rows[s : s + 4]
        targets = [model.target_ids(r["text"], max_target_len) for r in batch]
        if mode == "memory":
            mems = model.compress([doc_text(r) for r in batch])
            rows_ids = [model.prompt_ids(prompts.PARAPHRASE_USER[0].replace("{documents}",
                                                                           model.placeholders(m.shape[0])))
                        for m in mems]
            with model.adapter("generator"):
                loss = model.response_loss(rows_ids, targets, [[m] for m in mems])
        else:
            rows_ids = [model.prompt_ids(prompts.PARAPHRASE_USER[0].replace(
                "{documents}", doc_text(r) if mode == "raw" else "")) for r in batch]
            with model.adapter(None):
                loss = model.response_loss(rows_ids, targets, [[] for _ in batch])
        n = sum(len(t) for t in targets)
        losses.append(loss.item() * n)
        weights.append(n)
    return sum(losses) / sum(weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--rate", type=int, default=16)
    ap.add_argument("--train-docs", type=int, default=400)
    ap.add_argument("--heldout-docs", type=int, default=40)
    ap.add_argument("--scp-steps", type=int, default=150)
    ap.add_argument("--scp-lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--e2e-steps", type=int, default=40)
    ap.add_argument("--e2e-lr", type=float, default=1e-4)
    ap.add_argument("--e2e-questions", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    rows = load_wiki_summaries()
    random.Random(args.seed).shuffle(rows)
    train_rows = rows[: args.train_docs]
    held_rows = rows[args.train_docs : args.train_docs + args.heldout_docs]
    results: dict = {"preset": args.preset, "rate": args.rate, "train_docs": len(train_rows),
                     "heldout_docs": len(held_rows), "threads": torch.get_num_threads(),
                     "device": "cuda" if torch.cuda.is_available() else "cpu"}

    cfg = SCPConfig(model=preset(args.preset, compression_rate=args.rate),
                    train=TrainConfig(batch_size=args.batch_size, max_steps=args.scp_steps, checkpoint_every=25,
                                      seed=args.seed, optim=OptimSettings(lr=args.scp_lr)))
    model = ClaraModel.build(cfg.model)
    results["compression"] = model.compression_stats([doc_text(r) for r in held_rows])

    # Throughput of offline compression (no grad, batch 16).
    docs = [doc_text(r) for r in train_rows[:128]]
    model.compress(docs[:16])  # warm-up
    t0 = time.perf_counter()
    model.compress(docs, batch_size=16)
    results["compress_docs_per_s"] = len(docs) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    results["heldout_loss_no_doc_base"] = reconstruction_loss(model, held_rows, "none")
    results["heldout_loss_raw_doc_base"] = reconstruction_loss(model, held_rows, "raw")
    results["heldout_loss_memory_before"] = reconstruction_loss(model, held_rows, "memory")
    results["eval_seconds"] = time.perf_counter() - t0
    print(json.dumps(results, indent=2), flush=True)

    records = scp_records(train_rows)
    t0 = time.perf_counter()
    train_scp(model, records, cfg, args.out / "scp")
    results["scp_seconds"] = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (args.out / "scp" / "metrics.jsonl").read_text().splitlines()]
    results["scp_steps"] = len(metrics)
    results["scp_steps_per_s"] = statistics.median(m["steps_per_s"] for m in metrics)
    results["scp_train_loss_first10"] = statistics.mean(m["ce"] for m in metrics[:10])
    results["scp_train_loss_last10"] = statistics.mean(m["ce"] for m in metrics[-10:])
    results["heldout_loss_memory_after"] = reconstruction_loss(model, held_rows, "memory")
    print(json.dumps(results, indent=2), flush=True)

    # ---- E2E: description -> article, over the training documents as the pool.
    with_desc = [r for r in train_rows if r["description"]][: args.e2e_questions]
    qa = [QARecord(r["id"], f"Which article is described as '{r['description']}'?", [r["title"]], [r["id"]])
          for r in with_desc]
    corpus = {r["id"]: doc_text(r) for r in train_rows}
    ecfg = E2EConfig(train=TrainConfig(batch_size=args.batch_size, max_steps=args.e2e_steps, checkpoint_every=20,
                                       seed=args.seed, optim=OptimSettings(lr=args.e2e_lr, warmup_ratio=0.05)))
    doc_ids = list(corpus)
    pool, _ = compress_pool(model, [corpus[d] for d in doc_ids])
    pool_flat = flat_unit(pool)
    index = {d: i for i, d in enumerate(doc_ids)}
    model.copy_adapter("compressor", "query_reasoner")
    results["e2e_recall@5_before"] = selection_recall(model, qa, pool_flat, index, ecfg)
    t0 = time.perf_counter()
    train_e2e(model, qa, corpus, ecfg, args.out / "e2e")
    results["e2e_seconds"] = time.perf_counter() - t0
    results["e2e_recall@5_after"] = selection_recall(model, qa, pool_flat, index, ecfg)
    em = [json.loads(x) for x in (args.out / "e2e" / "metrics.jsonl").read_text().splitlines()]
    results["e2e_train_recall@5_first10"] = statistics.mean(m["recall@5"] for m in em[:10])
    results["e2e_train_recall@5_last10"] = statistics.mean(m["recall@5"] for m in em[-10:])
    results["e2e_train_ce_first10"] = statistics.mean(m["loss"] for m in em[:10])
    results["e2e_train_ce_last10"] = statistics.mean(m["loss"] for m in em[-10:])

    model.peft.eval()
    sample = held_rows[0]
    results["sample_paraphrase"] = {"doc": sample["text"][:300],
                                    "read_back": model.paraphrase(model.compress([doc_text(sample)]), 60)[0]}
    out = args.out / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
