"""Training record schemas and JSONL readers, with errors that name the file and the line.

- SCP records (the authors' format): ``{"data_type": "qa"|"paraphrase", "question": [...], "answers": [...],
  "docs": [doc, ...]}``. For ``qa`` the questions and answers pair up; for ``paraphrase`` ``answers[0]`` is the
  paraphrase. With several docs and one question a record is an instruction-tuning (stage 2) example.
- QA records: ``{"id", "question", "answers": [...], "gold_doc_ids": [...]}`` (``golden_answers`` and
  ``pos_doc_ids`` accepted as aliases).
- Corpus rows: ``{"id", "title", "text"}`` (read through ``clara.data.corpus``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class RecordError(ValueError):
    """A malformed input row; the message starts with ``file:line:``."""


MAX_LINE_BYTES = 16 * 1024 * 1024
"""A JSONL line longer than this is refused without being held in memory (a document is at most
``corpus.DEFAULT_MAX_CHARS`` characters, a few MB even fully escaped)."""


def iter_jsonl(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES
               ) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """``(where, object, None)`` per non-blank line, or ``(where, None, reason)`` for a line that is not valid
    UTF-8, not JSON, not a JSON object, or longer than ``max_line_bytes`` (read past in chunks, never whole).
    ``where`` is ``file:line``."""
    path = Path(path)
    with path.open("rb") as fh:
        n = 0
        while raw := fh.readline(max_line_bytes + 1):
            n += 1
            where = f"{path}:{n}"
            if len(raw) > max_line_bytes:
                size = len(raw)
                while not raw.endswith(b"\n") and (raw := fh.readline(1 << 20)):
                    size += len(raw)
                yield where, None, f"line too long: {size:,} bytes (at most {max_line_bytes:,})"
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, None, f"malformed JSON: {exc.msg} (column {exc.colno})"
                continue
            if not isinstance(obj, dict):
                yield where, None, f"malformed row: expected a JSON object, got {type(obj).__name__}"
                continue
            yield where, obj, None


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(file:line, object)``; raise ``RecordError`` at the first bad line."""
    for where, obj, error in iter_jsonl(path):
        if error is not None:
            raise RecordError(f"{where}: {error}")
        yield where, obj  # type: ignore[misc]


def _str_list(obj: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> list[str]:
    value = obj.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{where}: field {key!r} must be a list of strings")
    if not allow_empty and (not value or not all(v.strip() for v in value)):
        raise RecordError(f"{where}: field {key!r} must hold non-empty strings")
    return value


@dataclass
class SCPRecord:
    data_type: str
    questions: list[str]
    answers: list[str]
    docs: list[str]
    source: str = ""
    """``file:line`` it came from, for error messages downstream."""


def parse_scp_record(obj: dict[str, Any], where: str) -> SCPRecord:
    """One stage-1/2 row. Also the authors' instruct / E2E rows (apple/ml-clara): no ``data_type`` means ``qa``,
    the answer may be ``answer`` (a string) or ``golden_answers``, the documents ``docs``, ``context`` or
    ``content``."""
    data_type = obj.get("data_type", "qa")
    if data_type not in ("qa", "paraphrase"):
        raise RecordError(f"{where}: data_type must be 'qa' or 'paraphrase', got {data_type!r}")
    docs = _str_list(obj, next((k for k in ("docs", "context", "content") if k in obj), "docs"), where)
    answer_key = next((k for k in ("answers", "answer", "golden_answers") if k in obj), "answers")
    answers = _str_list(obj, answer_key, where)
    if answer_key == "golden_answers":
        answers = answers[:1]  # several acceptable answers to one question: the first is the target
    questions = _str_list(obj, "question", where, allow_empty=data_type == "paraphrase")
    if data_type == "qa" and len(questions) != len(answers) and len(questions) != 1:
        raise RecordError(f"{where}: {len(questions)} questions but {len(answers)} answers")
    return SCPRecord(data_type, questions, answers, docs, where)


def read_synth_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a synthesized split (``clara synthesize``'s train.jsonl / dev.jsonl), checked as stage-1 rows
    (``parse_scp_record``: the authors' spellings are read, a wrong type names its ``file:line``) plus a
    ``doc_id``; ``question`` and ``answers`` come back as lists of strings whatever spelling the file used."""
    out = []
    for where, obj in read_jsonl(path):
        rec = parse_scp_record(obj, where)
        if not isinstance(obj.get("doc_id"), str) or not obj["doc_id"]:
            raise RecordError(f"{where}: field 'doc_id' must be a non-empty string (the passage it is about)")
        out.append({**obj, "data_type": rec.data_type, "question": rec.questions, "answers": rec.answers})
    return out


def load_scp_records(path: str | Path) -> list[SCPRecord]:
    records = [parse_scp_record(obj, where) for where, obj in read_jsonl(path)]
    if not records:
        raise RecordError(f"{path}: no records")
    return records


@dataclass
class QARecord:
    id: str
    question: str
    answers: list[str]
    gold_doc_ids: list[str] = field(default_factory=list)


def load_qa_records(path: str | Path) -> list[QARecord]:
    out, seen = [], set()
    for where, obj in read_jsonl(path):
        qid = str(obj.get("id", where.rsplit(":", 1)[1]))
        if qid in seen:
            raise RecordError(f"{where}: duplicate id {qid!r}")
        seen.add(qid)
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise RecordError(f"{where}: field 'question' must be a non-empty string")
        key = next((k for k in ("answers", "golden_answers", "answer") if k in obj), "answers")
        answers = _str_list(obj, key, where)  # the authors' rows carry one "answer" string
        gold_key = "gold_doc_ids" if "gold_doc_ids" in obj else "pos_doc_ids"
        gold_raw = obj.get(gold_key, [])
        # a bare string would be read letter by letter: only a list of ids (strings or integers) is a gold list
        if not isinstance(gold_raw, list) or not all(isinstance(g, (str, int)) and not isinstance(g, bool)
                                                     for g in gold_raw):
            raise RecordError(f"{where}: field {gold_key!r} must be a list of document ids, got {gold_raw!r}")
        gold = [str(g) for g in gold_raw]
        out.append(QARecord(qid, question, answers, gold))
    if not out:
        raise RecordError(f"{path}: no records")
    return out
