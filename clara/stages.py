"""The pipeline's stages as plain functions over files, checkpoints and the store (no Prefect, no MLflow).

``flows/`` calls these from Prefect tasks and records what they return in MLflow; the ``clara`` CLI calls the
same functions. Every function is idempotent: run again with the same inputs it finds its earlier output
(or resumes it) instead of redoing the work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from clara.config import ModelConfig, OptimSettings, SCPConfig, TrainConfig, from_dict, preset, refuse_changes
from clara.data.corpus import read_corpus


def stage_budget(steps: int, batch_size: int, lr: float) -> TrainConfig:
    """A pipeline stage's training budget: ``steps`` optimizer steps of ``batch_size`` examples at peak ``lr``, with a
    step checkpoint every quarter of the run (at most every 10 steps), so that a killed stage resumes near where it
    died instead of from the start."""
    return TrainConfig(batch_size=batch_size, max_steps=steps, checkpoint_every=max(10, steps // 4),
                       optim=OptimSettings(lr=lr))


def scp_start(init_from: str | Path | None, preset_name: str, compression_rate: int,
              memory_readout: str) -> dict[str, Any] | None:
    """The model config recorded in the checkpoint SCP continues from (read, not loaded), or None without one.

    Raises:
        ValueError: it is of another base, rate or memory readout than asked for; said before any work is done,
            since SCP would otherwise fail (or silently train another model) minutes later.
    """
    if not init_from:
        return None
    from clara.model.checkpoint import read_checkpoint_config

    start = read_checkpoint_config(init_from)["model"]
    if start["base"] != preset_name and start["base"] != preset(preset_name).base:
        raise ValueError(f"init_from {init_from} is a {start['base']!r} checkpoint, not {preset_name!r}: pass "
                         f"init_from=none (and scp_steps) to train {preset_name!r} from scratch")
    readout = {"memory_readout": ModelConfig.memory_readout}  # older checkpoints do not record it: the default
    refuse_changes({**readout, **start}, {"compression_rate": compression_rate, "memory_readout": memory_readout},
                   f"init_from {init_from}", "a run continuing it")
    return start


def scp_config(preset_name: str, compression_rate: int, memory_readout: str, start: dict[str, Any] | None,
               budget: TrainConfig, target_dropout: float = 0.0, device: str | None = None) -> SCPConfig:
    """Stage 1's config: the starting point's own model config (``scp_start``) when there is one, else the preset's
    at this rate and readout."""
    device_over = {"device": device} if device else {}
    model = from_dict(ModelConfig, {**start, **device_over}) if start is not None else \
        preset(preset_name, compression_rate=compression_rate, memory_readout=memory_readout, **device_over)
    return SCPConfig(model=model, target_dropout=target_dropout, train=budget)


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, end) ranges covering ``n`` items (fewer if n is small)."""
    shards = max(1, min(shards, n)) if n else 1
    step, extra = divmod(n, shards)
    out, s = [], 0
    for i in range(shards):
        e = s + step + (1 if i < extra else 0)
        out.append((s, e))
        s = e
    return out


# ------------------------------------------------------------------------------------------ synthesis

# Fields of the synthesis report that describe one run rather than the data: kept out of data/ so that
# re-running unchanged inputs gives byte-identical files and the same DVC version.
RUN_FIELDS = ("seconds_this_run", "seconds_per_document", "new_documents_this_run", "documents_failed_this_run")


def synthesize_shard(corpus_file: str | Path, start: int, end: int, out_dir: str | Path, teacher: dict[str, Any],
                     cfg: dict[str, Any]) -> dict[str, Any]:
    """Synthesize documents [start, end) of the corpus into ``out_dir`` (resumable); returns the shard report."""
    from clara.data.synthesis import SynthesisConfig, synthesize
    from clara.data.teachers import build_teacher

    docs = read_corpus(corpus_file)[start:end]
    return synthesize(docs, build_teacher(**teacher), out_dir, SynthesisConfig(**cfg), progress=False)


def merge_synthesis(shard_dirs: Sequence[str | Path], out_dir: str | Path, cfg: dict[str, Any],
                    corpus_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge shards into ``out_dir`` (train.jsonl, dev.jsonl, report.json/md without run timings)."""
    from clara.data.synthesis import SynthesisConfig, merge_shards, report_markdown

    report = merge_shards(shard_dirs, out_dir, SynthesisConfig(**cfg), corpus_report=corpus_report)
    data_report = {k: v for k, v in report.items() if k not in RUN_FIELDS}
    out = Path(out_dir)
    (out / "report.json").write_text(json.dumps(data_report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown({**data_report, **{k: None for k in RUN_FIELDS}}),
                                   encoding="utf-8")
    return report


# ------------------------------------------------------------------------------------- training sets

def training_mixes(corpus_file: str | Path, out_dir: str | Path, synth_dir: str | Path | None = None, *,
                   max_docs: int | None = None, kinds: Sequence[str] = ("simple",), k: int = 5,
                   seed: int = 0, exclude: str | Path | None = None,
                   reconstruction_share: float = 1.0) -> dict[str, Any]:
    """Write ``scp.jsonl`` (stage 1: every passage reconstructs itself, plus the synthesized train split's QA)
    and ``instruct.jsonl`` (stage 2: each synthesized question over its gold passage and k-1 BM25 hard
    negatives) to ``out_dir``; held-out articles (``clara.data.mixes.heldout``) are left out of both.

    Args:
        max_docs: only the first N passages of the corpus (the pipeline's ``max_docs``).
        kinds: synthesized QA kinds that become stage-2 questions.
        exclude: an evaluation QA file (``{"question", "gold_doc_ids", ...}`` rows): synthesized QA about its
            gold passages or asking its questions is left out of both sets (``clara.data.mixes.drop_excluded``),
            so a dev set stays unseen. Reconstruction rows stay: every passage is served compressed.
        reconstruction_share: the fraction of passages with a reconstruction row
            (``clara.data.mixes.reconstruction_rows``); below 1 the stage-1 mix leans toward its QA rows.

    Returns:
        ``{"scp": path, "instruct": path or None, "scp_rows": n, "instruct_rows": n, "excluded_rows": n}``.
    """
    from clara.data.corpus import atomic_write_lines, dumps
    from clara.data.mixes import check_share, drop_excluded, heldout, instruct_rows, qa_pairs, reconstruction_rows
    from clara.data.records import load_qa_records, read_synth_rows
    from clara.data.synthesis import KINDS
    from clara.retrieval.first_stage import BM25Retriever

    check_share(reconstruction_share)  # before the corpus is read: a bad value fails at once
    qa_kinds = [k for k in KINDS if k != "paraphrase"]
    if not kinds or set(kinds) - set(qa_kinds):
        raise ValueError(f"kinds {','.join(kinds)!r}: each must be one of {', '.join(qa_kinds)}")
    docs = [d for d in read_corpus(corpus_file, max_docs) if not heldout(d)]
    if not docs:
        raise ValueError(f"{corpus_file}: no passages left to train on")
    scp = reconstruction_rows(docs, reconstruction_share)
    instruct: list[dict[str, Any]] = []
    excluded = 0
    if synth_dir is not None:
        kept = {d.id for d in docs}
        rows = [r for r in read_synth_rows(Path(synth_dir) / "train.jsonl") if r["doc_id"] in kept]
        if exclude is not None:
            held = load_qa_records(exclude)
            rows, excluded = drop_excluded(rows, [q.question for q in held], [g for q in held for g in q.gold_doc_ids])
        scp += [r for r in rows if r.get("data_type") == "qa"]
        pairs = qa_pairs(rows, kinds)
        if pairs:
            bm25 = BM25Retriever(docs)
            instruct = instruct_rows(pairs, docs, lambda qs, n: [[d for d, _ in h] for h in bm25.retrieve(qs, n)],
                                     k=min(k, len(docs)), seed=seed)
    out = Path(out_dir)
    atomic_write_lines(out / "scp.jsonl", (dumps(r) for r in scp))
    result: dict[str, Any] = {"scp": str(out / "scp.jsonl"), "instruct": None, "scp_rows": len(scp),
                              "instruct_rows": len(instruct), "excluded_rows": excluded}
    if instruct:
        atomic_write_lines(out / "instruct.jsonl", (dumps(r) for r in instruct))
        result["instruct"] = str(out / "instruct.jsonl")
    else:  # a stage-2 file of an earlier mix into this folder must not pass for this one's
        (out / "instruct.jsonl").unlink(missing_ok=True)
    return result


# ------------------------------------------------------------------------------------------ evaluation

def clara_row(rows: Sequence[dict[str, Any]], setting: str = "normal") -> dict[str, Any]:
    for r in rows:
        if r["system"] == "clara" and r["setting"] == setting:
            return r
    raise ValueError(f"the evaluation has no CLaRa row for setting {setting!r}")


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a report row (``None`` for a metric that does not apply is left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
