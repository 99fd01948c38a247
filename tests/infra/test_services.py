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
