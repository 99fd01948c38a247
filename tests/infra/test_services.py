"""clara_infra.services' restart rule for the process serving the deployment: it keeps the flow code it started with,
so it is restarted when the sources change, but never under a flow run in flight (that would kill the run)."""

import pytest

from clara_infra import services


def test_source_digest_follows_the_sources(tmp_path):
    """One digest of the project's sources: the project wheel is cached under it and the serving process is
    restarted when it changes. Package data (prompts, migrations) changes what a run does, so it counts too."""
    from clara_flows import source_digest

    (tmp_path / "pyproject.toml").write_text("[project]\n")
    for package in ("flows", "clara", "infra"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    first = source_digest(tmp_path)
    assert source_digest(tmp_path) == first
    (tmp_path / "flows" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != first
    (tmp_path / "flows" / "a.py").write_text("x = 1\n")
    assert source_digest(tmp_path) == first
    (tmp_path / "clara" / "__pycache__").mkdir()
    (tmp_path / "clara" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert source_digest(tmp_path) == first
    (tmp_path / "clara" / "prompt.txt").write_text("Question: {q}")
    assert source_digest(tmp_path) != first


@pytest.fixture
def serving(tmp_path, monkeypatch):
    """A serving process that is alive and registered, and a record of what serve_up does to it."""
    layout = services.Layout(tmp_path / "state", 1, 2)
    (layout.state / "pids").mkdir(parents=True)
    calls = []
    state = {"in_flight": 0}
    monkeypatch.setattr(services, "_pid", lambda layout, name: 4242)
    monkeypatch.setattr(services, "deployment_registered", lambda layout: True)
    monkeypatch.setattr(services, "runs_in_flight", lambda layout: state["in_flight"])
    monkeypatch.setattr(services, "_stop", lambda layout, name: calls.append(("stop", name)))
    monkeypatch.setattr(services, "_spawn", lambda layout, name, cmd, secret_env=None: calls.append(("spawn", name)) or 4343)
    monkeypatch.setattr(services, "_wait", lambda *a, **k: None)
    monkeypatch.setattr("clara_flows.source_digest", lambda project=None: "new")
    return layout, calls, state


def test_same_code_keeps_the_serving_process(serving):
    layout, calls, _ = serving
    (layout.state / "pids" / "serve.code").write_text("new")
    assert services.serve_up(layout) == "running" and calls == []


def test_changed_code_restarts_it_and_records_the_new_code(serving):
    layout, calls, _ = serving
    (layout.state / "pids" / "serve.code").write_text("old")
    assert services.serve_up(layout) == "started"
    assert calls == [("stop", "serve"), ("spawn", "serve")]
    assert (layout.state / "pids" / "serve.code").read_text() == "new"


@pytest.mark.parametrize("in_flight", [1, -1])  # a run in flight, or a server that cannot say
def test_changed_code_under_a_run_in_flight_keeps_it_and_says_so(serving, in_flight):
    layout, calls, state = serving
    state["in_flight"] = in_flight
    (layout.state / "pids" / "serve.code").write_text("old")
    assert "older code" in services.serve_up(layout) and calls == []


@pytest.mark.slow
def test_up_status_down_start_and_stop_the_real_services(tmp_path):
    """``python -m clara_infra.services up / status / down`` as a user runs them, nothing stubbed: the embedded
    Postgres (its own data folder), the MLflow server on it, the Prefect server and the process serving the
    deployment come up and answer; ``up`` again leaves them alone; ``down`` stops every process it started."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_")) and k not in ("CLARA_DATABASE_URL", "CLARA_MLFLOW_BACKEND")}
    env.update(CLARA_STATE_DIR=str(tmp_path / "state"), CLARA_CACHE_DIR=str(tmp_path / "cache"),
               CLARA_MLFLOW_PORT=str(free_port()), CLARA_PREFECT_PORT=str(free_port()))
    layout = services.Layout(tmp_path / "state", int(env["CLARA_MLFLOW_PORT"]), int(env["CLARA_PREFECT_PORT"]))

    def run(command: str) -> dict[str, str]:
        proc = subprocess.run([sys.executable, "-m", "clara_infra.services", command], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
        return {line[:32].strip(): line[32:].strip() for line in proc.stdout.splitlines()}

    try:
        first = run("up")
        assert [first[k] for k in ("mlflow", "prefect", "serve")] == ["started"] * 3, first
        assert first["postgres"].startswith("postgresql"), first
        assert (tmp_path / "cache" / "pgdata" / "postmaster.pid").exists()  # the embedded server, in its cache folder
        pids = {name: int((layout.state / "pids" / f"{name}.pid").read_text()) for name in ("mlflow", "prefect", "serve")}
        assert services.mlflow_healthy(layout) and services.prefect_healthy(layout)
        assert services.deployment_registered(layout)
        assert run("status")["deployment clara/full-pipeline"] == "served"
        again = run("up")
        assert [again[k] for k in ("mlflow", "prefect", "serve")] == ["running"] * 3, again
        assert {n: int((layout.state / "pids" / f"{n}.pid").read_text()) for n in pids} == pids  # left alone
    finally:
        last = run("down")
    assert last == {"serve": "stopped", "prefect": "stopped", "mlflow": "stopped", "postgres": "stopped"}, last
    assert not any(services._alive(pid) for pid in pids.values())
    assert not services.mlflow_healthy(layout) and not services.prefect_healthy(layout)
    assert not (tmp_path / "cache" / "pgdata" / "postmaster.pid").exists()
    status = run("status")
    assert status["mlflow"].startswith("down") and status["prefect"].startswith("down"), status
    assert status["deployment clara/full-pipeline"] == "not served"
