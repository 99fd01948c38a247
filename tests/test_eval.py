import json

import pytest

from clara.config import preset
from clara.data.corpus import read_corpus
from clara.data.records import QARecord, load_qa_records
from clara.eval.datasets import description_retrieval, subsample
from clara.eval.retrievers import BM25Retriever, MiniLMRetriever
from clara.eval.run import REPORT_KEYS, EvalConfig, evaluate
from clara.model import ClaraModel
from conftest import perturb


@pytest.fixture(scope="module")
def models():
    out = {}
    for rate in (16, 64):
        m = ClaraModel.build(preset("tiny", compression_rate=rate))
        perturb(m, seed=rate)
        out[rate] = m
    return out


def test_baseline_retrievers_find_obvious_documents(fixtures):
    docs = read_corpus(fixtures / "corpus.jsonl")
    bm25 = BM25Retriever(docs).retrieve(["Who created the Python programming language?"], 3)[0]
    assert bm25[0][0] == "python" and len(bm25) == 3
    dense = MiniLMRetriever(docs).retrieve(["the tallest mountain on Earth"], 2)[0]
    assert dense[0][0] == "everest" and dense[0][1] >= dense[1][1]


def test_full_evaluation_with_the_tiny_model(fixtures, tmp_path, models):
    docs = read_corpus(fixtures / "corpus.jsonl")
    qa = load_qa_records(fixtures / "qa.jsonl")
    rows = evaluate(qa, docs, models, tmp_path, EvalConfig(k=2, n_candidates=4, max_new_tokens=4),
                    progress=lambda m: None)
    kinds = {(r["system"], r["retriever"], r["setting"], r["rate"]) for r in rows}
    assert ("closed-book", None, "normal", 1) in kinds
    for name in ("bm25", "minilm"):
        assert {("raw-text", name, s, 1) for s in ("normal", "oracle")} <= kinds
    assert {("clara", "clara", s, r) for s in ("normal", "oracle") for r in (16, 64)} <= kinds
    for r in rows:
        assert set(REPORT_KEYS) <= set(r) and r["n"] == len(qa)
        assert 0.0 <= r["cem"] <= 1.0 and r["latency_ms_p50"] <= r["latency_ms_p95"]
        if r["system"] == "closed-book":
            assert r["recall@1"] is None and r["context_tokens"] == 0
        else:
            assert 0.0 <= r["recall@5"] <= 1.0
    raw_oracle = next(r for r in rows if r["system"] == "raw-text" and r["setting"] == "oracle")
    assert raw_oracle["recall@1"] == 1.0  # gold forced first
    bm25_normal = next(r for r in rows if r["retriever"] == "bm25" and r["setting"] == "normal")
    assert bm25_normal["recall@5"] >= 0.75  # lexical overlap is strong on these questions
    clara16 = next(r for r in rows if r["system"] == "clara" and r["rate"] == 16 and r["setting"] == "normal")
    assert clara16["context_tokens"] == 2 * 16 and clara16["real_ratio"] > 0
    preds = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(qa) * len(rows)
    assert all("prediction" in p and "question" in p for p in preds)
    assert "| system |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "quality_vs_rate.png").stat().st_size > 1000
    assert (tmp_path / "latency_vs_rate.png").stat().st_size > 1000


def test_retrieval_only_set_and_errors(tmp_path, models):
    from clara.data.corpus import Document

    docs = [Document(f"d{i}", f"T{i}", f"Text {i} about subject {i}.", meta={"description": f"subject {i}"})
            for i in range(12)]
    qa = description_retrieval(docs)
    qa, docs2 = subsample(qa, docs, 4, 6)
    assert len(qa) == 4 and len(docs2) == 6 and {g for r in qa for g in r.gold_doc_ids} <= {d.id for d in docs2}
    rows = evaluate(qa, docs2, {16: models[16]}, tmp_path, EvalConfig(k=2, baselines=("bm25",)),
                    progress=lambda m: None)
    assert all(r["em"] is None and r["recall@1"] is not None for r in rows)
    assert not any(r["system"] == "closed-book" for r in rows)
    with pytest.raises(ValueError, match="missing from the corpus"):
        evaluate([QARecord("x", "q?", ["a"], ["nope"])], docs, {16: models[16]}, tmp_path)


def test_evaluate_cli(fixtures, tmp_path, models):
    from typer.testing import CliRunner

    from clara.cli import app
    from clara.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(models[16], tmp_path / "ckpt")
    res = CliRunner().invoke(app, ["evaluate", "--qa", str(fixtures / "qa.jsonl"), "--corpus",
                                   str(fixtures / "corpus.jsonl"), "--model", str(ckpt), "--out", str(tmp_path / "e"),
                                   "--k", "2", "--limit", "3", "--max-new-tokens", "3", "--baselines", "bm25"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert {r["system"] for r in report} == {"clara", "raw-text", "closed-book"} and report[0]["n"] == 3
