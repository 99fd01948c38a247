"""A generator tuned to read raw text: the ceiling that the memory's answers are read against (docs/memory.md).

    python benchmarks/experiments/text_reader.py CHECKPOINT --data MIX/instruct.jsonl --steps 150 \
        --save DIR --out RESULT.json [--against PROBE.json]

The probe's raw-text row is the base model's, which answers in sentences (CEM high, EM 0), so it does not say what
the memory's answers could reach. This trains the generator adapter of CHECKPOINT (fresh, unless
``--keep-generator``) on stage 2's QA rows with the documents given as text, the raw-text baseline's prompt, and the
compressor untouched; then, on the dev questions with the gold passage forced in among the probe's hard negatives
(``quality_probe.gold_forced_sets``: the same sets), it generates answers (CEM / EM / F1) and scores the gold
answer's NLL, with the passages and with none. ``--against`` pairs the result per question with a probe of a
memory checkpoint (F1 and NLL, paired bootstrap). ``--steps 0`` evaluates CHECKPOINT's generator as it is (a
reader saved by ``--save`` is evaluated that way).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def qa_pairs(records: Sequence[Any]) -> list[tuple[str, list[str], str]]:
    """(question, documents, answer) of each stage-2 question, paired as ``build_examples`` pairs them."""
    out = []
    for r in records:
        if r.data_type != "qa":
            continue
        answers = r.answers if len(r.questions) > 1 else r.answers[:1]
        out.extend((q, list(r.docs), a) for q, a in zip(r.questions, answers))
    return out


def train_reader(model, pairs: Sequence[tuple[str, list[str], str]], steps: int, batch_size: int, lr: float,
                 seed: int = 0, max_target_len: int = 64, log_every: int = 10) -> list[dict[str, float]]:
    """The generator adapter alone, on the answer's CE after the raw-text prompt: warm-up + cosine at ``lr``,
    clipped as every stage is. Returns one log line per ``log_every`` steps."""
    from clara.config import OptimSettings, TrainConfig
    from clara.training.common import build_optimization, optimizer_step
    from clara.training.distributed import setup

    if not pairs:
        raise SystemExit("no stage-2 questions to train on (the data has no 'qa' rows)")

    model.set_trainable(["generator"], special=False)
    train = TrainConfig(optim=OptimSettings(lr=lr))
    optimizer, scheduler = build_optimization(model.trainable_parameters(), train.optim, steps)
    dist = setup()
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    log, ces, t0 = [], [], time.perf_counter()
    model.peft.train()
    for step in range(steps):
        idx = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        rows = [model.prompter.text_qa_prompt(pairs[i][0], pairs[i][1]) for i in idx]
        targets = [model.prompter.target_ids(pairs[i][2], max_target_len) for i in idx]
        with model.adapter("generator"):
            loss = model.response_loss(rows, targets, [[] for _ in idx])
        loss.backward()
        optimizer_step(model, optimizer, scheduler, train, dist)
        ces.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, "ce": sum(ces) / len(ces),
                        "s_per_step": (time.perf_counter() - t0) / (step + 1)})
            print(json.dumps(log[-1]), flush=True)
            ces = []
    model.peft.eval()
    return log


def evaluate(model, dev: Path, k: int, max_new_tokens: int, batch_size: int, articles: int | None = 2000,
             corpus: str = "bundled") -> dict[str, Any]:
    """The tuned reader on the probe's dev sets: answers and gold answer NLL with the gold passage forced in, and
    closed book (the same generator, no documents)."""
    from quality_probe import _batched, _score, corpus_and_dev, gold_forced_sets

    from clara.eval.likelihood import answer_nll
    from clara.eval.metrics import answer_scores

    _, docs, qa = corpus_and_dev(model, corpus, articles, dev)
    by_id = {d.id: d for d in docs}
    forced, _ = gold_forced_sets(qa, docs, k)
    questions = [r.question for r in qa]
    texts = [[by_id[d].full_text for d in ids] for ids in forced]
    answers = _batched(lambda idx: model.generate_from_text([questions[i] for i in idx], [texts[i] for i in idx],
                                                            max_new_tokens, adapter="generator"),
                       list(range(len(qa))), batch_size)
    closed = _batched(lambda b: model.generate_from_text(b, [[] for _ in b], max_new_tokens, adapter="generator"),
                      questions, batch_size)
    gold = [r.answers[0] for r in qa]
    prompt = model.prompter.text_qa_prompt
    nll, each = answer_nll(model, [prompt(q, t) for q, t in zip(questions, texts)], gold, None, "generator",
                           batch_size)
    closed_nll, _ = answer_nll(model, [prompt(q, []) for q in questions], gold, None, "generator", batch_size)
    return {"questions": len(qa), "k": k, "corpus_passages": len(docs), "question_ids": [r.id for r in qa],
            "text_forced": {**_score(answers, qa), "gold_answer_nll": nll},
            "closed_book": {**_score(closed, qa), "gold_answer_nll": closed_nll},
            "per_question": {"nll_text_forced": each,
                             "f1_text_forced": [answer_scores(p, r.answers)["f1"] for p, r in zip(answers, qa)],
                             "text_forced": answers},
            "examples": [{"question": r.question, "answers": r.answers, "reader": a}
                         for r, a in list(zip(qa, answers))[:12]]}


def against(result: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    """The memory checkpoint's answers against the text reader's, question by question (memory − text)."""
    from quality_probe import paired_bootstrap

    same = ("question_ids", "k", "corpus_passages")  # the same questions over the same passage sets
    if any(probe.get(key) != result[key] for key in same):
        raise SystemExit("--against: that probe scored other questions, another k or another corpus than this run")
    per, mine = probe["per_question"], result["per_question"]
    # paired_bootstrap(new, old) is the mean of old - new: here memory - text for both
    out = {"nll_memory_minus_text": paired_bootstrap(mine["nll_text_forced"], per["nll_clara_forced"])}
    if "f1_clara_forced" in per:
        out["f1_memory_minus_text"] = paired_bootstrap(mine["f1_text_forced"], per["f1_clara_forced"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from clara.config import INSTRUCT_DEFAULTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, help="Stage 2's rows (a mix's instruct.jsonl); needed with --steps > 0.")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=INSTRUCT_DEFAULTS["train"]["optim"]["lr"],
                    help="Stage 2's default rate.")
    ap.add_argument("--keep-generator", action="store_true", help="Tune CHECKPOINT's generator, not a fresh one.")
    ap.add_argument("--dev", type=Path, default=ROOT / "benchmarks" / "dev" / "natural_dev.jsonl")
    ap.add_argument("--corpus", default="bundled", help="'bundled' or a corpus JSONL {id, title, text}.")
    ap.add_argument("--articles", type=int, default=2000, help="Corpus: passages of the first N bundled articles.")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--amp", choices=("bf16", "off"), default=None, help="Override the checkpoint's precision.")
    ap.add_argument("--save", type=Path, default=None, help="Write the tuned reader here as a checkpoint.")
    ap.add_argument("--out", type=Path, required=True, help="The result as JSON.")
    ap.add_argument("--against", type=Path, default=None, help="A quality_probe.py result (--parts b or n).")
    args = ap.parse_args(argv)
    if args.steps > 0 and args.data is None:
        ap.error("--data is needed to train (--steps > 0)")

    from clara.data.records import load_scp_records
    from clara.model.checkpoint import load_checkpoint, save_checkpoint

    t0 = time.perf_counter()
    model = load_checkpoint(args.checkpoint)
    if args.amp is not None:  # as the probe does, so that the two are paired at one precision
        model.cfg.amp = args.amp
        model.uses_amp = args.amp == "bf16"
    kept = "as saved" if args.steps == 0 else "kept" if args.keep_generator else "fresh"
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "steps": args.steps, "batch_size": args.batch_size,
                              "lr": args.lr, "generator": kept, "amp": model.uses_amp}
    if args.steps > 0:
        pairs = qa_pairs(load_scp_records(args.data))
        if not args.keep_generator:
            model.reset_adapter("generator")
        result["train"] = train_reader(model, pairs, args.steps, args.batch_size, args.lr)
        result["train_pairs"] = len(pairs)
        if args.save is not None:
            save_checkpoint(model, args.save, extra={"stage": "text_reader", "steps": args.steps,
                                                     "from": str(args.checkpoint)})
    result.update(evaluate(model, args.dev, args.k, args.max_new_tokens, args.batch_size, args.articles,
                           args.corpus))
    if args.against is not None:
        result["against"] = {"probe": str(args.against),
                             **against(result, json.loads(args.against.read_text(encoding="utf-8")))}
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    for name in ("text_forced", "closed_book"):
        r = result[name]
        print(f"{name}: CEM {r['cem']:.1f} EM {r['em']:.1f} F1 {r['f1']:.1f} gold NLL {r['gold_answer_nll']:.3f}")
    if "against" in result:
        print("memory - text:", json.dumps({k: v for k, v in result["against"].items() if k != "probe"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
