"""What every stage of the pipeline shares: where its work goes, which failures a retry can fix, its nested MLflow
run with the DVC-versioned files it reads, the cache rule's checks that a recorded result still exists, and training
under torchrun with its metrics streamed or replayed into MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from clara_flows import tracking
from clara_flows.stagerun import StageRun


def transient(task, task_run, state) -> bool:
    """Retry only what a retry can fix: an unreachable database, teacher endpoint or tracking server."""
    import httpx
    import requests
    from sqlalchemy.exc import OperationalError

    from clara.data.teachers import TeacherError
    from clara.store.builds import StoreError

    try:
        state.result()
    except (StoreError, OperationalError, TeacherError, httpx.TransportError, requests.ConnectionError,
            ConnectionError, TimeoutError):
        return True
    except BaseException:
        return False
    return False


def work_dir(stage: str, key: str) -> Path:
    """Checkpoints and shard files: the cache folder, never the repository (STYLE: no weights in git)."""
    from clara.model.base import cache_dir

    return cache_dir() / "pipeline" / f"{stage}-{key}"


def checkpoint_dir(ref: dict[str, Any]) -> Path:
    """A stage's checkpoint: its local folder if still there, else downloaded from MLflow."""
    local = Path(ref["checkpoint"])
    if (local / "clara.json").is_file():
        return local
    from clara.eval.datasets import resolve_model

    return resolve_model(ref["model_uri"], tracking.download_model)


def data_file(data: dict[str, Any], key: str) -> str | None:
    """A file of the synthesize stage's reference: a key of it, or ``train``/``dev`` (the synthesized splits)."""
    if key in ("train", "dev"):
        return str(Path(data["synth_dir"]) / f"{key}.jsonl")
    return data.get(key)


def torchrun(nproc: int, cli_args: list[str], out: Path, c, run_id: str) -> Path:
    """Run a ``clara train …`` command under torchrun (one process per GPU), then copy its per-step metrics
    into the stage's MLflow run (the in-process callback cannot reach across processes)."""
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
           "-m", "clara.cli", *cli_args]
    get_run_logger().info("launching %s", " ".join(cmd))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "launch.log", "ab") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (out / "launch.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"torchrun exited with {proc.returncode}; last lines of {out / 'launch.log'}:\n{tail}")
    replay_metrics(out, c, run_id)
    return out / "model"


def replay_metrics(out: Path, c, run_id: str) -> None:
    """Log a training folder's metrics.jsonl (one line per step) to ``run_id``."""
    path = out / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        row = json.loads(line)
        tracking.log_metrics(c, run_id, {k: v for k, v in row.items() if k != "step"}, row["step"])


class LiveMetrics:
    """The training callback: each step to MLflow as it happens. When the training call found its run already
    finished on disk (a recomputed cached stage), nothing streamed, and ``replay`` logs the recorded steps."""

    def __init__(self, c, run_id: str):
        self.c, self.run_id, self.calls = c, run_id, 0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.calls += 1
        tracking.log_metrics(self.c, self.run_id, metrics, step)

    def replay_if_silent(self, out: Path) -> None:
        if not self.calls:
            replay_metrics(out, self.c, self.run_id)


RETRIED = dict(retries=2, retry_delay_seconds=10, retry_condition_fn=transient)


def stage_run(name: str, ctx: dict[str, Any], params: dict[str, Any], key: str, data: dict[str, Any] | None = None,
           reads: tuple[tuple[str, str], ...] = ()) -> StageRun:
    """The nested run of stage ``name``, with the DVC-versioned files it reads (``(data key, context)`` pairs of
    the synthesize stage's reference) as its dataset inputs."""
    datasets = [] if data is None else dataset_inputs(data, reads)
    return StageRun(name, ctx["parent_run"], ctx["experiment"], params, key, datasets, str(flow_run.id))


def dataset_inputs(data: dict[str, Any], reads: tuple[tuple[str, str], ...]) -> list[tuple[Any, str]]:
    return [(tracking.dvc_dataset(data_file(data, k), data["data_version"], data.get("project_dir")), context)
            for k, context in reads if data_file(data, k)]


def checkpoint_missing(result: dict[str, Any]) -> str | None:
    """The cache rule's check for a training stage: its checkpoint is on disk or in MLflow."""
    if (Path(result["checkpoint"]) / "clara.json").is_file():
        return None
    uri = result["model_uri"]
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return None if tracking.client().list_artifacts(run_id, path) else f"its checkpoint {uri} is gone"
    name, _, version = uri.removeprefix("models:/").partition("/")
    return version_missing({"name": name, "version": version})


def version_missing(result: dict[str, Any]) -> str | None:
    """The cache rule's check for promote: the registered version still exists."""
    try:
        tracking.client().get_model_version(result["name"], result["version"])
        return None
    except Exception:  # MlflowException: deleted
        return f"model version {result['name']} v{result['version']} is gone"
