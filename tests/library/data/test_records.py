import json

import pytest

from clara.data.corpus import read_corpus
from clara.data.records import RecordError, load_qa_records, load_scp_records


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return p


def test_fixture_files_load(fixtures):
    assert len(load_scp_records(fixtures / "scp.jsonl")) == 16
    assert len(load_qa_records(fixtures / "qa.jsonl")) == 8
    assert len({d.id: d.full_text for d in read_corpus(fixtures / "corpus.jsonl")}) == 8


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"data_type": "summary", "question": [], "answers": ["a"], "docs": ["d"]}), "data_type"),
        (json.dumps({"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": []}), "'docs'"),
        (json.dumps({"data_type": "qa", "question": ["q1", "q2"], "answers": ["a"] * 3, "docs": ["d"]}),
         "2 questions but 3 answers"),
        (json.dumps({"data_type": "paraphrase", "question": [], "answers": [""], "docs": ["d"]}), "'answers'"),
    ],
)
def test_scp_errors_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"data_type": "paraphrase", "question": [], "answers": ["p"], "docs": ["d"]})
    p = write(tmp_path, "scp.jsonl", [good, "", line])
    with pytest.raises(RecordError, match=rf"scp.jsonl:3: .*{message}"):
        load_scp_records(p)


def test_non_utf8_and_empty_files(tmp_path):
    p = write(tmp_path, "bad.jsonl", [json.dumps({"id": "a", "text": "x"}), b'{"id": "b", "text": "caf\xe9"}'])
    with pytest.raises(RecordError, match=r"bad.jsonl:2: not valid UTF-8"):
        {d.id: d.full_text for d in read_corpus(p)}
    with pytest.raises(RecordError, match="no records"):
        load_scp_records(write(tmp_path, "empty.jsonl", [""]))


def test_corpus_and_qa_validation(tmp_path):
    p = write(tmp_path, "c.jsonl", [json.dumps({"id": "a", "text": "x"}), json.dumps({"id": "a", "text": "y"})])
    with pytest.raises(RecordError, match=r"c.jsonl:2: duplicate id: 'a'"):
        {d.id: d.full_text for d in read_corpus(p)}
    p = write(tmp_path, "c2.jsonl", [json.dumps({"id": "a", "text": "  "})])
    with pytest.raises(RecordError, match="empty document"):
        {d.id: d.full_text for d in read_corpus(p)}
    p = write(tmp_path, "q.jsonl", [json.dumps({"id": 1, "question": "q?", "golden_answers": ["x"],
                                                "pos_doc_ids": [3]})])
    rec = load_qa_records(p)[0]
    assert rec.answers == ["x"] and rec.gold_doc_ids == ["3"] and rec.id == "1"
    p = write(tmp_path, "q2.jsonl", [json.dumps({"id": 1, "question": "", "answers": ["x"]})])
    with pytest.raises(RecordError, match="'question'"):
        load_qa_records(p)
    # a bare string would be split into letters ('abc' -> a, b, c): refused with the file and line
    p = write(tmp_path, "q3.jsonl", [json.dumps({"id": 1, "question": "q?", "answers": ["x"],
                                                 "gold_doc_ids": "abc"})])
    with pytest.raises(RecordError, match=r"q3.jsonl:1: field 'gold_doc_ids' must be a list of document ids"):
        load_qa_records(p)


def test_the_authors_instruct_and_e2e_rows_are_read(tmp_path):
    # apple/ml-clara rows: no data_type, "answer" a string, gold as indices into the row's own docs
    p = tmp_path / "instruct.jsonl"
    p.write_text(json.dumps({"question": "Who wrote it?", "docs": ["d1", "d2"], "gold_answer": "Ann",
                             "answer": "Ann"}) + "\n" +
                 json.dumps({"question": "When?", "context": ["d3"], "golden_answers": ["1999", "in 1999"]}) + "\n")
    a, b = load_scp_records(p)
    assert (a.data_type, a.questions, a.answers, a.docs) == ("qa", ["Who wrote it?"], ["Ann"], ["d1", "d2"])
    assert (b.answers, b.docs) == (["1999"], ["d3"])
    q = tmp_path / "e2e.jsonl"
    q.write_text(json.dumps({"question": "Who?", "docs": ["x", "y"], "answer": "Ann", "pos_index": [1]}) + "\n")
    (r,) = load_qa_records(q)
    assert r.question == "Who?" and r.answers == ["Ann"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Who?", "docs": ["x"], "answer": 3}) + "\n")
    with pytest.raises(RecordError, match="'answer' must be a list of strings"):
        load_scp_records(bad)
