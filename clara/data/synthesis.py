"""Stage 0: salient data synthesis (docs/design.md §4), resumable and idempotent.

Per document the teacher proposes simple and complex questions, answers them from the document, and verifies
each pair; a pair is kept only if the teacher judges it correct *and* every answer token occurs in the document.
Up to R coverage rounds ask for sentences no kept pair touches yet. A paraphrase is kept if judged faithful.
Documents whose coverage stays under ``min_coverage`` are dropped (and counted).

Output folder::

    rows.jsonl        every kept row, appended per finished document (the working file)
    done.jsonl        one line per finished document: its status and counts (the resume log)
    rejected.jsonl    pairs and paraphrases that failed verification, with the reason (for audits)
    train.jsonl / dev.jsonl   the split by document, rewritten at the end of each run
    report.json / report.md   the quality report

A document's rows are written and flushed before its line in ``done.jsonl``; on restart, rows of documents not
in ``done.jsonl`` (a kill between the two) are removed and the document is redone: no duplicates, no losses.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from clara.data.corpus import Document, atomic_write_lines, dumps, sentences
from clara.data.teachers import Proposal, Teacher, TeacherError, grounded
from clara.text import answer_tokens, normalize_answer

KINDS = ("simple", "complex", "paraphrase")


@dataclass
class SynthesisConfig:
    max_simple: int = 8
    """Simple questions asked for per document (paper average: 7.8 kept)."""
    max_complex: int = 4
    """Complex questions asked for per document (paper average: 4.6 kept)."""
    coverage_rounds: int = 2
    """Supplementary rounds for uncovered sentences (paper: up to 10; 2 keeps a CPU run short)."""
    min_coverage: float = 0.0
    """Drop a document whose kept pairs cover fewer than this fraction of its sentences (0 keeps any output)."""
    dev_fraction: float = 0.1
    """Share of documents (by parent id, so passages stay together) in the dev split."""
    seed: int = 0
    batch_docs: int = 8
    """Documents handled together (one teacher batch per task)."""
    max_consecutive_failures: int = 3
    """Stop when this many batches in a row fail at the teacher (the endpoint is down): progress is kept."""

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)} (at least {v})" for k, v in
               {"max_simple": 0, "max_complex": 0, "coverage_rounds": 0, "batch_docs": 1,
                "max_consecutive_failures": 1}.items() if getattr(self, k) < v]
        if not 0 <= self.min_coverage <= 1:
            bad.append(f"min_coverage={self.min_coverage} (a fraction in [0, 1])")
        if not 0 <= self.dev_fraction < 1:
            bad.append(f"dev_fraction={self.dev_fraction} (a fraction in [0, 1): 1 would leave nothing to train on)")
        if bad:
            raise ValueError(f"synthesis settings out of range: {', '.join(bad)}")


@dataclass
class DocResult:
    doc: Document
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {"simple": [], "complex": []})
    paraphrase: str | None = None
    checked: int = 0
    passed: int = 0
    ungrounded: int = 0
    duplicates: int = 0
    coverage: float = 0.0
    rejected: list[dict[str, Any]] = field(default_factory=list)


def split_of(doc: Document, seed: int, dev_fraction: float) -> str:
    """``dev`` or ``train``, from a hash of the parent id: stable across runs, machines and document order."""
    key = f"{seed}:{doc.parent_id or doc.id}".encode()
    return "dev" if int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF < dev_fraction else "train"


def coverage(doc: Document, pairs: Sequence[tuple[str, str]]) -> tuple[float, list[str]]:
    """Share of sentences that some kept answer occurs in (as tokens), and the sentences not yet covered."""
    sents = sentences(doc.text)
    if not sents:
        return 0.0, []
    answers = [set(answer_tokens(a)) for _, a in pairs]
    missing = [s for s in sents if not any(ans and ans <= set(answer_tokens(s)) for ans in answers)]
    return 1 - len(missing) / len(sents), missing


def _judge(teacher: Teacher, results: list[DocResult], proposals: list[list[Proposal]], kind: str) -> None:
    """Answer, ground-check and verify proposals; keep the pairs that pass in ``results``."""
    need = [(i, p) for i, props in enumerate(proposals) for p in props if p.answer is None]
    answers = teacher.answer([(results[i].doc, p.question) for i, p in need]) if need else []
    for (i, p), a in zip(need, answers):
        p.answer = a
    candidates = []
    for i, props in enumerate(proposals):
        res = results[i]
        have = {normalize_answer(q) for pairs in res.pairs.values() for q, _ in pairs}
        for p in props:
            key = normalize_answer(p.question)
            if key in have:
                res.duplicates += 1
                continue
            have.add(key)
            if not p.answer:
                res.rejected.append({"kind": kind, "question": p.question, "answer": None,
                                     "reason": "teacher could not answer from the document"})
                continue
            if not all(grounded(part, res.doc.text) for part in p.answer.split("; ")):
                res.ungrounded += 1
                res.rejected.append({"kind": kind, "question": p.question, "answer": p.answer,
                                     "reason": "answer not grounded in the document"})
                continue
            candidates.append((i, p))
    verdicts = teacher.verify_qa([(results[i].doc, p.question, p.answer) for i, p in candidates]) \
        if candidates else []
    for (i, p), ok in zip(candidates, verdicts):
        res = results[i]
        res.checked += 1
        if ok:
            res.passed += 1
            res.pairs[kind].append((p.question, p.answer))
        else:
            res.rejected.append({"kind": kind, "question": p.question, "answer": p.answer,
                                 "reason": "teacher judged the answer incorrect"})


def synthesize_batch(teacher: Teacher, docs: Sequence[Document], cfg: SynthesisConfig) -> list[DocResult]:
    """All three kinds for a batch of documents, with verification and coverage rounds."""
    results = [DocResult(d) for d in docs]
    for kind, limit in (("simple", cfg.max_simple), ("complex", cfg.max_complex)):
        _judge(teacher, results, teacher.propose(docs, kind, limit), kind)
    for _ in range(cfg.coverage_rounds):
        missing = [coverage(r.doc, r.pairs["simple"] + r.pairs["complex"])[1] for r in results]
        if not any(missing):
            break
        _judge(teacher, results, teacher.cover(docs, missing, cfg.max_simple), "simple")
    paraphrases = teacher.paraphrase(docs)
    checks = [(r.doc, p) for r, p in zip(results, paraphrases)]
    faithful = teacher.verify_paraphrase(checks)
    for r, p, ok in zip(results, paraphrases, faithful):
        if ok and p.strip() and normalize_answer(p) != normalize_answer(r.doc.text):
            r.paraphrase = p.strip()
        else:
            r.rejected.append({"kind": "paraphrase", "paraphrase": p, "reason": "not judged faithful"
                               if not ok else "empty or identical to the document"})
    for r in results:
        r.coverage = coverage(r.doc, r.pairs["simple"] + r.pairs["complex"])[0]
    return results


def result_rows(res: DocResult, teacher: Teacher, split: str) -> list[dict[str, Any]]:
    """The authors' record format plus provenance, one row per kind that produced something."""
    base = {"doc_id": res.doc.id, "parent_id": res.doc.parent_id or res.doc.id, "teacher": teacher.name,
            "prompt_version": teacher.prompt_version, "split": split, "docs": [res.doc.full_text]}
    rows = []
    for kind in ("simple", "complex"):
        pairs = res.pairs[kind]
        if pairs:
            rows.append({**base, "data_type": "qa", "kind": kind, "question": [q for q, _ in pairs],
                         "answers": [a for _, a in pairs], "verification": teacher.qa_check})
    if res.paraphrase:
        rows.append({**base, "data_type": "paraphrase", "kind": "paraphrase", "question": [],
                     "answers": [res.paraphrase], "verification": teacher.paraphrase_check})
    return rows


# ---------------------------------------------------------------------------------------- resumable run

class _Log:
    """An append-only JSONL file whose tail may be cut by a kill: a partial last line is dropped on open."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                path.write_bytes(data[: data.rfind(b"\n") + 1])

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(dumps(r) + "\n" for r in rows))
            fh.flush()


def _resume(out: Path, teacher: Teacher, rows_log: _Log, done_log: _Log, rej_log: _Log) -> dict[str, dict]:
    """The done log of an earlier run in ``out`` (doc id -> its entry), after checking it was this teacher's and
    dropping the rows and rejects of a document cut off before its done line (it is redone)."""
    done = {d["doc_id"]: d for d in done_log.read()}
    made_by = {(r["teacher"], r["prompt_version"]) for r in rows_log.read() if r["doc_id"] in done}
    if made_by - {(teacher.name, teacher.prompt_version)}:
        other = sorted(made_by - {(teacher.name, teacher.prompt_version)})[0]
        raise ValueError(f"{out} holds rows by teacher {other[0]} / {other[1]}; this teacher is {teacher.name} / "
                         f"{teacher.prompt_version}. Resuming would mix the two: synthesize into another folder "
                         f"(or delete this one)")
    for log in (rows_log, rej_log):
        existing = log.read()
        kept = [r for r in existing if r["doc_id"] in done]
        if len(kept) != len(existing):
            atomic_write_lines(log.path, (dumps(r) for r in kept))
    return done


def _check_same_work(out: Path, done: dict[str, dict], rows: list[dict[str, Any]], by_id: dict[str, Document],
                     cfg: SynthesisConfig) -> None:
    """Refuse to resume work of another corpus, or split with another seed or dev_fraction: its documents and
    rows would stay in train.jsonl / dev.jsonl beside this run's."""
    foreign = [i for i in done if i not in by_id]
    if foreign:
        raise ValueError(f"{out} holds {len(foreign)} done document(s) this corpus does not have (e.g. "
                         f"{foreign[0]!r}): it is the work of another corpus or another cut of it (--limit); "
                         f"synthesize into another folder (or delete it)")
    moved = next((r["doc_id"] for r in rows if r["split"] != split_of(by_id[r["doc_id"]], cfg.seed, cfg.dev_fraction)),
                 None)
    if moved is not None:
        raise ValueError(f"{out} was split into train/dev with another seed or dev_fraction (document {moved!r} is in "
                         f"another split now): resuming would mix two splits; synthesize into another folder")


def _record(res, teacher: Teacher, cfg: SynthesisConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One document's result as its rows (none unless kept) and its done-log entry."""
    n_pairs = sum(len(p) for p in res.pairs.values())
    keep = (n_pairs or res.paraphrase) and res.coverage >= cfg.min_coverage
    rows = result_rows(res, teacher, split_of(res.doc, cfg.seed, cfg.dev_fraction)) if keep else []
    status = "kept" if keep else ("low_coverage" if n_pairs or res.paraphrase else "no_output")
    entry = {"doc_id": res.doc.id, "status": status, "rows": len(rows), "checked": res.checked,
             "passed": res.passed, "ungrounded": res.ungrounded, "duplicates": res.duplicates,
             "coverage": round(res.coverage, 4), "paraphrase": bool(res.paraphrase),
             **{f"pairs_{k}": len(v) for k, v in res.pairs.items()}}
    return rows, entry


def synthesize(docs: Sequence[Document], teacher: Teacher, out_dir: str | Path, cfg: SynthesisConfig | None = None,
               *, progress: bool = True, corpus_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Synthesize SCP data for ``docs`` into ``out_dir``, resuming a previous run there; returns the report."""
    cfg = cfg or SynthesisConfig()
    out = Path(out_dir)
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"duplicate document id {dup!r}: ingest the corpus first (it de-duplicates)")
    rows_log, done_log, rej_log = _Log(out / "rows.jsonl"), _Log(out / "done.jsonl"), _Log(out / "rejected.jsonl")
    done = _resume(out, teacher, rows_log, done_log, rej_log)
    _check_same_work(out, done, rows_log.read(), {d.id: d for d in docs}, cfg)
    todo = [d for d in docs if d.id not in done]
    started, n_new, failures_in_a_row = time.perf_counter(), 0, 0
    failed: list[str] = []
    bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc="synthesize", unit="doc",
               disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for s in range(0, len(todo), cfg.batch_docs):
        batch = todo[s : s + cfg.batch_docs]
        try:
            results = synthesize_batch(teacher, batch, cfg)
            failures_in_a_row = 0
        except TeacherError as exc:
            failed.extend(d.id for d in batch)
            failures_in_a_row += 1
            bar.write(f"teacher failed on {len(batch)} documents ({batch[0].id} …): {exc}")
            if failures_in_a_row >= cfg.max_consecutive_failures:
                bar.close()
                raise TeacherError(f"stopping after {failures_in_a_row} failed batches in a row; "
                                   f"{len(done)} documents are done and kept in {out}: rerun to resume. "
                                   f"Last error: {exc}") from exc
            continue
        for res in results:
            rows, entry = _record(res, teacher, cfg)
            rows_log.append(rows)  # the rows first, the done line last: a document cut off between is redone
            rej_log.append([{**r, "doc_id": res.doc.id} for r in res.rejected])
            done_log.append([entry])
            done[res.doc.id] = entry
        n_new += len(batch)
        bar.update(len(batch))
        elapsed = time.perf_counter() - started
        kept_docs = sum(1 for d in done.values() if d["status"] == "kept")
        bar.set_postfix(docs_s=f"{n_new / elapsed:.2f}", yield_=f"{kept_docs / max(1, len(done)):.0%}")
    bar.close()
    elapsed = time.perf_counter() - started

    rows = rows_log.read()
    report = build_report(list(done.values()), rows, teacher.name, teacher.prompt_version, cfg, len(docs), failed,
                          seconds=elapsed, new_docs=n_new, corpus_report=corpus_report)
    _write_outputs(out, rows, report)
    return report


def _write_outputs(out: Path, rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    atomic_write_lines(out / "train.jsonl", (dumps(r) for r in rows if r["split"] == "train"))
    atomic_write_lines(out / "dev.jsonl", (dumps(r) for r in rows if r["split"] == "dev"))
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")


def merge_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path, cfg: SynthesisConfig, *,
                 corpus_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Combine shards synthesized separately (e.g. on Dask workers) into one train/dev split and report.

    Each shard folder holds a finished ``synthesize`` run over a disjoint part of the corpus; the split is
    decided per document, so concatenating shards gives the split one run would have made.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    seconds, new_docs, docs_in, failed = 0.0, 0, 0, []
    teacher = prompts = None
    for d in map(Path, shard_dirs):
        report_path = d / "report.json"
        if not report_path.is_file():
            raise FileNotFoundError(f"{report_path} not found: shard {d} did not finish")
        r = json.loads(report_path.read_text(encoding="utf-8"))
        if teacher is not None and (r["teacher"], r["prompt_version"]) != (teacher, prompts):
            raise ValueError(f"{d}: shard made by {r['teacher']} / {r['prompt_version']}, others by "
                             f"{teacher} / {prompts}")
        teacher, prompts = r["teacher"], r["prompt_version"]
        shard_done = _Log(d / "done.jsonl").read()
        ids = {x["doc_id"] for x in shard_done}
        done += shard_done
        rows += [x for x in _Log(d / "rows.jsonl").read() if x["doc_id"] in ids]
        seconds += r["seconds_this_run"]
        new_docs += r.get("new_documents_this_run", 0)
        docs_in += r["documents_in"]
        failed += [None] * r["documents_failed_this_run"]
    dup = [i for i, c in Counter(x["doc_id"] for x in done).items() if c > 1]
    if dup:
        raise ValueError(f"document {dup[0]!r} appears in more than one shard")
    if teacher is None:
        raise ValueError("no shards to merge")
    report = build_report(done, rows, teacher, prompts, cfg, docs_in, failed, seconds=seconds, new_docs=new_docs,
                          corpus_report=corpus_report)
    report["shards"] = len(shard_dirs)
    _write_outputs(out, rows, report)
    return report


def build_report(done: list[dict[str, Any]], rows: list[dict[str, Any]], teacher: str, prompt_version: str,
                 cfg: SynthesisConfig, docs_in: int, failed: Sequence[Any], *, seconds: float, new_docs: int,
                 corpus_report: dict[str, Any] | None) -> dict[str, Any]:
    status = Counter(d["status"] for d in done)
    checked = sum(d["checked"] for d in done)
    passed = sum(d["passed"] for d in done)
    pairs = {k: sum(d.get(f"pairs_{k}", 0) for d in done if d["status"] == "kept") for k in ("simple", "complex")}
    kept = max(1, status.get("kept", 0))
    return {
        "teacher": teacher,
        "prompt_version": prompt_version,
        "config": asdict(cfg),
        "documents_in": docs_in,
        "documents_done": len(done),
        "documents_kept": status.get("kept", 0),
        "documents_dropped_low_coverage": status.get("low_coverage", 0),
        "documents_without_output": status.get("no_output", 0),
        "documents_failed_this_run": len(failed),
        "rows_out": {k: sum(1 for r in rows if r["kind"] == k) for k in KINDS},
        "rows_by_split": dict(Counter(r["split"] for r in rows)),
        "pairs_out": pairs,
        "avg_pairs_per_kept_document": {k: v / kept for k, v in pairs.items()},
        "verification_pass_rate": passed / checked if checked else None,
        "pairs_checked": checked,
        "pairs_ungrounded": sum(d["ungrounded"] for d in done),
        "duplicates_removed": sum(d["duplicates"] for d in done),
        "paraphrase_rate": sum(1 for d in done if d["paraphrase"]) / max(1, len(done)),
        "mean_coverage_kept": (sum(d["coverage"] for d in done if d["status"] == "kept") / kept),
        "yield_documents": status.get("kept", 0) / max(1, len(done)),
        "seconds_this_run": seconds,
        "new_documents_this_run": new_docs,
        "seconds_per_document": seconds / new_docs if new_docs else None,
        "corpus": corpus_report,
    }


def report_markdown(r: dict[str, Any]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    corpus = r.get("corpus") or {}
    spd = "n/a" if r["seconds_per_document"] is None else f"{r['seconds_per_document']:.2f}"
    lines = [
        f"# Synthesis report — teacher `{r['teacher']}`, prompts `{r['prompt_version']}`",
        "",
        "| figure | value |",
        "|---|---|",
        f"| documents in | {r['documents_in']} |",
        f"| documents done / kept | {r['documents_done']} / {r['documents_kept']} ({pct(r['yield_documents'])}) |",
        f"| dropped: low coverage / no output | {r['documents_dropped_low_coverage']} / "
        f"{r['documents_without_output']} |",
        f"| failed at the teacher (this run) | {r['documents_failed_this_run']} |",
        f"| rows out: simple / complex / paraphrase | {r['rows_out']['simple']} / {r['rows_out']['complex']} / "
        f"{r['rows_out']['paraphrase']} |",
        f"| rows by split | {r['rows_by_split']} |",
        f"| pairs out: simple / complex | {r['pairs_out']['simple']} / {r['pairs_out']['complex']} |",
        f"| pairs per kept document: simple / complex | {r['avg_pairs_per_kept_document']['simple']:.2f} / "
        f"{r['avg_pairs_per_kept_document']['complex']:.2f} |",
        f"| verification pass rate | {pct(r['verification_pass_rate'])} of {r['pairs_checked']} checked |",
        f"| answers not grounded in the document | {r['pairs_ungrounded']} |",
        f"| duplicate questions removed | {r['duplicates_removed']} |",
        f"| paraphrase kept | {pct(r['paraphrase_rate'])} |",
        f"| mean coverage of kept documents | {pct(r['mean_coverage_kept'])} |",
        f"| seconds per document (this run) | {spd} |",
    ]
    if corpus:
        lines += [
            f"| corpus rows read / documents / passages | {corpus.get('rows_read')} / {corpus.get('documents')} / "
            f"{corpus.get('passages')} |",
            f"| corpus rejects / identical duplicates | {corpus.get('rejects')} / "
            f"{corpus.get('identical_duplicates')} |",
        ]
    return "\n".join(lines) + "\n"
