import hashlib
import json

import pytest

from clara.data.corpus import (
    IngestError,
    ingest_path,
    read_corpus,
    sentences,
    split_passages,
    write_corpus,
    write_rejects,
)


def write_lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


GOOD = json.dumps({"id": "a", "title": "A", "text": "Alpha is first. It comes before beta."})

BAD_ROWS = [
    (b'{"id": "x", "text": "broken', "malformed JSON"),
    (b'["a list"]', "malformed row"),
    (b'{"id": "x", "text": "caf\xe9 au lait"}', "not valid UTF-8"),
    (json.dumps({"title": "no id", "text": "t"}).encode(), "missing field: 'id'"),
    (json.dumps({"id": "x", "title": "no text"}).encode(), "missing field: 'text'"),
    (json.dumps({"id": "x", "text": "   "}).encode(), "empty document"),
    (json.dumps({"id": "x", "text": 42}).encode(), "'text' must be a string"),
    (json.dumps({"id": {"nested": 1}, "text": "t"}).encode(), "'id' must be a string or integer"),
    (json.dumps({"id": "x", "text": "y" * 300_001}).encode(), "document too large"),
    (json.dumps({"id": "x", "text": "bin\u0000ary"}).encode(), "binary content"),
    (json.dumps({"id": "a", "text": "Different text under a known id."}).encode(), "duplicate id: 'a'"),
    (b'{"id": "x", "text": "t", "score": NaN}', "bad field: 'score' holds NaN"),
]


@pytest.mark.parametrize("line, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_fail_fast_names_file_line_and_reason(tmp_path, line, reason):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, "", line])
    with pytest.raises(IngestError, match=rf"c\.jsonl:3: .*{reason}"):
        ingest_path(path)


def test_skip_mode_reports_every_reject_and_keeps_the_rest(tmp_path):
    lines = [GOOD] + [l for l, _ in BAD_ROWS] + [GOOD, json.dumps({"id": 7, "text": "Seven."})]
    path = write_lines(tmp_path / "c.jsonl", lines)
    docs, report = ingest_path(path, on_error="skip")
    assert [d.id for d in docs] == ["a", "7"]
    assert report.identical_duplicates == 1
    assert len(report.rejects) == len(BAD_ROWS)
    for reject, (_, reason) in zip(report.rejects, BAD_ROWS):
        assert reason.split(":")[0] in reject.reason
    out = write_rejects(report.rejects, tmp_path / "rejects.jsonl")
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == len(BAD_ROWS) and rows[0]["where"].endswith("c.jsonl:2")
    assert report.summary()["rejects"] == len(BAD_ROWS)


def test_folder_of_text_files(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "one.txt").write_text("First document. Two sentences.")
    (root / "sub" / "two.md").write_text("# Second Title\nMarkdown body here.")
    (root / "skip.bin").write_bytes(b"\x00\x01")
    (root / "bad.txt").write_bytes(b"\xff\xfe bad")
    docs, report = ingest_path(root, on_error="skip")
    assert {d.id for d in docs} == {"one.txt", "sub/two.md"}
    two = next(d for d in docs if d.id == "sub/two.md")
    assert two.title == "Second Title" and two.text == "Markdown body here."
    assert len(report.rejects) == 1 and "UTF-8" in report.rejects[0].reason


def test_long_documents_split_on_sentence_boundaries(tmp_path):
    text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(40))
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "long", "title": "L", "text": text}), GOOD])
    count = lambda t: len(t.split())  # noqa: E731
    docs, report = ingest_path(path, max_tokens=30, count_tokens=count)
    parts = [d for d in docs if d.parent_id == "long"]
    assert len(parts) > 1 and report.split_documents == 1 and report.passages == len(docs)
    assert all(count(p.text) <= 30 for p in parts)
    assert all(p.text.endswith(".") for p in parts)  # whole sentences
    assert " ".join(p.text for p in parts) == text  # nothing lost
    assert [p.id for p in parts] == [f"long#p{i}" for i in range(len(parts))]
    # A single overlong sentence is cut on word boundaries.
    pieces = split_passages("word " * 100, 30, count)
    assert all(count(p) <= 30 for p in pieces) and sum(count(p) for p in pieces) == 100


def test_sentence_splitter():
    assert sentences("One. Two? Three!") == ["One.", "Two?", "Three!"]
    assert sentences('He said "yes." 1905 was a year. lower case stays') == [
        'He said "yes."', "1905 was a year. lower case stays"]
    assert sentences("  ") == []


def test_written_corpus_is_canonical_and_round_trips(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, json.dumps({"id": "b", "text": "Beta, with ünïcode.",
                                                                 "description": "second"})])
    docs, _ = ingest_path(path)
    a = write_corpus(docs, tmp_path / "out1.jsonl")
    b = write_corpus(list(reversed(list(reversed(docs)))), tmp_path / "out2.jsonl")
    assert hashlib.md5(a.read_bytes()).hexdigest() == hashlib.md5(b.read_bytes()).hexdigest()
    assert "ünïcode" in a.read_text(encoding="utf-8")
    again = read_corpus(a)
    assert again == docs and again[1].meta == {"description": "second"}


def test_missing_corpus_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        ingest_path(tmp_path / "nope.jsonl")


def test_an_empty_corpus_is_an_error_not_a_run_over_zero_passages(tmp_path):
    with pytest.raises(IngestError, match=r"empty\.jsonl: empty corpus: it has no rows"):
        ingest_path(write_lines(tmp_path / "empty.jsonl", []))
    bad = write_lines(tmp_path / "bad.jsonl", [l for l, _ in BAD_ROWS[:3]])
    with pytest.raises(IngestError, match=r"empty corpus: all 3 rows were rejected \(first: .*bad\.jsonl:1: malformed"):
        ingest_path(bad, on_error="skip")
    with pytest.raises(IngestError, match="empty corpus"):
        ingest_path(tmp_path)  # a folder without .txt/.md files


@pytest.mark.slow
def test_a_one_gigabyte_line_is_refused_without_being_held_in_memory(tmp_path):
    """The line is read past in 1 MiB chunks: peak memory stays far below its size, and the next line is read."""
    import resource

    path = tmp_path / "huge.jsonl"
    chunk = b"x" * (1 << 20)
    with path.open("wb") as fh:
        fh.write(GOOD.encode() + b"\n" + b'{"id": "big", "text": "')
        for _ in range(1024):
            fh.write(chunk)
        fh.write(b'"}\n' + json.dumps({"id": "b", "text": "Beta follows."}).encode() + b"\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with pytest.raises(IngestError, match=r"huge\.jsonl:2: line too long: 1,073,741,8\d\d bytes"):
            ingest_path(path)
        docs, report = ingest_path(path, on_error="skip")
    finally:
        path.unlink()  # pytest keeps recent tmp folders: a 1 GB file should not stay behind
    assert [d.id for d in docs] == ["a", "b"] and "line too long" in report.rejects[0].reason
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # < 200 MiB more at peak


def test_an_overlong_line_is_one_reject_and_reading_goes_on(tmp_path):
    from clara.data.records import iter_jsonl

    path = write_lines(tmp_path / "c.jsonl", [GOOD, json.dumps({"id": "x", "text": "y" * 5000}), GOOD])
    rows = list(iter_jsonl(path, max_line_bytes=1000))
    assert [r[2] is None for r in rows] == [True, False, True]
    assert rows[1][0].endswith("c.jsonl:2") and "line too long: 5,02" in rows[1][2] and "at most 1,000" in rows[1][2]


def test_a_row_cannot_take_the_id_of_a_split_documents_passage(tmp_path):
    """A long 'a' becomes a#p0, a#p1, …; a row whose own id is 'a#p1' (before or after it) is rejected, so every
    output id is unique and the output ingests again."""
    long_row = json.dumps({"id": "a", "title": "A", "text": " ".join(f"Sentence {i} is about Paris." for i in range(60))})
    clash = json.dumps({"id": "a#p1", "title": "B", "text": "Bob."})
    count = lambda t: len(t.split())  # noqa: E731
    for order, rejected_line in (([long_row, clash], 2), ([clash, long_row], 2)):
        path = write_lines(tmp_path / "c.jsonl", order)
        with pytest.raises(IngestError, match=rf"c\.jsonl:{rejected_line}: id clash: 'a#p1'"):
            ingest_path(path, max_tokens=30, count_tokens=count)
        docs, report = ingest_path(path, on_error="skip", max_tokens=30, count_tokens=count)
        ids = [d.id for d in docs]
        assert len(ids) == len(set(ids)) and "a#p1" in ids and len(report.rejects) == 1
        out = write_corpus(docs, tmp_path / "out.jsonl")
        assert [d.id for d in read_corpus(out)] == ids  # the output ingests again


def test_folder_ingest_never_follows_a_symbolic_link(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "one.txt").write_text("First document.")
    secret = tmp_path / "outside.txt"
    secret.write_text("A file outside the corpus folder.")
    (root / "leak.txt").symlink_to(secret)
    (root / "loop").symlink_to(root, target_is_directory=True)
    docs, report = ingest_path(root, on_error="skip")
    assert [d.id for d in docs] == ["one.txt"]
    assert sorted(r.where.rsplit("/", 1)[-1] for r in report.rejects) == ["leak.txt", "loop"]
    assert all("symbolic link" in r.reason and "not followed" in r.reason for r in report.rejects)
    with pytest.raises(IngestError, match=r"leak\.txt: symbolic link"):
        ingest_path(root)
