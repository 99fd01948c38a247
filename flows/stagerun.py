"""Run bookkeeping for the pipeline, in one place: the parent run, one nested MLflow run per stage, and the one
rule that decides whether a stage is skipped.

**The cache rule.** A stage's identity is ``stage_key(stage, inputs)``: a hash of its declared inputs (its
parameters and the references its upstream stages returned, minus what only names a run), the code's
``CACHE_VERSION`` and the tracking server. A stage is skipped exactly when a FINISHED run of that stage carries
that key (tag ``clara.key``) and what it produced is still there (the stage's own check: a checkpoint, a store
build, a model version); the stage then returns that run's recorded result (artifact ``stage/result.json``).
Every decision is logged with its reason, and ``refresh_cache`` turns the lookup off. Work *inside* a stage
that resumes by itself (finished synthesis shards, step checkpoints, a store build a killed run left half
loaded) is not a cache: it is the stage finding its own partial output, and it happens whether or not the
stage is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from clara_flows import tracking

CACHE_VERSION = "3"  # bump when a stage's outputs change meaning, to invalidate every recorded result
NOT_INPUTS = ("parent_run", "run_id", "reused", "cached_reason")
"""Keys that name a run rather than describe an input: left out of keys at any depth of the references."""
RESULT_ARTIFACT = "stage/result.json"


def _owner() -> dict[str, str]:
    """Which process a run belongs to: the next pipeline run on this host closes runs whose process is gone."""
    return {"clara.host": socket.gethostname(), "clara.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def close_dead_runs(c, exp_id: str) -> list[str]:
    """Mark KILLED the runs a killed pipeline left RUNNING (same host, process gone), with the reason as a tag;
    returns their ids. Runs of live processes, or of other hosts (whose processes cannot be checked from here),
    are left alone."""
    host, closed = socket.gethostname(), []
    for run in c.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("clara.host") != host or not tags.get("clara.pid", "").isdigit():
            continue
        pid = int(tags["clara.pid"])
        if pid != os.getpid() and not _alive(pid):
            tracking.set_tags(c, run.info.run_id, {"clara.closed_reason": f"process {pid} on {host} died while the "
                                                                          "run was RUNNING; closed by the next run"})
            c.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def _strip(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip(v) for k, v in value.items() if k not in NOT_INPUTS}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return value


def stage_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """The identity of a stage's result: the one function every skip decision (and every work folder) uses."""
    raw = json.dumps([CACHE_VERSION, stage, tracking.tracking_uri(), _strip(inputs)], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run (library use, tests)
        return logging.getLogger("clara.pipeline")


def reuse(experiment: str, stage: str, key: str, still_there: Callable[[dict[str, Any]], str | None],
          refresh: bool = False) -> dict[str, Any] | None:
    """The recorded result of a finished run of ``stage`` with ``key`` whose outputs ``still_there`` accepts
    (it returns None when they are, else what is missing), or None: the stage must run. Logs why."""
    log = _logger()
    if refresh:
        log.info("%s: refresh_cache is set: running it (key %s)", stage, key)
        return None
    c = tracking.client()
    exp = tracking.experiment_id(c, experiment)
    runs = c.search_runs([exp], f"tags.`clara.stage` = '{stage}' AND tags.`clara.key` = '{key}' "
                                "AND attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                         max_results=5)
    if not runs:
        log.info("%s: no finished run has these inputs (key %s): running it", stage, key)
        return None
    from mlflow.exceptions import MlflowException

    for run in runs:
        try:
            result = json.loads(_read_result(c, run.info.run_id))
        except (OSError, ValueError, MlflowException) as exc:
            if tracking.outage(exc):  # the server is down: not a missing result, and running it again cannot help
                raise
            # e.g. its artifacts lived in a project folder since deleted, while the runs stay in the shared store
            log.info("%s: run %s has key %s but no readable result (%s): not reused", stage, run.info.run_id, key,
                     exc)
            continue
        missing = still_there(result)
        if missing is None:
            reason = f"same inputs as finished run {run.info.run_id} (key {key})"
            log.info("%s: reused: %s", stage, reason)
            return {**result, "reused": True, "cached_reason": reason}
        log.info("%s: run %s has these inputs but %s: running it again", stage, run.info.run_id, missing)
    return None


def _read_result(c, run_id: str) -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return Path(c.download_artifacts(run_id, RESULT_ARTIFACT, tmp)).read_text(encoding="utf-8")


@contextlib.contextmanager
def exclusive(stage: str, key: str) -> Iterator[None]:
    """Held while a stage with this key looks for a reusable run and, finding none, computes: a second pipeline
    with the same inputs started at the same time waits here, then reuses the first one's result instead of
    computing (and registering, and building) it again. A lock on the Postgres server every pipeline shares."""
    from clara.store.db import advisory_lock, connect

    engine = connect()  # migrated: connections register the pgvector type, which the migrations create
    try:
        with advisory_lock(engine, f"clara-stage:{stage}:{key}"):
            yield
    finally:
        engine.dispose()


class StageRun:
    """A nested MLflow run for one stage: started on entry with its parameters, dataset inputs and key; on a
    clean exit ``finish(result)`` records the result the cache rule returns next time, and the run is FINISHED;
    an exception marks it FAILED (and it is never reused)."""

    def __init__(self, name: str, parent_run: str, experiment: str, params: Mapping[str, Any], key: str,
                 datasets: Sequence[tuple[Any, str]] = (), flow_run_id: str | None = None):
        self.name, self.key = name, key
        self.c = tracking.client()
        self.exp = tracking.experiment_id(self.c, experiment)
        tags = {"clara.stage": name, "clara.key": key, **_owner()}
        if flow_run_id:
            tags["prefect.flow_run_id"] = flow_run_id
        self.run_id = tracking.start_run(self.c, self.exp, name, parent=parent_run, tags=tags)
        tracking.log_params(self.c, self.run_id, params)
        tracking.log_datasets(self.c, self.run_id, datasets)
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> "StageRun":
        return self

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Record what the stage returns (JSON) and return it with this run's id."""
        self._result = {**result, "run_id": self.run_id}
        self.c.log_dict(self.run_id, self._result, RESULT_ARTIFACT)
        return {**self._result, "reused": False}

    def __exit__(self, exc_type, exc, tb) -> None:
        ok = exc_type is None and self._result is not None
        if exc is not None and tracking.outage(exc):
            return  # the server is gone: the next pipeline run closes this run (close_dead_runs)
        tracking.finish(self.c, self.run_id, ok=ok)


@dataclass
class PipelineRun:
    """The parent run: its MLflow run, the stage results in order and which were reused."""

    experiment: str
    run_id: str
    exp_id: str
    flow_run_name: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def start(cls, experiment: str, flow_run_id: str, flow_run_name: str, git_commit: str | None) -> "PipelineRun":
        c = tracking.client()
        exp = tracking.experiment_id(c, experiment)
        closed = close_dead_runs(c, exp)
        if closed:
            _logger().warning("closed %d run(s) a killed pipeline left RUNNING: %s", len(closed), ", ".join(closed))
        run = tracking.start_run(c, exp, f"pipeline {flow_run_name}", tags={
            "prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name,
            "git_commit": git_commit, "mlflow.source.git.commit": git_commit, "clara.stage": "pipeline",
            **_owner()})
        return cls(experiment, run, exp, flow_run_name)

    def record(self, stage: str, result: dict[str, Any]) -> dict[str, Any]:
        """Keep a stage's result (the summary and the parent's tags list them)."""
        self.stages[stage] = result
        return result

    @property
    def cached(self) -> list[str]:
        return [s for s, r in self.stages.items() if r.get("reused")]

    def fail(self, exc: BaseException) -> None:
        """Record why the pipeline failed on its run (someone browsing MLflow sees it without Prefect's logs) and
        raise what the user should read: the tracking server's outage said plainly, else ``exc`` itself."""
        down = tracking.outage(exc)
        if down is None:
            c = tracking.client()
            tracking.set_tags(c, self.run_id, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
            tracking.finish(c, self.run_id, ok=False)
            return
        # The server is gone: the run cannot be marked now; the next pipeline run closes it (close_dead_runs).
        raise tracking.TrackingUnavailable(down) from exc

    def finish(self, tags: Mapping[str, Any], metrics: Mapping[str, float], summary: str) -> None:
        c = tracking.client()
        tracking.set_tags(c, self.run_id, {
            **tags, "cached_stages": ",".join(self.cached) or "none",
            **{f"run.{k}": r.get("run_id") for k, r in self.stages.items()}})
        tracking.log_metrics(c, self.run_id, metrics)
        c.log_text(self.run_id, summary, "summary.md")
        tracking.finish(c, self.run_id)
