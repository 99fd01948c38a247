"""The pipeline end to end against real services: a real MLflow server (started by infra/), Prefect's test
harness (a real Prefect server on a temporary database), the embedded Postgres, DVC in a scratch git repo.

The tiny preset keeps each pipeline run to seconds. No test depends on another having run: the first pipeline run
is a fixture (``first_run``) that whichever test needs it starts, and the tests that move aliases around work on
their own registered model names, so every test passes alone, in any order."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow

TINY = dict(preset="tiny", init_from="none", max_docs=40, scp_steps=3, scp_batch_size=2, instruct_steps=2, instruct_batch_size=1,
            e2e_steps=2, e2e_batch_size=2,
            eval_questions=5, top_k=2, n_candidates=4, baselines="bm25")


def run_pipeline(**flat):
    """The parent flow called with flat settings (``clara_flows.params.grouped`` sorts them into its groups)."""
    from clara_flows.params import grouped
    from clara_flows.pipeline import full_pipeline

    return full_pipeline(**grouped(**flat))


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """MLflow server + Prefect harness + embedded Postgres, with every path and port private to this module."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    from clara.store.server import embedded_server, sqlalchemy_url
    from clara_infra import services as infra

    root = tmp_path_factory.mktemp("services")
    layout = infra.Layout(root / "state", free_port(), free_port())
    saved = dict(os.environ)
    db = os.environ.get("CLARA_DATABASE_URL") or sqlalchemy_url(embedded_server(root / "pg").get_uri())
    os.environ.update({"MLFLOW_TRACKING_URI": layout.mlflow_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
                       "CLARA_DATABASE_URL": db, "CLARA_CACHE_DIR": str(root / "cache")})
    # MLflow's backend store on the same Postgres as the corpus store, as `clara_infra.services up` runs it
    assert infra.mlflow_up(layout, infra.mlflow_backend(layout, db)) == "started"
    assert infra.mlflow_up(layout) == "running"  # idempotent: a healthy server is left alone
    try:
        with prefect_test_harness(server_startup_timeout=120), prefect.settings.temporary_settings(
                updates={prefect.settings.PREFECT_LOCAL_STORAGE_PATH: root / "prefect-results"}):
            yield {"layout": layout, "root": root, "db": db}
    finally:
        infra._stop(layout, "mlflow")
        os.environ.clear()
        os.environ.update(saved)


def _make_repo(path: Path, remote: Path) -> Path:
    """A git + DVC project with a local remote, as a user's checkout would be."""
    from clara.data.versioning import init

    path.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                ["git", "config", "user.name", "t"], ["git", "commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(cmd, cwd=path, check=True)
    init(path, remote=remote)
    return path


@pytest.fixture(scope="module")
def repo(services):
    return _make_repo(services["root"] / "project", services["root"] / "dvc-remote")


def _client():
    from clara_flows import tracking

    return tracking.client()


def services_db() -> str:
    return os.environ["CLARA_DATABASE_URL"]


def _pipeline_runs(status: str) -> list:
    c = _client()
    exp = c.get_experiment_by_name("clara")
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], f"tags.`clara.stage` = 'pipeline' AND attributes.status = '{status}'")


def _versions(name: str = "clara") -> list:
    return _client().search_model_versions(f"name = '{name}'")


@pytest.fixture(scope="module")
def first_run(services, repo):
    """A run that fails at its last stage (an unknown gate metric), then the same run again: the rerun must
    reuse every finished stage. Whichever test first needs a trained, registered model starts this."""

    failed_before, versions_before = len(_pipeline_runs("FAILED")), len(_versions())
    with pytest.raises(ValueError, match="gate metric 'no-such-metric'"):
        run_pipeline(**TINY, gate_metric="no-such-metric", project_dir=str(repo))
    failure = {"new_failed_runs": len(_pipeline_runs("FAILED")) - failed_before,
               "new_versions": len(_versions()) - versions_before}
    result = run_pipeline(**TINY, project_dir=str(repo))
    return {**result, "failure": failure}


def test_failed_run_is_recorded_and_rerun_resumes_from_cached_stages(first_run):
    assert first_run["failure"] == {"new_failed_runs": 1, "new_versions": 0}  # recorded, nothing registered
    # Everything up to the failure was reused, not recomputed.
    assert {"synthesize", "pretrain_scp", "instruct", "train_e2e", "compress_corpus", "evaluate"} <= \
        set(first_run["cached"])
    assert "promote" not in first_run["cached"]


def test_run_left_registered_models_alias_build_and_lineage(first_run, repo):
    from clara.data.versioning import data_version, status_clean
    from clara.store.builds import get_build
    from clara.store.db import connect
    from clara_flows import tracking
    from clara_flows.registry import history

    result = first_run
    c = _client()
    assert result["promotion"]["alias"] == "production"  # the first version of a model is production at once
    assert history(c, "clara")[0]["version"] == result["promotion"]["version"]
    prod = c.get_model_version("clara", result["promotion"]["version"])
    assert prod.tags["data_version"] == data_version(repo) == result["data"]["data_version"]
    assert "eval.f1" in prod.tags and prod.tags["build_id"] == str(result["build"]["build_id"])
    # rerank "auto" after E2E: the version serves what its evaluation chose from its own retrieval rows
    assert prod.tags["retrieval.rerank_setting"] == "auto"
    assert prod.tags["retrieval.rerank"] == result["evaluation"]["rerank"] in ("always", "never")
    assert prod.tags["retrieval.rerank_evidence"] == result["evaluation"]["rerank_evidence"]
    assert "vs first stage" in prod.tags["retrieval.rerank_evidence"]
    summary = c.download_artifacts(result["parent_run"], "summary.md")
    assert f"{prod.tags['retrieval.rerank_evidence']}." in open(summary, encoding="utf-8").read()
    assert c.search_model_versions("name = 'clara-compressor'")

    build = get_build(connect(), result["build"]["build_id"])
    assert build.status == "ready" and build.n_docs == TINY["max_docs"]
    assert build.model_uri == result["e2e"]["model_uri"]

    parent = c.get_run(result["parent_run"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["data_version"] == data_version(repo)
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["git_commit"]
    exp = parent.info.experiment_id
    pipelines = {r.info.run_id for r in c.search_runs([exp], "tags.`clara.stage` = 'pipeline'")}
    stage_runs = c.search_runs([exp], "tags.`clara.stage` != 'pipeline'")
    assert {r.data.tags["clara.stage"] for r in stage_runs} == {"synthesize", "pretrain_scp", "instruct", "train_e2e",
                                                               "compress_corpus", "evaluate", "promote"}
    assert all(r.data.tags["mlflow.parentRunId"] in pipelines for r in stage_runs)  # nested, one level
    # What a user sees in the MLflow UI: a model-training experiment (runs and charts, not the GenAI overview)
    # whose stage runs name the DVC-versioned data they read in the Dataset column.
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow 3.17's UI picks its view from the address, not that tag: the links we print ask for model training
    assert "workflowType=machine_learning" in tracking.run_url(parent.info.run_id, exp)
    assert parent.data.tags["mlflow.source.name"] == "flows/pipeline.py"
    # the pipeline's own row names its data too (the stage rows are folded under it in the runs table)
    parent_inputs = {(d.dataset.name, t.value) for d in parent.inputs.dataset_inputs for t in d.tags}
    assert {("corpus/wiki_en", "corpus"), ("synth/wiki_en/mix/scp", "training"),
            ("synth/wiki_en/dev", "evaluation")} <= parent_inputs, parent_inputs
    for stage, context in (("scp", "training"), ("e2e", "training"), ("evaluation", "evaluation"),
                           ("build", "corpus")):
        inputs = c.get_run(result[stage]["run_id"]).inputs.dataset_inputs
        assert context in {t.value for d in inputs for t in d.tags}, (stage, inputs)
        assert all(json.loads(d.dataset.source)["data_version"] == result["data"]["data_version"] for d in inputs)
    assert "synth/wiki_en/dev" in {d.dataset.name for d in c.get_run(result["evaluation"]["run_id"]).inputs
                                   .dataset_inputs}
    # The tracking server keeps its runs in the same Postgres as the corpus store.
    from sqlalchemy import create_engine, make_url, text

    mlflow_db = create_engine(make_url(services_db()).set(database="mlflow"))
    with mlflow_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM runs WHERE run_uuid = :r"),
                            {"r": result["scp"]["run_id"]}).scalar() == 1
    mlflow_db.dispose()
    scp_losses = c.get_metric_history(result["scp"]["run_id"], "loss")
    assert [m.step for m in scp_losses] == list(range(1, TINY["scp_steps"] + 1))  # one point per step
    artifacts = {a.path for a in c.list_artifacts(result["evaluation"]["run_id"], "evaluation")}
    assert "evaluation/report.json" in artifacts
    assert status_clean(repo)  # dvc status has nothing to report
    assert (repo / "data" / "synth" / "wiki_en" / "train.jsonl").is_file()


def test_second_run_with_same_inputs_skips_every_stage(first_run, repo):
    from clara.store.builds import list_builds
    from clara.store.db import connect


    before = run_pipeline(**TINY, project_dir=str(repo))  # whatever other tests ran, these inputs have a finished run now
    versions, builds = len(_versions()), len(list_builds(connect()))
    again = run_pipeline(**TINY, project_dir=str(repo))
    assert set(again["cached"]) == {"synthesize", "pretrain_scp", "instruct", "train_e2e", "compress_corpus", "evaluate",
                                    "promote"}
    assert again["promotion"]["version"] == before["promotion"]["version"]  # no duplicate registration
    assert again["build"]["build_id"] == before["build"]["build_id"]
    assert len(_versions()) == versions and len(list_builds(connect())) == builds


def test_production_model_loads_from_the_registry_and_answers(first_run):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/clara@production")
    assert model.model_config["rerank"] == first_run["evaluation"]["rerank"]  # what evaluation chose and measured
    out = model.predict(pd.DataFrame({"question": ["What is an urban area?", "Who founded Rome?"]}))
    assert list(out.columns) == ["question", "answer", "doc_ids", "titles", "scores"]
    assert model.metadata.get_output_schema().input_names() == list(out.columns)  # what the UI lists as Outputs
    assert len(out) == 2 and all(isinstance(a, str) for a in out["answer"])
    assert all(len(ids) == TINY["top_k"] for ids in out["doc_ids"])
    assert all(s == sorted(s, reverse=True) for s in out["scores"])
    # k is a declared parameter of the signature (an undeclared one MLflow drops with a warning)
    one = model.predict(pd.DataFrame({"question": ["Who founded Rome?"]}), params={"k": 1})
    assert len(one["doc_ids"][0]) == 1 and TINY["top_k"] > 1
    compressor = mlflow.pyfunc.load_model(first_run["scp"]["model_uri"])
    mem = compressor.predict(pd.DataFrame({"text": ["Paris is the capital of France."]}))
    assert mem["n_mem"][0] == len(mem["memory"][0]) > 0
    assert compressor.metadata.get_output_schema().input_names() == list(mem.columns)


PIPELINE_ONLY = {"prefect", "dvc", "spacy", "bm25s", "dask", "distributed"}
"""Packages of the `pipeline` extra that nothing a served model depends on brings in (matplotlib and httpx come
with MLflow itself)."""


def test_mlflow_models_serve_answers_over_http(first_run, tmp_path):
    import httpx

    from conftest import scoring_server

    # The server runs with the `pipeline` extra's packages made unimportable (a sitecustomize on its path): a
    # serving environment built from the model's requirements does not have them, so answering must not need them.
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(PIPELINE_ONLY)!r}:\n"
        "            raise ImportError(f'serving imported {name}, a package of the pipeline extra')\n"
        "sys.meta_path.insert(0, _Refuse())\n")
    log = tmp_path / "serve.log"
    with scoring_server("models:/clara@production", log, {"PYTHONPATH": str(guard)}) as (url, proc):
        r = httpx.post(f"{url}/invocations", timeout=60,
                       json={"dataframe_records": [{"question": "What is an urban area?"}]})
        assert r.status_code == 200, (r.text, log.read_text()[-2000:])
        (pred,) = r.json()["predictions"]
        assert isinstance(pred["answer"], str) and len(pred["titles"]) == TINY["top_k"]
        r = httpx.post(f"{url}/invocations", timeout=60,
                       json={"dataframe_records": [{"question": "What is an urban area?"}], "params": {"k": 1}})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["titles"]) == 1, r.text[:500]
        # malformed requests get a 4xx that says what is wrong, and the server keeps answering
        bad = {"no question column": ([{"query": "What is an urban area?"}], "missing inputs ['question']"),
               "a 1 MB question": ([{"question": "x" * 1_000_000}], "at most 2,000 are accepted"),
               "a number": ([{"question": 42}], "expected a string"),
               "an empty question": ([{"question": "  "}], "empty question")}
        for case, (records, message) in bad.items():
            r = httpx.post(f"{url}/invocations", timeout=60, json={"dataframe_records": records})
            assert 400 <= r.status_code < 500 and message in r.text, (case, r.status_code, r.text[:500])
        r = httpx.post(f"{url}/invocations", timeout=60, content=b"{not json",
                       headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500
        assert proc.poll() is None
        r = httpx.post(f"{url}/invocations", timeout=60,
                       json={"dataframe_records": [{"question": "What is an urban area?"}]})
        assert r.status_code == 200


def _register_copy(first_run, name: str, shift: float) -> str:
    """A version of model ``name`` (the first run's logged model) whose evaluation is the first run's with every
    per-question F1 shifted by ``shift``: the same questions and latencies, so the gate pairs them."""
    import json
    import tempfile

    from clara_flows.registry import register

    c = _client()
    source = c.get_model_version("clara", first_run["promotion"]["version"])
    model_uri = f"models:/{source.model_id}" if getattr(source, "model_id", None) else source.source
    evaluated = source.tags["eval.run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(c.download_artifacts(evaluated, "evaluation/predictions.jsonl", tmp), encoding="utf-8") as f:
            entries = [json.loads(line) for line in f]
    for e in entries:
        if "scores" in e:
            e["scores"]["f1"] += shift
    run = c.create_run(c.get_run(evaluated).info.experiment_id).info.run_id
    c.log_text(run, "".join(json.dumps(e) + "\n" for e in entries), "evaluation/predictions.jsonl")
    c.set_terminated(run)
    return register(c, name, model_uri, {"eval.f1": float(source.tags["eval.f1"]) + shift, "eval.run_id": run})


def test_gate_keeps_production_unless_the_new_version_is_better(first_run):
    from clara_flows.registry import gate, history

    c, name = _client(), "clara-gate-test"
    first = _register_copy(first_run, name, 0.0)
    assert gate(c, name, first, "f1").alias == "production"  # a model's first version: production at once
    worse = _register_copy(first_run, name, -0.5)
    d = gate(c, name, worse, "f1")
    assert d.alias == "challenger" and f"production stays v{first}" in d.reason and d.ci_high < 0
    assert c.get_model_version_by_alias(name, "production").version == first
    assert c.get_model_version_by_alias(name, "challenger").version == worse
    assert c.get_model_version(name, worse).tags["gate.reason"] == d.reason

    better = _register_copy(first_run, name, +0.5)
    d = gate(c, name, better, "f1")
    assert d.alias == "production" and d.previous == first and d.ci_low == pytest.approx(0.5)
    assert d.n == int(c.get_model_version(name, better).tags["gate.n"]) > 0
    assert c.get_model_version_by_alias(name, "production").version == better
    assert [e["version"] for e in history(c, name)] == [first, better]


def test_promote_and_rollback_by_hand_from_the_cli(first_run):
    from typer.testing import CliRunner

    from clara_flows.cli import build_app, context
    from clara_flows.registry import gate

    c, name = _client(), "clara-cli-test"
    before = _register_copy(first_run, name, 0.0)
    gate(c, name, before, "f1")
    other = _register_copy(first_run, name, -0.1)
    app = build_app()

    class Runner(CliRunner):  # the `clara` entry point hands the commands MLflow's URI resolver
        def invoke(self, *args, **kwargs):
            return super().invoke(*args, obj=context(), **kwargs)

    runner = Runner()
    r = runner.invoke(app, ["promote", "--name", name, "--version", other, "--reason", "hotfix from the on-call"])
    assert r.exit_code == 0, r.output
    assert c.get_model_version_by_alias(name, "production").version == other
    assert c.get_model_version(name, other).tags["production.reason"] == "hotfix from the on-call"
    r = runner.invoke(app, ["rollback", "--name", name, "--reason", "hotfix regressed"])
    assert r.exit_code == 0, r.output
    assert c.get_model_version_by_alias(name, "production").version == before
    r = runner.invoke(app, ["promote", "--name", name, "--version", "99", "--reason", "x"])
    assert r.exit_code == 2 and "no version 99" in r.output
    r = runner.invoke(app, ["models", "--name", name])
    assert r.exit_code == 0 and "production" in r.output
    import tempfile

    r = runner.invoke(app, ["ask", "--json", "What is an urban area?"])  # downloads the version once
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 1, r.output
    row = rows[0]
    assert row["question"] == "What is an urban area?" and len(row["titles"]) == TINY["top_k"]
    temp_before = sorted(os.listdir(tempfile.gettempdir()))
    for _ in range(3):  # later asks reuse the cached download and leave the temp folder as it was
        r = runner.invoke(app, ["ask", "--json", "--k", "1", "What is an urban area?"])
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.stdout.splitlines()[-1])["titles"]) == 1
    from clara_flows.tracking import download_model

    # what each ask resolves its model with, a thousand times (a server's or a script's day): one folder, reused
    folders = {download_model(f"models:/{name}@production") for _ in range(1000)}
    assert len(folders) == 1
    assert sorted(os.listdir(tempfile.gettempdir())) == temp_before


def test_compression_shards_run_on_a_local_dask_cluster(first_run):
    """The scale-out path: shards compressed on two Dask worker processes give the same memories as one
    process, loaded into a new build."""
    import numpy as np
    from prefect_dask import DaskTaskRunner

    from clara.store.db import connect
    from clara.store.search import decode_memory
    from clara_flows.storage import compression_flow

    first = first_run
    data = {**first["data"], "corpus_version": first["data"]["corpus_version"] + "/dask"}
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    out = compression_flow.with_options(task_runner=runner)(first["e2e"], data, 3, 16, None,
                                                           first["parent_run"], "clara")
    assert not out["reused"] and out["n_docs"] == TINY["max_docs"]
    engine = connect()
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT a.n_mem, a.memory, b.memory FROM memories a JOIN memories b USING (doc_id) "
            f"WHERE a.build_id = {out['build_id']} AND b.build_id = {first['build']['build_id']}").all()
    assert len(rows) == TINY["max_docs"]
    hidden = 64
    for n, a, b in rows:
        np.testing.assert_allclose(decode_memory(a, n, hidden), decode_memory(b, n, hidden), atol=1e-2)


def test_training_stages_run_under_torchrun(first_run, repo, monkeypatch):
    """train_processes > 1: SCP (continuing a checkpoint, as the default runs do from the release), stage 2 and E2E
    run as `clara train …` under torchrun (2 CPU processes here, one per GPU on a GPU host); their per-step metrics
    still reach the stage runs, and the rest of the pipeline follows. The command SCP from scratch launches:
    test_flow_units' ``test_torchrun_commands_train_exactly_the_stage_config``."""

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    result = run_pipeline(**{**TINY, "init_from": first_run["scp"]["checkpoint"], "instruct_batch_size": 2},
                          train_processes=2, project_dir=str(repo))
    assert not {"pretrain_scp", "instruct", "train_e2e"} & set(result["cached"])  # a different launch: new runs
    c = _client()
    for stage, steps in (("scp", TINY["scp_steps"]), ("instruct", TINY["instruct_steps"]),
                         ("e2e", TINY["e2e_steps"])):
        assert [m.step for m in c.get_metric_history(result[stage]["run_id"], "loss")] == \
            list(range(1, steps + 1)), stage
        assert (Path(result[stage]["checkpoint"]).parent / "launch.log").is_file(), stage  # torchrun's log
    assert result["promotion"]["version"] != first_run["promotion"]["version"]
    # A second real run on the same data answered the same questions: the gate paired them with production's.
    assert "paired questions" in result["promotion"]["reason"], result["promotion"]["reason"]
    print("gate:", result["promotion"]["alias"], "-", result["promotion"]["reason"])


def test_refresh_cache_recomputes_cached_stages(first_run, repo):

    again = run_pipeline(**TINY, project_dir=str(repo), refresh_cache=True)
    assert not {"pretrain_scp", "train_e2e", "evaluate"} & set(again["cached"])
    assert again["scp"]["run_id"] != first_run["scp"]["run_id"]
    # The checkpoint on disk was already complete: its recorded steps are replayed into the new run.
    assert [m.step for m in _client().get_metric_history(again["scp"]["run_id"], "loss")] == [1, 2, 3]


def test_bad_parameters_fail_at_once_with_the_reason_on_the_run(services, repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with pytest.raises(ValueError, match="compression_rate=7"):
        run_pipeline(**{**TINY, "compression_rate": 7}, project_dir=str(repo))
    c = _client()
    exp = c.get_experiment_by_name("clara").experiment_id
    runs = c.search_runs([exp], "tags.`clara.stage` = 'pipeline' AND attributes.status = 'FAILED'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    assert "invalid parameters: compression_rate=7" in runs[0].data.tags["error"]
    # no stage ran: the failed parent run has no nested stage run, and Prefect holds no task run of the flow run
    assert c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{runs[0].info.run_id}'") == []
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert flow_run.state.is_failed() and "compression_rate=7" in (flow_run.state.message or ""), flow_run.state
        assert client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))) == []
    # what `make pipeline` prints after the run: no evaluation, and the link to the experiment the run recorded to
    from clara_flows import run, tracking

    summary, experiment = asyncio.run(run._run_facts(str(flow_run.id)))
    assert summary is None and experiment == "clara"
    assert run._experiment_link(experiment) == tracking.experiment_url(exp)
    assert run._experiment_link("no-such-experiment") == tracking.tracking_uri()


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "empty corpus: it has no rows"),
    # the pipeline skips bad rows (and reports them); a corpus of nothing but bad rows is empty
    ("latin1.jsonl", b'{"id": "a", "title": "A", "text": "Caf\xe9 au lait."}\n', "all 1 rows were rejected"),
    ("missing.jsonl", None, "missing.jsonl' not found"),
])
def test_a_bad_corpus_fails_the_run_at_its_first_stage_with_the_reason(services, repo, tmp_path, name, content,
                                                                       message):

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Exception, match=message):
        run_pipeline(**{**TINY, "corpus": str(path)}, project_dir=str(repo))
    c = _client()
    runs = c.search_runs([c.get_experiment_by_name("clara").experiment_id],
                         "tags.`clara.stage` = 'pipeline' AND attributes.status = 'FAILED'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    assert message in runs[0].data.tags["error"]


def test_the_cache_rule_reuses_only_runs_whose_outputs_are_still_there(first_run):
    from clara_flows.plumbing import checkpoint_missing, version_missing
    from clara_flows.stagerun import reuse

    c = _client()
    key = c.get_run(first_run["scp"]["run_id"]).data.tags["clara.key"]
    found = reuse("clara", "pretrain_scp", key, lambda r: None)
    # the newest finished run with this key (a refresh_cache test may have recomputed the stage since)
    newest = c.get_run(found["run_id"])
    assert newest.data.tags["clara.key"] == key and newest.info.status == "FINISHED"
    assert newest.info.start_time >= c.get_run(first_run["scp"]["run_id"]).info.start_time
    assert found["reused"] and key in found["cached_reason"]
    assert reuse("clara", "pretrain_scp", key, lambda r: "its checkpoint is gone") is None
    assert reuse("clara", "pretrain_scp", key, lambda r: None, refresh=True) is None
    assert reuse("clara", "pretrain_scp", "0" * 16, lambda r: None) is None  # other inputs
    # A finished run whose recorded result is gone (its artifacts lived in a clone since deleted; the runs stay in the
    # shared database) is not reused: the stage runs again instead of the pipeline failing.
    # (in an experiment of its own: the other tests read every stage run of "clara" as a pipeline's child)
    from clara_flows import tracking

    orphan = c.create_run(tracking.experiment_id(c, "clara-orphans"),
                          tags={"clara.stage": "pretrain_scp", "clara.key": "f" * 16})
    c.set_terminated(orphan.info.run_id, "FINISHED")
    assert reuse("clara-orphans", "pretrain_scp", "f" * 16, lambda r: None) is None
    # The real checks: a checkpoint folder deleted from disk is still found in MLflow; a deleted version is not.
    gone = {**first_run["scp"], "checkpoint": "/nonexistent"}
    assert checkpoint_missing(gone) is None
    assert "gone" in checkpoint_missing({**gone, "model_uri": "models:/clara-compressor/999"})
    assert checkpoint_missing({**gone, "model_uri": f"runs:/{first_run['scp']['run_id']}/nothing"})
    assert version_missing({"name": "clara", "version": "999"})


def _pipeline_process(params: dict, env: dict | None = None) -> subprocess.Popen:
    """The pipeline in its own process (as a deployment's worker runs it), against this module's services."""
    import sys

    import prefect.settings

    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(), **(env or {})}
    code = ("import json, sys; from clara_flows.params import grouped; "
            "from clara_flows.pipeline import full_pipeline; full_pipeline(**grouped(**json.loads(sys.argv[1])))")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_running_stage(stage: str, pid: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    import time

    c = _client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the pipeline exited ({proc.returncode}) before reaching {stage}: "
                        f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
        exp = c.get_experiment_by_name("clara")
        if exp is not None and c.search_runs([exp.experiment_id], f"tags.`clara.stage` = '{stage}' AND "
                                             f"tags.`clara.pid` = '{pid}' AND attributes.status = 'RUNNING'"):
            return
        time.sleep(0.1)
    pytest.fail(f"{stage} did not start within {timeout:.0f} s")


def _assert_one_build_each_doc_once(result: dict, n_docs: int) -> None:
    """The run's store key has one build, ready, holding each document exactly once."""
    from sqlalchemy import text

    from clara.store.db import connect

    with connect().connect() as conn:
        builds = conn.execute(text("SELECT id, status FROM index_builds WHERE model_uri = :m AND corpus_version = :v"),
                              {"m": result["e2e"]["model_uri"], "v": result["data"]["corpus_version"]}).all()
        assert [b.status for b in builds] == ["ready"]
        n, distinct = conn.execute(text("SELECT count(*), count(DISTINCT doc_id) FROM memories WHERE build_id = :b"),
                                   {"b": builds[0].id}).one()
    assert n == distinct == n_docs


@pytest.mark.parametrize("stage, change", [
    ("pretrain_scp", {"scp_steps": 40}),         # inputs no earlier test used, so the stage really runs
    ("train_e2e", {"e2e_steps": 40, "model_name": "clara-killed-e2e"}),
    # (a compression killed mid-load is tests/library/store/test_store.py's kill-and-resume, at a lower cost;
    # promote is killed at its two worst moments in the next test)
])
def test_a_pipeline_killed_inside_a_stage_finishes_when_run_again(first_run, repo, stage, change):
    """SIGKILL the process running the pipeline while ``stage`` runs; run it again: it finishes, the dead
    process's RUNNING runs are closed as KILLED, and nothing is there twice (model version, store rows)."""
    import signal

    import time

    params = {**TINY, **change, "project_dir": str(repo)}
    started = time.time()
    proc = _pipeline_process(params)
    _wait_for_running_stage(stage, proc.pid, proc)
    killed_after = 0
    if stage == "pretrain_scp":  # inside the work: after its first step checkpoint, before its last step
        killed_after = _wait_for_step_checkpoint("scp", started, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    c = _client()
    exp = c.get_experiment_by_name("clara").experiment_id
    left = c.search_runs([exp], f"tags.`clara.pid` = '{proc.pid}' AND attributes.status = 'RUNNING'")
    assert left, "the kill left no RUNNING run to close"

    result = run_pipeline(**params)
    after = {r.info.run_id: r for r in c.search_runs([exp], f"tags.`clara.pid` = '{proc.pid}'")}
    assert all(after[r.info.run_id].info.status == "KILLED" for r in left)
    assert all("closed by the next run" in after[r.info.run_id].data.tags["clara.closed_reason"] for r in left)
    name = params.get("model_name", "clara")
    key = c.get_model_version(name, result["promotion"]["version"]).tags["clara.key"]
    assert len(c.search_model_versions(f"name = '{name}' AND tags.`clara.key` = '{key}'")) == 1
    compressor_key = c.get_run(result["scp"]["run_id"]).data.tags["clara.key"]
    assert len(c.search_model_versions(f"name = 'clara-compressor' AND tags.`clara.key` = '{compressor_key}'")) == 1
    _assert_one_build_each_doc_once(result, TINY["max_docs"])
    if killed_after:  # the rerun resumed from the checkpoint: its run logged only the steps after it
        steps = sorted(m.step for m in c.get_metric_history(result["scp"]["run_id"], "loss"))
        assert steps and steps[0] > killed_after and steps[-1] == change["scp_steps"], steps


@pytest.mark.parametrize("point", ["logged", "registered"])
def test_a_promotion_killed_between_logging_and_registering_registers_once(first_run, repo, tmp_path, point):
    """SIGKILL promote at its two worst moments, held there by the registry's hold point (not a timer): the model
    logged and not yet registered, or registered and the stage's run not yet finished. The rerun registers exactly
    one version for the stage key (after ``registered``: the one the dead run made, found by its key, not a second)
    and closes the dead run KILLED."""
    import signal
    import time

    name = f"clara-killed-{point}"
    params = {**TINY, "model_name": name, "project_dir": str(repo)}  # every stage before promote is reused
    marker = tmp_path / "held"
    proc = _pipeline_process(params, env={"CLARA_TEST_HOLD": f"{point}:{name}", "CLARA_TEST_HOLD_FILE": str(marker)})
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the pipeline exited ({proc.returncode}) before promote {point} the model: "
                        f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
        assert time.monotonic() < deadline, f"promote never {point} the model"
        time.sleep(0.05)
    c = _client()
    exp = c.get_experiment_by_name("clara").experiment_id
    held = c.search_runs([exp], f"tags.`clara.stage` = 'promote' AND tags.`clara.pid` = '{proc.pid}' "
                                "AND attributes.status = 'RUNNING'")
    assert len(held) == 1, "promote's run should be open at the hold point"
    before = c.search_model_versions(f"name = '{name}'")
    assert len(before) == (1 if point == "registered" else 0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    result = run_pipeline(**params)
    assert c.get_run(held[0].info.run_id).info.status == "KILLED"
    versions = c.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, [v.version for v in versions]
    assert result["promotion"]["version"] == versions[0].version
    if point == "registered":  # found again by its stage key, not registered a second time
        assert versions[0].version == before[0].version


def _wait_for_step_checkpoint(work: str, since: float, proc: subprocess.Popen, timeout: float = 300) -> int:
    """The step of the first step checkpoint written after ``since`` in a work dir ``<work>-<key>`` of the cache
    folder (``clara_flows.plumbing.work_dir``: ``scp`` for pretrain_scp)."""
    import re
    import time

    from clara.model.base import cache_dir

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the pipeline exited ({proc.returncode}) before {work} wrote a step checkpoint")
        for ck in (cache_dir() / "pipeline").glob(f"{work}-*/checkpoints/step-*"):
            if ck.stat().st_mtime >= since and (ck / "train_state").is_dir():
                return int(re.fullmatch(r"step-(\d+)", ck.name).group(1))
        time.sleep(0.02)
    pytest.fail(f"{work} wrote no step checkpoint within {timeout:.0f} s")


def test_a_pipeline_killed_in_one_stage_after_another_finishes_when_run_again(first_run, repo):
    """One lineage killed three times, each time in the next stage (stage 2, corpus compression, evaluation:
    each rerun reuses what the last one finished), then run to the end: every run the dead processes left RUNNING
    is closed KILLED, and nothing is there twice (synthesized rows, model version, store rows). (Synthesis does
    its work before its run opens: killed inside it, see the next test.)"""
    import signal

    params = {**TINY, "instruct_steps": 30, "model_name": "clara-killed-chain",
              "project_dir": str(repo)}
    c = _client()
    exp = c.get_experiment_by_name("clara").experiment_id
    left = []
    for stage in ("instruct", "compress_corpus", "evaluate"):
        proc = _pipeline_process(params)
        _wait_for_running_stage(stage, proc.pid, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        dead = c.search_runs([exp], f"tags.`clara.pid` = '{proc.pid}' AND attributes.status = 'RUNNING'")
        assert any(r.data.tags.get("clara.stage") == stage for r in dead), f"no RUNNING {stage} run to close"
        left += dead

    result = run_pipeline(**params)
    for r in left:
        assert c.get_run(r.info.run_id).info.status == "KILLED", (r.data.tags.get("clara.stage"), r.info.run_id)
    version = c.get_model_version("clara-killed-chain", result["promotion"]["version"])
    assert len(c.search_model_versions(f"name = 'clara-killed-chain' AND "
                                       f"tags.`clara.key` = '{version.tags['clara.key']}'")) == 1
    for split in ("train", "dev"):
        rows = [json.loads(line) for line in
                (Path(result["data"]["synth_dir"]) / f"{split}.jsonl").read_text().splitlines()]
        keys = [json.dumps([r.get("doc_id"), r.get("data_type"), r.get("kind"), r.get("question")]) for r in rows]
        assert len(keys) == len(set(keys)), f"duplicate synthesized rows in {split}"
    _assert_one_build_each_doc_once(result, params["max_docs"])


def test_a_pipeline_killed_inside_synthesis_finishes_when_run_again(first_run, repo):
    """SIGKILL the pipeline while its teacher is part-way through a shard (documents done, others not); run it
    again: the shard resumes from its done log (each document synthesized once, no duplicate row), the run
    finishes, and the dead process's parent run is closed KILLED."""
    import signal
    import time

    from clara.model.base import cache_dir

    # documents no other test synthesizes (a new work key in this module's cache folder), enough that the kill
    # lands mid-shard
    n = 300
    params = {**TINY, "max_docs": n, "shards": 1, "model_name": "clara-killed-synth", "project_dir": str(repo)}
    started = time.time()
    proc = _pipeline_process(params)
    deadline, partial = time.monotonic() + 300, None
    while partial is None and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the pipeline exited ({proc.returncode}) before synthesizing: "
                        f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
        for log in (cache_dir() / "pipeline").glob("synth-*/shard-*/done.jsonl"):
            if log.stat().st_mtime >= started and 20 <= len(log.read_bytes().splitlines()) <= n - 100:
                partial = log
        time.sleep(0.05)
    assert partial is not None, "synthesis never showed a part-done shard"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(partial.read_bytes().splitlines())
    assert done_at_kill < n
    c = _client()
    exp = c.get_experiment_by_name("clara").experiment_id
    left = c.search_runs([exp], f"tags.`clara.pid` = '{proc.pid}' AND attributes.status = 'RUNNING'")
    assert left, "the kill left no RUNNING run to close"

    result = run_pipeline(**params)
    for r in left:
        assert c.get_run(r.info.run_id).info.status == "KILLED"
    ids = [json.loads(line)["doc_id"] for line in partial.read_text().splitlines()]
    assert len(ids) == len(set(ids)) >= done_at_kill  # the rerun added the rest, redoing none
    from clara.data.corpus import read_corpus

    # nothing lost: every passage of the run's corpus was processed, each exactly once
    assert sorted(ids) == sorted(d.id for d in read_corpus(result["data"]["corpus_file"], n))
    rows = [json.loads(line) for line in (Path(result["data"]["synth_dir"]) / "train.jsonl").read_text().splitlines()]
    keys = [json.dumps([r.get("doc_id"), r.get("data_type"), r.get("kind"), r.get("question")]) for r in rows]
    assert rows and len(keys) == len(set(keys)), "duplicate synthesized rows"
    assert result["data"]["max_docs"] == n


def test_two_runs_with_the_same_inputs_at_once_build_and_register_once(first_run, repo):
    """Two deployments started together with the same (new) inputs: one waits for the other at each stage and
    reuses its result — one build, one model version."""
    params = {**TINY, "e2e_steps": 4, "model_name": "clara-twins", "project_dir": str(repo)}
    procs = [_pipeline_process(params) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read().decode(errors="replace")[-3000:]
    c = _client()
    versions = c.search_model_versions("name = 'clara-twins'")
    assert len(versions) == 1
    # They overlapped for real (sequential runs would pass on the cache alone), and each stage ran once: the run
    # that waited reused every stage instead of opening a run of its own.
    exp = c.get_experiment_by_name("clara").experiment_id
    parents = [r for p in procs  # (MLflow's filter has no OR)
               for r in c.search_runs([exp], f"tags.`clara.stage` = 'pipeline' AND tags.`clara.pid` = '{p.pid}'")]
    assert len(parents) == 2
    (s1, e1), (s2, e2) = [(r.info.start_time, r.info.end_time) for r in parents]
    assert s1 < e2 and s2 < e1, "the two runs did not overlap"
    stage_runs = [r for p in procs for r in c.search_runs([exp], f"tags.`clara.pid` = '{p.pid}'")
                  if r.data.tags.get("clara.stage") not in (None, "pipeline")]
    ran = [r.data.tags["clara.stage"] for r in stage_runs]
    assert sorted(ran) == sorted(set(ran)), f"a stage ran twice: {sorted(ran)}"
    assert {"train_e2e", "compress_corpus", "evaluate", "promote"} <= set(ran)  # new inputs: these had to run
    from clara.store.builds import list_builds
    from clara.store.db import connect

    model_uri = c.get_run(versions[0].tags["eval.run_id"]).data.params["model_uri"]
    assert len([b for b in list_builds(connect()) if b.model_uri == model_uri]) == 1


def test_two_runs_with_different_rates_run_side_by_side(first_run, repo):
    """Two deployments started together at rates 4 and 16: both finish, each with its own store build at its own
    rate and its own model version (they share only the synthesized data, which the second reuses)."""
    procs = [_pipeline_process({**TINY, "compression_rate": rate, "scp_steps": 4, "model_name": "clara-rates",
                                "project_dir": str(repo)}) for rate in (4, 16)]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read().decode(errors="replace")[-3000:]
    c = _client()
    versions = c.search_model_versions("name = 'clara-rates'")
    assert len(versions) == 2
    from clara.store.builds import list_builds
    from clara.store.db import connect

    uris = {c.get_run(v.tags["eval.run_id"]).data.params["model_uri"] for v in versions}
    rates = sorted(b.compression_rate for b in list_builds(connect()) if b.model_uri in uris)
    assert rates == [4, 16]


def test_secrets_never_reach_mlflow(services, tmp_path, monkeypatch):
    """A teacher API key and a database password in the environment: nothing a run writes to MLflow (params,
    tags, metrics, artifacts, model versions) contains either."""
    from fake_openai import FakeOpenAI
    from sqlalchemy import create_engine, make_url, text


    api_key, password = "sk-test-SECRET-4f1c9e", "pg-SECRET-77ab31"
    admin = create_engine(services_db(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE clara_app LOGIN SUPERUSER PASSWORD '{password}'"))
    admin.dispose()
    url = make_url(services_db()).set(username="clara_app", password=password).render_as_string(hide_password=False)
    monkeypatch.setenv("CLARA_DATABASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", api_key)
    project = _make_repo(tmp_path / "project", tmp_path / "remote")
    with FakeOpenAI() as server:
        result = run_pipeline(**{**TINY, "teacher": "openai", "teacher_model": "fake", "teacher_base_url": server.base_url,
                          "model_name": "clara-secrets", "project_dir": str(project)})
    c = _client()
    exp = c.get_experiment_by_name("clara").experiment_id
    runs = [c.get_run(result["parent_run"])] + c.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{result['parent_run']}'")
    assert len(runs) >= 7
    seen = []
    for run in runs:
        seen.append(json.dumps({"params": run.data.params, "tags": run.data.tags,
                                "metrics": sorted(run.data.metrics), "inputs": [
                                    d.dataset.source for d in run.inputs.dataset_inputs]}))
        local = Path(c.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        seen += [f.read_bytes().decode("utf-8", errors="replace") for f in local.rglob("*") if f.is_file()]
    for name in ("clara-secrets", "clara-compressor"):
        seen += [json.dumps(v.tags) + str(v.source) for v in c.search_model_versions(f"name = '{name}'")]
    everything = "\n".join(seen)
    assert "fake" in everything and result["data"]["data_version"] in everything  # the scan did read the runs
    assert api_key not in everything
    assert password not in everything


def test_the_backend_password_is_on_no_command_line_and_in_no_log(services, tmp_path):
    """MLflow's backend URL holds the database password: the server gets it through its environment, so no
    process's command line (what ``ps`` shows every user) and no log holds it, and the logs are 0600."""
    import stat

    from sqlalchemy import create_engine, make_url, text

    from clara_infra import services as infra

    password = "pg-SECRET-backend-93d2"
    admin = create_engine(services_db(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP ROLE IF EXISTS clara_mlflow"))
        conn.execute(text(f"CREATE ROLE clara_mlflow LOGIN SUPERUSER PASSWORD '{password}'"))
    admin.dispose()
    backend = make_url(infra.mlflow_backend(services["layout"], services_db())).set(
        username="clara_mlflow", password=password).render_as_string(hide_password=False)
    layout = infra.Layout(tmp_path / "state", free_port(), free_port())
    assert infra.mlflow_up(layout, backend) == "started"
    try:
        cmdlines = []
        for proc in Path("/proc").iterdir():
            try:
                cmdlines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        mine = [c for c in cmdlines if "mlflow" in c and str(layout.mlflow_port) in c]
        assert mine  # the scan did see the server
        assert not any(password in c for c in cmdlines)
        for log in layout.logs.iterdir():
            assert password not in log.read_text(errors="replace")
            assert stat.S_IMODE(log.stat().st_mode) == 0o600
    finally:
        infra._stop(layout, "mlflow")


def test_an_imported_release_goes_through_the_pipeline(services, repo, tmp_path):
    """The authors' weights, imported once, then compressed into the store, evaluated and registered like a
    model trained here (init_from, scp_steps=0)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "library" / "model"))
    from test_ml_clara import _release

    from clara.model.ml_clara import import_ml_clara

    _release(tmp_path / "release")
    ckpt = import_ml_clara(tmp_path / "release", tmp_path / "imported")
    result = run_pipeline(**{**TINY, "init_from": str(ckpt), "scp_steps": 0, "model_name": "clara-imported"},
                   project_dir=str(repo))
    version = _client().get_model_version("clara-imported", result["promotion"]["version"])
    assert result["build"]["n_docs"] == TINY["max_docs"] and version.tags["eval.run_id"]
    assert result["scp"]["checkpoint"] == str(ckpt)  # used as it is


def test_the_tracking_server_going_away_mid_training_is_a_clear_error_and_a_rerun_finishes(services, repo):
    from clara_infra import services as infra

    layout = services["layout"]
    params = {**TINY, "scp_steps": 30, "model_name": "clara-outage", "project_dir": str(repo)}
    proc = _pipeline_process(params, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    _wait_for_running_stage("pretrain_scp", proc.pid, proc)
    infra._stop(layout, "mlflow")
    try:
        assert proc.wait(timeout=600) != 0
        err = proc.stderr.read().decode(errors="replace")
        assert "TrackingUnavailable" in err and f"MLflow tracking server at {layout.mlflow_uri} does not answer" in err
        assert "python -m clara_infra.services up" in err
    finally:
        assert infra.mlflow_up(layout, infra.mlflow_backend(layout, services["db"])) == "started"
    result = run_pipeline(**params)  # the same inputs: it finishes, and the dead process's runs are closed
    assert result["promotion"]["name"] == "clara-outage"
    c = _client()
    exp = c.get_experiment_by_name("clara").experiment_id
    assert not c.search_runs([exp], f"tags.`clara.pid` = '{proc.pid}' AND attributes.status = 'RUNNING'")


def test_the_tracking_server_going_away_during_registration_leaves_nothing_half_made(services, tiny_model, tmp_path,
                                                                                    monkeypatch):
    """The real server stopped at the two points of the promote stage where a version or the alias is half-made:
    after the model was logged and before its version exists, and after `production` moved and before its
    history entry was written. Each time the error names the server and how to restart it; after a restart the
    same calls finish: one version for the stage key, and the promotion's record completed."""
    import mlflow

    from clara.model.checkpoint import save_checkpoint
    from clara_flows import tracking
    from clara_flows.registry import PRODUCTION, gate, history, log_pyfunc, register_once
    from clara_infra import services as infra

    layout, name, key = services["layout"], "clara-registry-outage", "r" * 16
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    c = _client()
    exp = c.get_experiment_by_name("clara") or c.get_experiment(c.create_experiment("clara"))
    run_id = c.create_run(exp.experiment_id).info.run_id
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    logged: list[str] = []

    def log_then(stop: bool):
        uri = log_pyfunc(run_id, "compressor", ckpt, {"device": "cpu"}, input_column="text")
        logged.append(uri)
        if stop:
            infra._stop(layout, "mlflow")
        return uri

    def restart():
        assert infra.mlflow_up(layout, infra.mlflow_backend(layout, services["db"])) == "started"

    # 1. the model is logged, then the server goes before the version is created
    try:
        with pytest.raises(Exception) as err:
            register_once(c, name, key, lambda: log_then(stop=True), {"eval.cem": 0.5})
        message = tracking.outage(err.value)
        assert message and layout.mlflow_uri in message and "python -m clara_infra.services up" in message
    finally:
        restart()
    assert _versions(name) == []  # no version was made, so none is visible half-made
    version, found = register_once(c, name, key, lambda: log_then(stop=False), {"eval.cem": 0.5})
    assert not found and len(logged) == 2
    assert [v.version for v in _versions(name)] == [version]
    assert register_once(c, name, key, lambda: log_then(stop=False), {}) == (version, True)  # found, not re-made

    # 2. the server goes after `production` moved to the version, before the promotion's history entry
    move = mlflow.MlflowClient.set_registered_model_alias

    def move_then_stop(self, *args, **kwargs):
        move(self, *args, **kwargs)
        infra._stop(layout, "mlflow")

    try:
        with monkeypatch.context() as m, pytest.raises(Exception) as err:
            m.setattr(mlflow.MlflowClient, "set_registered_model_alias", move_then_stop)
            gate(c, name, version, "cem")
        assert tracking.outage(err.value)
    finally:
        restart()
    assert history(c, name) == []  # the alias moved; its record is what the rerun must complete
    decision = gate(c, name, version, "cem")
    assert decision.alias == PRODUCTION and "already production" in decision.reason
    assert [e["version"] for e in history(c, name)] == [version]
    assert "completed on rerun" in c.get_model_version(name, version).tags["production.reason"]
    gate(c, name, version, "cem")  # a third run finds the record whole and adds nothing
    assert [e["version"] for e in history(c, name)] == [version]
