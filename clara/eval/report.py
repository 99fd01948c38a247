"""The evaluation's report: the markdown table (``report.md``) and the quality and latency plots, from its rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from clara.retrieval.timing import STAGES


def _stages(ms: dict[str, float] | None) -> str:
    """Per-stage milliseconds in ``STAGES`` order, e.g. ``45 / 9.0 / 3.9 / 2.3 / 0.3``."""
    if not ms:
        return "–"
    return " / ".join(f"{ms[s]:.1f}" if s in ms else "–" for s in STAGES)


def report_markdown(rows: Sequence[dict[str, Any]]) -> str:
    def fmt(v, pct=False):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{100 * v:.1f}" if pct else f"{v:.1f}"
        return str(v)

    head = ["system", "retriever", "setting", "rate", "n", "CEM", "EM", "F1", "CEM (1st gold)", "gold NLL",
            "answer tokens", "R@1", "R@3", "R@5",
            "R@20", "context tokens", "real ratio", "retrieval ms p50", "TTFT ms p50", "TTFT p95", "decode tok/s",
            "generation ms p50", "latency ms p50", "p95", "retrieval stages ms p50"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["system"], r["retriever"] or "–", r["setting"], r["rate"], r["n"], fmt(r["cem"], True),
                 fmt(r["em"], True), fmt(r["f1"], True), fmt(r.get("cem_first"), True),
                 "–" if r.get("gold_nll") is None else f"{r['gold_nll']:.2f}", fmt(r.get("answer_tokens")),
                 fmt(r["recall@1"], True),
                 fmt(r["recall@3"], True), fmt(r["recall@5"], True), fmt(r.get("recall@20"), True),
                 fmt(r["context_tokens"]),
                 fmt(r.get("real_ratio")), fmt(r.get("retrieval_ms_p50")), fmt(r.get("ttft_ms_p50")),
                 fmt(r.get("ttft_ms_p95")), fmt(r.get("decode_tokens_per_s")), fmt(r.get("generation_ms_p50")),
                 fmt(r["latency_ms_p50"]), fmt(r["latency_ms_p95"]), _stages(r.get("retrieval_stages_ms_p50"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = ["", "Scores in %, max over gold answers (CEM against the first gold only as the authors report it). "
             "Latencies per question on this machine, this run; TTFT is time to first token (prompt assembly + "
             "prefill; CLaRa's documents were compressed offline), decode tok/s the tokens after it. "
             "oracle: the gold passage forced into the k the generator reads; oracle-candidates: gold added to the candidates the query reasoner picks from. "
             "retrieval rows: each first stage alone, and re-ranked by the query reasoner (+rerank). "
             "gold NLL: mean NLL per token of the first gold answer under the system's own prompt, teacher-forced "
             "(lower is better; independent of answer length); answer tokens: mean length of the answers given. "
             "clara-closed-book: CLaRa's generator with no documents, the reference for what its memory adds. "
             "retrieval stages (re-ranked retrieval rows): " + " / ".join(STAGES) + " (unmerged adapters, as "
             "evaluated; the served model's merged copies: benchmarks/latency.py --retrieval)."]
    qr = sorted({f"rate {r['rate']}: {r['query_reasoner']}" for r in rows if r.get("query_reasoner")})
    if qr:
        notes.append("Query reasoner: " + "; ".join(qr) + ".")
    return "\n".join(lines + notes) + "\n"


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
