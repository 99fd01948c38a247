"""The evaluation run: CLaRa against raw-text RAG with the same base, BM25 and MiniLM retrieval, and closed book.

Every figure of a report is measured in the same run on the same machine. Questions are answered one at a time
so that the latencies are per question (retrieval and generation timed separately).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from clara.data.corpus import Document, dumps
from clara.data.records import QARecord
from clara.eval.metrics import answer_scores, mean, recall_at
from clara.eval.retrievers import BM25Retriever, ClaraRetriever, MiniLMRetriever, Ranked

REPORT_KEYS = ("system", "retriever", "setting", "rate", "n", "em", "f1", "cem", "recall@1", "recall@3", "recall@5",
               "context_tokens", "latency_ms_p50", "latency_ms_p95")


@dataclass
class EvalConfig:
    k: int = 5
    """Documents handed to the generator."""
    n_candidates: int = 20
    """Oracle setting: candidates (gold forced in) the query reasoner selects k from, as in the paper."""
    ann_candidates: int = 100
    """Store search: documents the ANN stage passes to the exact re-score."""
    max_new_tokens: int = 64
    baselines: tuple[str, ...] = ("bm25", "minilm")
    settings: tuple[str, ...] = ("normal", "oracle")
    closed_book: bool = True


@dataclass
class _Acc:
    """Per-question results of one (system, retriever, setting, rate)."""

    scores: list[dict[str, float]] = field(default_factory=list)
    recalls: dict[int, list[float]] = field(default_factory=lambda: {1: [], 3: [], 5: []})
    context: list[int] = field(default_factory=list)
    retrieval_s: list[float] = field(default_factory=list)
    generation_s: list[float] = field(default_factory=list)
    real_ratio: list[float] = field(default_factory=list)


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else None


def _row(system: str, retriever: str | None, setting: str, rate: int, acc: _Acc) -> dict[str, Any]:
    total = [r + g for r, g in zip(acc.retrieval_s, acc.generation_s)] if acc.generation_s else acc.retrieval_s
    row: dict[str, Any] = {"system": system, "retriever": retriever, "setting": setting, "rate": rate,
                           "n": max(len(acc.scores), len(acc.recalls[1]))}
    for key in ("em", "f1", "cem", "em_first", "f1_first", "cem_first"):
        row[key] = mean(s[key] for s in acc.scores) if acc.scores else None
    for k in (1, 3, 5):
        row[f"recall@{k}"] = mean(acc.recalls[k]) if acc.recalls[k] else None
    row["context_tokens"] = mean(acc.context) if acc.context else None
    row["latency_ms_p50"], row["latency_ms_p95"] = _pct(total, 50), _pct(total, 95)
    row["retrieval_ms_p50"], row["retrieval_ms_p95"] = _pct(acc.retrieval_s, 50), _pct(acc.retrieval_s, 95)
    row["generation_ms_p50"], row["generation_ms_p95"] = _pct(acc.generation_s, 50), _pct(acc.generation_s, 95)
    row["real_ratio"] = mean(acc.real_ratio) if acc.real_ratio else None
    return row


def _force_gold(ranked: Ranked, gold: Sequence[str], k: int) -> list[str]:
    """Oracle for raw text: the gold documents plus the best retrieved others, k in all, gold first."""
    gold = [g for g in gold][:k]
    others = [d for d, _ in ranked if d not in gold]
    return gold + others[: k - len(gold)]


def evaluate(qa: Sequence[QARecord], docs: Sequence[Document], models: dict[int, Any], out_dir: str | Path,
             cfg: EvalConfig | None = None, *, stores: dict[int, tuple[Any, Any]] | None = None,
             progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every system on ``qa`` and write report.json, report.md, predictions.jsonl and plots to ``out_dir``.

    Args:
        qa: questions; records without answers are scored for retrieval only.
        docs: the corpus; every gold id must be in it.
        models: compression rate -> ClaraModel (checkpoints at several rates give one row each).
        stores: rate -> (engine, build) to retrieve from pgvector instead of the in-memory exact index.
    """
    cfg = cfg or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_id = {d.id: d for d in docs}
    missing = sorted({g for r in qa for g in r.gold_doc_ids if g not in by_id})
    if missing:
        raise ValueError(f"{len(missing)} gold document id(s) are missing from the corpus, e.g. {missing[:5]}")
    with_answers = all(r.answers for r in qa)
    with_gold = all(r.gold_doc_ids for r in qa)
    if not models:
        raise ValueError("at least one CLaRa model is needed")
    base = next(iter(models.values()))  # raw-text and closed-book use the same base, adapters off
    rows: list[dict[str, Any]] = []
    predictions = (out / "predictions.jsonl").open("w", encoding="utf-8")

    def record(system, retriever, setting, rate, r: QARecord, pred, retrieved, acc: _Acc):
        entry = {"id": r.id, "system": system, "retriever": retriever, "setting": setting, "rate": rate,
                 "question": r.question, "answers": r.answers, "gold_doc_ids": r.gold_doc_ids,
                 "prediction": pred, "retrieved": retrieved}
        if pred is not None and r.answers:
            scores = answer_scores(pred, r.answers)
            acc.scores.append(scores)
            entry["scores"] = scores
        if r.gold_doc_ids and retrieved is not None:
            for k in (1, 3, 5):
                acc.recalls[k].append(recall_at(retrieved, r.gold_doc_ids, k))
        predictions.write(dumps(entry) + "\n")

    def doc_tokens(ids: Sequence[str]) -> int:
        return sum(len(t) for t in base.tokenize_texts([by_id[d].full_text for d in ids], base.cfg.doc_max_len))

    # ---- closed book
    if cfg.closed_book and with_answers:
        progress("closed book")
        acc = _Acc()
        for r in qa:
            t0 = time.perf_counter()
            pred = base.generate_from_text([r.question], [[]], max_new_tokens=cfg.max_new_tokens)[0]
            acc.generation_s.append(time.perf_counter() - t0)
            acc.retrieval_s.append(0.0)
            acc.context.append(0)
            record("closed-book", None, "normal", 1, r, pred, None, acc)
        rows.append(_row("closed-book", None, "normal", 1, acc))

    # ---- raw text with BM25 / MiniLM
    for name in cfg.baselines:
        progress(f"indexing {name}")
        retriever = BM25Retriever(docs) if name == "bm25" else MiniLMRetriever(docs)
        for setting in cfg.settings:
            if setting == "oracle" and not with_gold:
                continue
            progress(f"raw-text / {name} / {setting}")
            acc = _Acc()
            for r in qa:
                t0 = time.perf_counter()
                ranked = retriever.retrieve([r.question], max(cfg.k, 5))[0]
                acc.retrieval_s.append(time.perf_counter() - t0)
                ids = _force_gold(ranked, r.gold_doc_ids, cfg.k) if setting == "oracle" else \
                    [d for d, _ in ranked[: cfg.k]]
                pred = None
                if with_answers:
                    t0 = time.perf_counter()
                    pred = base.generate_from_text([r.question], [[by_id[d].full_text for d in ids]],
                                                   max_new_tokens=cfg.max_new_tokens)[0]
                    acc.generation_s.append(time.perf_counter() - t0)
                    acc.context.append(doc_tokens(ids))
                retrieved = ids if setting == "oracle" else [d for d, _ in ranked]
                record("raw-text", name, setting, 1, r, pred, retrieved, acc)
            rows.append(_row("raw-text", name, setting, 1, acc))

    # ---- CLaRa at every rate
    for rate, model in sorted(models.items()):
        progress(f"compressing the corpus at rate {rate}" if not stores or rate not in stores else
                 f"using store build for rate {rate}")
        engine, build = (stores or {}).get(rate, (None, None))
        retriever = ClaraRetriever(model, docs, engine=engine, build=build, candidates=cfg.ann_candidates)
        for setting in cfg.settings:
            if setting == "oracle" and not with_gold:
                continue
            progress(f"clara / rate {rate} / {setting}")
            acc = _Acc()
            for r in qa:
                t0 = time.perf_counter()
                query = retriever.encode([r.question])[0]
                if setting == "normal":
                    ranked = retriever.retrieve_encoded([query], max(cfg.k, 5))[0]
                else:
                    # Oracle: the gold documents forced into N candidates, then the query reasoner picks k.
                    pool = retriever.retrieve_encoded([query], cfg.n_candidates)[0]
                    cand = list(dict.fromkeys(list(r.gold_doc_ids) + [d for d, _ in pool]))[: cfg.n_candidates]
                    ranked = sorted(zip(cand, retriever.score_docs(query, cand)), key=lambda x: -x[1])
                acc.retrieval_s.append(time.perf_counter() - t0)
                ids = [d for d, _ in ranked[: cfg.k]]
                pred = None
                if with_answers:
                    mems = [retriever.memory_of(d) for d in ids]
                    t0 = time.perf_counter()
                    pred = model.generate([r.question], [mems], max_new_tokens=cfg.max_new_tokens)[0]
                    acc.generation_s.append(time.perf_counter() - t0)
                    n_mem = sum(m.shape[0] for m in mems)
                    acc.context.append(n_mem)
                    acc.real_ratio.append(doc_tokens(ids) / max(1, n_mem))
                record("clara", "clara", setting, rate, r, pred, [d for d, _ in ranked], acc)
            rows.append(_row("clara", "clara", setting, rate, acc))
    predictions.close()

    (out / "report.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(rows), encoding="utf-8")
    plot_report(rows, out)
    return rows


def report_markdown(rows: Sequence[dict[str, Any]]) -> str:
    def fmt(v, pct=False):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{100 * v:.1f}" if pct else f"{v:.1f}"
        return str(v)

    head = ["system", "retriever", "setting", "rate", "n", "CEM", "EM", "F1", "CEM (1st gold)", "R@1", "R@3", "R@5",
            "context tokens", "real ratio", "retrieval ms p50", "generation ms p50", "latency ms p50", "p95"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["system"], r["retriever"] or "–", r["setting"], r["rate"], r["n"], fmt(r["cem"], True),
                 fmt(r["em"], True), fmt(r["f1"], True), fmt(r.get("cem_first"), True), fmt(r["recall@1"], True),
                 fmt(r["recall@3"], True), fmt(r["recall@5"], True), fmt(r["context_tokens"]),
                 fmt(r.get("real_ratio")), fmt(r.get("retrieval_ms_p50")), fmt(r.get("generation_ms_p50")),
                 fmt(r["latency_ms_p50"]), fmt(r["latency_ms_p95"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n\nScores in %, max over gold answers (CEM against the first gold only as the " \
                               "authors report it). Latencies per question on this machine, this run.\n"


def plot_report(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """quality_vs_rate.png (CLaRa CEM per rate with raw-text and closed-book lines) and latency_vs_rate.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    clara = [r for r in rows if r["system"] == "clara"]
    if not clara:
        return written
    metric = "cem" if any(r["cem"] is not None for r in rows) else "recall@5"
    for name, key, ylabel in (("quality_vs_rate.png", metric, metric.upper()),
                              ("latency_vs_rate.png", "latency_ms_p50", "latency per question, ms (p50)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for setting, style in (("normal", "o-"), ("oracle", "s--")):
            pts = sorted((r["rate"], r[key]) for r in clara if r["setting"] == setting and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"CLaRa {setting}")
        baselines = [r for r in rows if r["system"] != "clara" and r[key] is not None and r["setting"] == "normal"]
        for i, r in enumerate(baselines):
            label = f"{r['system']}" + (f" ({r['retriever']})" if r["retriever"] else "")
            ax.axhline(r[key], linestyle=":", linewidth=1.2, label=label, color=f"C{i + 2}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression rate")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written
