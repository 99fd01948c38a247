import json

import pytest

from clara.config import preset
from clara.data.corpus import read_corpus
from clara.data.records import QARecord, load_qa_records
from clara.eval.datasets import description_retrieval, subsample
from clara.retrieval.first_stage import BM25Retriever, MiniLMRetriever
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
    assert {("clara", "clara-exact", s, r) for s in ("normal", "oracle") for r in (16, 64)} <= kinds
    assert {("clara-closed-book", None, "normal", r) for r in (16, 64)} <= kinds
    for r in rows:
        assert set(REPORT_KEYS) <= set(r) and r["n"] == len(qa)
        assert 0.0 <= r["cem"] <= 1.0 and r["latency_ms_p50"] <= r["latency_ms_p95"]
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p95"] <= r["generation_ms_p95"] + 1e-6
        assert r["gold_nll"] > 0 and r["answer_tokens"] >= 0
        if r["system"] in ("closed-book", "clara-closed-book"):
            assert r["recall@1"] is None and r["context_tokens"] == 0
        else:
            assert 0.0 <= r["recall@5"] <= 1.0
    raw_oracle = next(r for r in rows if r["system"] == "raw-text" and r["setting"] == "oracle")
    assert raw_oracle["recall@1"] == 1.0  # gold forced first
    bm25_normal = next(r for r in rows if r["retriever"] == "bm25" and r["setting"] == "normal")
    assert bm25_normal["recall@5"] >= 0.75  # lexical overlap is strong on these questions
    clara16 = next(r for r in rows if r["system"] == "clara" and r["rate"] == 16 and r["setting"] == "normal")
    assert clara16["context_tokens"] == 2 * 16 and clara16["real_ratio"] > 0
    # the gold answer's likelihood is each system's own: CLaRa's generator with and without its memory differ
    clara_closed = next(r for r in rows if r["system"] == "clara-closed-book" and r["rate"] == 16)
    assert clara_closed["gold_nll"] != clara16["gold_nll"]
    preds = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(qa) * len(rows)
    assert all("prediction" in p and "question" in p and p["latency_ms"] > 0 for p in preds)
    assert "| system |" in (tmp_path / "report.md").read_text() and "gold NLL" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "quality_vs_rate.png").stat().st_size > 1000
    assert (tmp_path / "latency_vs_rate.png").stat().st_size > 1000


def test_retrieval_only_set_and_errors(tmp_path, models, monkeypatch):
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
    # a run that fails part-way (here in CLaRa's rows, after the baselines) leaves the earlier run's files whole
    before = {f: (tmp_path / f).read_bytes() for f in ("predictions.jsonl", "report.json", "report.md")}
    from clara.eval import run as run_module

    def broken(self, *a, **k):
        raise RuntimeError("the model died")

    monkeypatch.setattr(run_module._Evaluation, "clara", broken)
    with pytest.raises(RuntimeError, match="died"):
        evaluate(qa, docs2, {16: models[16]}, tmp_path, EvalConfig(k=2, baselines=("bm25",)), progress=lambda m: None)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_an_interrupted_evaluation_answers_only_what_it_had_not_finished(fixtures, tmp_path, models, monkeypatch):
    """A run killed part-way keeps the systems it finished; the same evaluation again takes them back (the scores
    of answering afresh, predictions once each) and builds no index or compression that only they needed; a damaged
    file is answered again. Another evaluation into that folder is refused; another machine's is answered again."""
    from clara.eval import run as run_module

    docs = read_corpus(fixtures / "corpus.jsonl")
    qa = load_qa_records(fixtures / "qa.jsonl")[:3]
    cfg = EvalConfig(k=2, max_new_tokens=3, baselines=("bm25",), settings=("normal",))
    fresh = evaluate(qa, docs, {16: models[16]}, tmp_path / "fresh", cfg, progress=lambda m: None)

    plot = run_module.plot_report  # killed once every system had answered
    monkeypatch.setattr(run_module, "plot_report", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        evaluate(qa, docs, {16: models[16]}, tmp_path, cfg, progress=lambda m: None)
    monkeypatch.setattr(run_module, "plot_report", plot)
    blocks = {json.loads(f.read_text())["key"][0]: f for f in (tmp_path / "partial").glob("*.json")
              if f.name != "identity.json"}
    assert sorted(blocks) == ["clara", "clara-closed-book", "closed-book", "raw-text"]
    blocks["closed-book"].write_text('{"acc": ')  # damaged: that one system is answered again
    said = []
    with pytest.warns(UserWarning, match="is unreadable"):
        rows = evaluate(qa, docs, {16: models[16]}, tmp_path, cfg, progress=said.append)
    assert sum("finished by an earlier run" in m for m in said) == 3 and "closed book" in said
    assert not any(m.startswith(("indexing", "compressing")) for m in said)  # only the taken-back rows needed them
    assert [(r["system"], r["f1"], r["gold_nll"]) for r in rows] == [(r["system"], r["f1"], r["gold_nll"])
                                                                       for r in fresh]
    assert not (tmp_path / "partial").exists()
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(qa) * len(rows) and len({(p["id"], p["system"]) for p in preds}) == len(preds)

    folder, what, where = tmp_path / "p", {"questions": "a"}, {"machine": "here"}
    key = ("closed-book", None, "normal", 1)
    run_module._Partial(folder, what, where, True).put(key, run_module._Acc(), [])
    with pytest.raises(ValueError, match=r"another evaluation \(questions differ\).*--no-resume"):
        run_module._Partial(folder, {"questions": "b"}, where, True)
    assert run_module._Partial(folder, what, where, True).has(key)
    with pytest.warns(UserWarning, match="measured on another machine or by other code; answering them again"):
        assert not run_module._Partial(folder, what, {"machine": "there"}, True).has(key)
    run_module._Partial(folder, what, where, True).put(key, run_module._Acc(), [])
    assert not run_module._Partial(folder, {"questions": "b"}, where, False).has(key)  # --no-resume: discarded


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
    assert {r["system"] for r in report} == {"clara", "clara-closed-book", "raw-text", "closed-book"} and report[0]["n"] == 3


def test_oracle_forces_gold_for_every_system_and_oracle_candidates_is_the_papers(fixtures, tmp_path, models):
    docs = read_corpus(fixtures / "corpus.jsonl")
    qa = load_qa_records(fixtures / "qa.jsonl")
    cfg = EvalConfig(k=2, n_candidates=3, max_new_tokens=2, baselines=("bm25",),
                     settings=("normal", "oracle", "oracle-candidates"), closed_book=False)
    rows = evaluate(qa, docs, {16: models[16]}, tmp_path, cfg, progress=lambda m: None, bars=False)
    by = {(r["system"], r["setting"]): r for r in rows}
    # The same meaning for every system: the gold passage is among the k the generator reads.
    assert by[("raw-text", "oracle")]["recall@1"] == 1.0
    assert by[("clara", "oracle")]["recall@1"] == 1.0
    # The paper's variant only puts gold among the candidates; the query reasoner may still rank it lower.
    cand = by[("clara", "oracle-candidates")]
    assert cand["recall@20"] == 1.0 and cand["n"] == len(qa)
    assert ("raw-text", "oracle-candidates") not in by
    with pytest.raises(ValueError, match=r"settings \['gold'\] \(known: normal, oracle, oracle-candidates\)"):
        EvalConfig(settings=("gold",))  # refused when made, before any model or system runs


def test_gold_that_names_a_split_document_counts_any_of_its_passages(tmp_path, models):
    from clara.data.corpus import Document

    long = [Document(f"big#p{i}", "Big", f"Part {i} of the big article about volcanoes {i}.", parent_id="big")
            for i in range(3)]
    topics = ["rivers", "deserts", "glaciers", "forests"]
    docs = long + [Document(f"d{i}", f"T{i}", f"Text about {t}.") for i, t in enumerate(topics)]
    qa = [QARecord("q", "Which article is about volcanoes?", ["volcanoes"], ["big"]),
          QARecord("r", "Which text is about glaciers?", ["glaciers"], ["d2"])]
    cfg = EvalConfig(k=2, max_new_tokens=2, baselines=("bm25",), closed_book=False)
    rows = evaluate(qa, docs, {16: models[16]}, tmp_path, cfg, progress=lambda m: None, bars=False)
    bm25 = next(r for r in rows if r["retriever"] == "bm25" and r["setting"] == "normal")
    assert bm25["recall@1"] == 1.0  # a passage of "big" first counts as finding "big"
    oracle = next(r for r in rows if r["system"] == "clara" and r["setting"] == "oracle")
    assert oracle["recall@1"] == 1.0
    preds = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    forced = next(p for p in preds if p["system"] == "clara" and p["setting"] == "oracle" and p["id"] == "q")
    assert forced["retrieved"][0].startswith("big#p")
    with pytest.raises(ValueError, match="missing from the corpus"):
        evaluate([QARecord("x", "q?", ["a"], ["bigger"])], docs, {16: models[16]}, tmp_path)


def test_untrained_query_reasoner_is_replaced_by_the_compressor(fixtures, tmp_path):
    import torch

    m = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(m, seed=3)
    m.reset_adapter("query_reasoner")  # a checkpoint that never went through E2E
    assert m.adapter_is_zero("query_reasoner") and not m.adapter_is_zero("compressor")
    docs = read_corpus(fixtures / "corpus.jsonl")
    qa = load_qa_records(fixtures / "qa.jsonl")[:2]
    rows = evaluate(qa, docs, {16: m}, tmp_path, EvalConfig(k=2, max_new_tokens=2, baselines=(), closed_book=False),
                    progress=lambda msg: None, bars=False)
    assert {r["query_reasoner"] for r in rows if r["system"] == "clara"} == {"compressor copy (no E2E)"}
    assert "compressor copy (no E2E)" in (tmp_path / "report.md").read_text()
    assert m.adapter_is_zero("query_reasoner")  # the caller's model as it was: evaluated again, labelled again
    again = evaluate(qa, docs, {16: m}, tmp_path / "again", EvalConfig(k=2, max_new_tokens=2, baselines=(),
                                                                       closed_book=False), progress=lambda msg: None)
    assert [r["query_reasoner"] for r in again] == [r["query_reasoner"] for r in rows]
    assert m.ensure_query_reasoner()
    with torch.no_grad():
        q = m.encode_queries(["What is the capital of France?"])[0]
        with m.adapter("compressor"):
            c = m.encode_texts(["What is the capital of France?"], max_len=m.cfg.query_max_len, query=True).memory[0]
    torch.testing.assert_close(q, c)
    trained = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(trained, seed=4)
    rows = evaluate(qa, docs, {16: trained}, tmp_path, EvalConfig(k=2, max_new_tokens=2, baselines=(),
                                                                   closed_book=False), progress=lambda msg: None)
    assert {r["query_reasoner"] for r in rows if r["system"] == "clara"} == {"trained"}


def test_store_evaluation_reports_every_first_stage_alone_and_reranked(fixtures, tmp_path, models, engine):
    from clara.retrieval.dense import DenseEncoder
    from clara.store.loading import index_corpus

    docs = read_corpus(fixtures / "corpus.jsonl")
    qa = load_qa_records(fixtures / "qa.jsonl")
    build = index_corpus(engine, models[16], docs, model_uri="eval-modes", corpus_version="eval-modes-v1",
                         dense=DenseEncoder(), progress=False)
    assert build.dense_model == "all-MiniLM-L6-v2" and build.dense_dim == 384
    cfg = EvalConfig(k=2, max_new_tokens=2, baselines=("bm25", "minilm"), closed_book=False, settings=("normal",))
    rows = evaluate(qa, docs, {16: models[16]}, tmp_path, cfg, stores={16: (engine, build)},
                    progress=lambda m: None, bars=False)
    first = {r["retriever"]: r for r in rows if r["system"] == "first-stage"}
    reranked = {r["retriever"]: r for r in rows if r["setting"] == "retrieval" and r["system"] == "clara"}
    assert set(first) == {"clara", "dense", "lexical", "hybrid"}
    assert set(reranked) == {f"{m}+rerank" for m in first}
    # Postgres BM25 and the dense stage find what the in-memory BM25 and MiniLM find on these easy questions.
    bm25 = next(r for r in rows if r["retriever"] == "bm25")
    minilm = next(r for r in rows if r["retriever"] == "minilm")
    assert first["lexical"]["recall@5"] >= bm25["recall@5"] - 0.13
    assert first["dense"]["recall@5"] == pytest.approx(minilm["recall@5"])
    assert first["hybrid"]["recall@20"] == 1.0 and first["hybrid"]["retrieval_ms_p50"] > 0
    # Re-ranking 20 candidates reorders them: the top 20 hold the same documents.
    for mode in ("dense", "lexical", "hybrid"):
        assert reranked[f"{mode}+rerank"]["recall@20"] == first[mode]["recall@20"]
    # where the re-ranked retrieval's time goes: every stage of the served path, timed per question
    from clara.retrieval.timing import STAGES

    for mode in ("dense", "lexical", "hybrid"):
        stages = reranked[f"{mode}+rerank"]["retrieval_stages_ms_p50"]
        assert set(stages) == set(STAGES) - ({"question embedding"} if mode == "lexical" else set())
        assert all(v > 0 for v in stages.values()) and sum(stages.values()) <= reranked[f"{mode}+rerank"][
            "retrieval_ms_p50"] * 1.5
    qa_row = next(r for r in rows if r["system"] == "clara" and r["setting"] == "normal")
    assert qa_row["retriever"] == "hybrid" and qa_row["mode"] == "hybrid"
    # rerank="auto" with an E2E-trained query reasoner: the answers re-rank only as the retrieval rows measured
    from clara.retrieval.rerank import measured_rerank

    paid, why = measured_rerank(first["hybrid"], reranked["hybrid+rerank"], cfg.k)
    assert qa_row["query_reasoner"] == "trained" and qa_row["rerank"] is paid and qa_row["rerank_evidence"] == why
    assert reranked["hybrid+rerank"]["rerank"] is paid and f"on {len(qa)} questions" in why
    served = first["hybrid"] if not paid else reranked["hybrid+rerank"]
    assert qa_row["recall@5"] == pytest.approx(served["recall@5"]) and qa_row["recall@1"] == pytest.approx(
        served["recall@1"])
    # A second evaluation with reuse finds the same build instead of compressing again.
    again = index_corpus(engine, models[16], docs, model_uri="eval-modes", corpus_version="eval-modes-v1",
                         dense=DenseEncoder(), reuse=True, progress=False)
    assert again.id == build.id


def test_evaluate_cli_pairs_each_model_with_its_own_store_build(fixtures, tmp_path, models, engine):
    from typer.testing import CliRunner

    from clara.cli import app
    from clara.model.checkpoint import save_checkpoint
    from clara.store.builds import list_builds

    ck16 = save_checkpoint(models[16], tmp_path / "ck16")
    ck64 = save_checkpoint(models[64], tmp_path / "ck64")
    before = {b.id for b in list_builds(engine)}
    url = engine.url.render_as_string(hide_password=False)
    res = CliRunner().invoke(app, ["evaluate", "--qa", str(fixtures / "qa.jsonl"), "--corpus",
                                   str(fixtures / "corpus.jsonl"), "--model", str(ck16), "--model", str(ck64),
                                   "--rates", "64", "--use-store", "--database-url", url, "--out", str(tmp_path / "e"),
                                   "--k", "2", "--limit", "2", "--max-new-tokens", "2", "--baselines", "",
                                   "--mode", "lexical"])
    assert res.exit_code == 0, res.output
    new = [b for b in list_builds(engine) if b.id not in before]
    # Rate 16 was filtered out: the rate-64 model must be paired with its own checkpoint, not the first one.
    assert [(b.compression_rate, b.model_uri) for b in new] == [(64, str(ck64))]
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert {r["rate"] for r in report if r["system"] == "clara"} == {64}
    assert next(r for r in report if r["system"] == "clara" and r["setting"] == "normal")["retriever"] == "lexical"


def test_evaluation_answers_as_served_the_same_as_through_the_adapters(fixtures, tmp_path, monkeypatch):
    """``EvalConfig.merge``: the served path (merged copies, cached prefix) gives the same predictions and
    retrieval as the adapters (fp32, no autocast, so only merge rounding differs) and leaves the model as it was."""
    docs = read_corpus(fixtures / "corpus.jsonl")
    qa = load_qa_records(fixtures / "qa.jsonl")
    model = ClaraModel.build(preset("tiny", compression_rate=16, amp="off"))
    perturb(model, seed=3)
    merged = []
    original = ClaraModel.merge_adapters
    monkeypatch.setattr(ClaraModel, "merge_adapters", lambda self, names: (merged.append(list(names)),
                                                                          original(self, names))[1])
    predictions = {}
    for merge in (False, True):
        out = tmp_path / str(merge)
        cfg = EvalConfig(k=2, max_new_tokens=6, baselines=("bm25",), merge=merge)
        rows = evaluate(qa, docs, {16: model}, out, cfg, progress=lambda m: None, bars=False)
        predictions[merge] = [(p["system"], p["prediction"], p["retrieved"])
                              for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())]
        assert model.merged_adapters == [] and model._prefix_cache is None and rows
    assert merged == [[None], ["generator", "query_reasoner"]]  # the raw-text base, then CLaRa's served adapters
    assert predictions[True] == predictions[False]


def test_the_measured_rerank_pays_only_with_more_gold_among_what_the_generator_reads():
    from clara.retrieval.rerank import measured_rerank

    first = {"n": 24, "recall@1": 1.0, "recall@3": 1.0, "recall@5": 1.0, "recall@20": 1.0}
    # the pipeline's 10-step E2E re-rank (docs/quality.md): lost R@1, same R@5 -> the first stage's order
    lost = {**first, "recall@1": 0.75, "recall@3": 0.917}
    assert measured_rerank(first, lost, 5) == (False, "re-ranked R@5 100.0 / R@1 75.0 vs first stage 100.0 / 100.0"
                                                      " on 24 questions")
    assert measured_rerank(first, dict(first), 5)[0] is False  # a tie: the re-rank costs time for nothing
    weak = {**first, "recall@1": 0.5, "recall@3": 0.6, "recall@5": 0.7}
    assert measured_rerank(weak, {**weak, "recall@5": 0.75, "recall@1": 0.4}, 5)[0] is True  # more gold in the k
    assert measured_rerank(weak, {**weak, "recall@1": 0.55}, 5)[0] is True  # as many, and more at rank 1
    assert measured_rerank(weak, {**weak, "recall@3": 0.9, "recall@5": 0.6}, 2)[0] is True  # k=2 reads R@3
    assert measured_rerank(weak, {**weak, "recall@5": 0.9, "recall@20": 0.5}, 50)[0] is False  # past 20: R@20
    no_gold = {k: None for k in first if k.startswith("recall@")}
    assert measured_rerank(no_gold, no_gold, 5) is None


def test_a_query_reasoner_e2e_never_trained_does_not_rerank_unless_asked(fixtures, tmp_path, engine, monkeypatch):
    """``rerank="auto"`` (``clara.retrieval.rerank.use_rerank``): with a zero query reasoner, evaluation and the
    served path keep the first stage's order and never run the query reasoner; ``always`` gives it the
    compressor's weights first (as evaluation does) instead of encoding questions with the bare base."""
    from clara.retrieval.dense import DenseEncoder
    from clara.serving import Answerer
    from clara.store.loading import index_corpus
    from clara.store.search import first_stage

    docs = read_corpus(fixtures / "corpus.jsonl")
    qa = load_qa_records(fixtures / "qa.jsonl")
    m = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(m, seed=16)
    m.reset_adapter("query_reasoner")
    assert m.adapter_is_zero("query_reasoner")
    build = index_corpus(engine, m, docs, model_uri="eval-untrained-qr", corpus_version="eval-modes-v1",
                         dense=DenseEncoder(), progress=False)
    encoded = []
    original = ClaraModel.encode_queries
    monkeypatch.setattr(ClaraModel, "encode_queries", lambda self, qs, **kw: (encoded.append(len(qs)),
                                                                            original(self, qs, **kw))[1])
    answerer = Answerer(m, engine, build, k=2, max_new_tokens=2)
    assert not answerer.retriever.rerank and m.adapter_is_zero("query_reasoner")
    question = qa[0].question
    got = answerer.ask([question])[0]
    dense_query = answerer.retriever.dense_queries([question])[0]
    top = first_stage(engine, build, "hybrid", 20, text_query=question, dense_query=dense_query)
    assert got.doc_ids == [d for d, _ in top[:2]] and encoded == []
    cfg = EvalConfig(k=2, max_new_tokens=2, baselines=(), closed_book=False, settings=("normal",),
                     retrieval_modes=("hybrid",))
    rows = evaluate(qa, docs, {16: m}, tmp_path, cfg, stores={16: (engine, build)}, progress=lambda x: None,
                    bars=False)
    row = next(r for r in rows if r["system"] == "clara" and r["setting"] == "normal")
    first = next(r for r in rows if r["system"] == "first-stage")
    assert row["rerank"] is False and row["query_reasoner"] == "compressor copy (no E2E)"
    assert row["recall@5"] == first["recall@5"] and row["recall@1"] == first["recall@1"]
    # asked to re-rank anyway: the compressor's copy encodes the question, as in evaluation
    m.reset_adapter("query_reasoner")
    encoded.clear()
    always = Answerer(m, engine, build, k=2, max_new_tokens=2, rerank="always")
    assert always.retriever.rerank and not m.adapter_is_zero("query_reasoner")
    always.ask([question])
    assert encoded == [1]
    with pytest.raises(ValueError, match="rerank"):
        Answerer(m, engine, build, rerank="sometimes")
