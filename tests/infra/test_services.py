"""infra.services' restart rule for the process serving the deployment: it keeps the flow code it started with,
so it is restarted when the sources change, but never under a flow run in flight (that would kill the run)."""

import pytest

from infra import services


def test_code_fingerprint_follows_the_sources(tmp_path):
    for package in ("flows", "clara"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    first = services.code_fingerprint(tmp_path)
    assert services.code_fingerprint(tmp_path) == first
    (tmp_path / "flows" / "a.py").write_text("x = 2\n")
    assert services.code_fingerprint(tmp_path) != first
    (tmp_path / "flows" / "a.py").write_text("x = 1\n")
    (tmp_path / "clara" / "notes.txt").write_text("not code")
    assert services.code_fingerprint(tmp_path) == first


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
    monkeypatch.setattr(services, "_spawn", lambda layout, name, cmd: calls.append(("spawn", name)) or 4343)
    monkeypatch.setattr(services, "_wait", lambda *a, **k: None)
    monkeypatch.setattr(services, "code_fingerprint", lambda root=None: "new")
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
