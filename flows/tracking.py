"""MLflow tracking with explicit run ids (no fluent "active run"), so stages running in worker threads or
processes log to exactly the run they were handed.

The tracking server is ``$MLFLOW_TRACKING_URI``, else the one ``infra/`` starts on 127.0.0.1
(``$CLARA_MLFLOW_PORT``, default 5000).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from clara.atomic import publish
from clara.errors import ClaraError

EXPERIMENT = "clara"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's limits: 6000 characters for a param value, 100 metrics / 100 params per batch request.
_PARAM_MAX, _BATCH = 6000, 100


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"http://127.0.0.1:{os.environ.get('CLARA_MLFLOW_PORT', '5000')}"


def client(uri: str | None = None) -> MlflowClient:
    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class TrackingUnavailable(ClaraError):
    """The tracking server stopped answering: the message names it and how to bring it back."""


def outage(exc: BaseException) -> str | None:
    """If ``exc`` (or what caused it) is the tracking server not answering, what to tell the user; else None."""
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        unreachable = isinstance(exc, requests.ConnectionError) or (
            "API request to" in text and any(s in text for s in ("Connection refused", "Max retries exceeded",
                                                                 "Failed to establish", "timed out")))
        if unreachable:
            return (f"the MLflow tracking server at {tracking_uri()} does not answer; start it with "
                    "`python -m clara_infra.services up` (or `make services-up`) and run the deployment again: finished "
                    "stages are reused, and an interrupted one resumes from its checkpoints")
        exc = exc.__cause__ or exc.__context__
    return None


def download_model(uri: str) -> Path:
    """The local folder of a model URI's artifacts (``models:/name@alias``, ``models:/name/3``, ``runs:/…``): the
    resolver the library's commands are given for model URIs.

    Downloaded once into the cache folder and reused: an alias is resolved to its version first, and a version's
    artifacts never change. (A plain ``download_artifacts`` leaves a new ~57 MB temp folder per call: a script or
    server asking a thousand questions would fill the disk.)"""
    import os
    import shutil
    import tempfile

    import mlflow

    from clara.model.base import cache_dir

    if not re.match(r"(models|runs):/\S", uri):  # a path here would surface as an IndexError below
        raise ValueError(f"{uri!r} is not an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION or "
                         f"runs:/RUN_ID/PATH); a checkpoint folder is read by clara evaluate --model")
    mlflow.set_tracking_uri(tracking_uri())
    uri = resolve_version(uri)
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split(":", 1)[1].strip("/"))
    root = cache_dir() / "mlflow-models" / key
    done = root / "path.txt"  # written last: its presence means the download is whole
    if done.is_file():
        return root / done.read_text(encoding="utf-8")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        (tmp / "path.txt").write_text(got.relative_to(tmp).as_posix(), encoding="utf-8")
        try:
            publish(tmp, root)
        except OSError:  # another process finished the same download first: use theirs
            if not done.is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / done.read_text(encoding="utf-8")


def resolve_version(uri: str) -> str:
    """``models:/name@alias`` as ``models:/name/<version>`` (what the alias points at now); other URIs as given."""
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if not m:
        return uri
    return f"models:/{m.group(1)}/{client().get_model_version_by_alias(m.group(1), m.group(2)).version}"


def experiment_id(c: MlflowClient, name: str = EXPERIMENT) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if "mlflow.experimentKind" not in exp.tags:  # made by an earlier version of this code
            set_experiment_kind(c, exp.experiment_id)
        return exp.experiment_id
    exp_id = c.create_experiment(name)
    set_experiment_kind(c, exp_id)
    return exp_id


def set_experiment_kind(c: MlflowClient, exp_id: str) -> None:
    """Mark the experiment as model training (what MLflow's search and clients read; the 3.17 UI itself picks its
    view from the address: ``experiment_url``)."""
    c.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")


def dvc_dataset(path: str | Path, data_version: str, project_dir: str | Path | None = None) -> Dataset:
    """An MLflow dataset entry for a file under the DVC-tracked ``data/`` folder at ``data_version``: the runs
    table's Dataset column then names what a run read, and the source says how to get it back
    (``dvc get``/``dvc.api`` at that version)."""
    path = Path(path)
    try:
        rel = str(path.resolve().relative_to(Path(project_dir).resolve())) if project_dir else str(path)
    except ValueError:
        rel = str(path)
    rows = sum(1 for _ in path.open("rb")) if path.is_file() else None
    digest = hashlib.sha256(f"{data_version}:{rel}".encode()).hexdigest()[:10]
    source = json.dumps({"uri": f"dvc://{rel}@{data_version}", "path": rel, "data_version": data_version,
                         "tracked_by": "data.dvc"})
    name = rel.removeprefix("data/").removesuffix(".jsonl")
    return Dataset(name=name, digest=digest, source_type="dvc", source=source,
                   profile=json.dumps({"num_rows": rows}) if rows is not None else None)


def log_datasets(c: MlflowClient, run_id: str, datasets: Sequence[tuple[Dataset, str]]) -> None:
    """Record ``(dataset, context)`` pairs (context: training, evaluation, corpus …) as the run's inputs."""
    if datasets:
        c.log_inputs(run_id, [DatasetInput(d, [InputTag("mlflow.data.context", ctx)]) for d, ctx in datasets])


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def start_run(c: MlflowClient, exp_id: str, name: str, *, parent: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    # The runs table's Source column: the deployment's code, not "-".
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": "flows/pipeline.py", **(tags or {})}
    if parent:
        tags[PARENT_TAG] = parent
    return c.create_run(exp_id, run_name=name, tags=tags).info.run_id


def log_params(c: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in flatten(params).items()]
    for s in range(0, len(items), _BATCH):
        c.log_batch(run_id, params=items[s : s + _BATCH])


def set_tags(c: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
    for s in range(0, len(items), _BATCH):
        c.log_batch(run_id, tags=items[s : s + _BATCH])


def metric_name(key: str) -> str:
    """A metric or tag name MLflow accepts: ``recall@5`` -> ``recall_at_5`` (no ``@`` in MLflow names)."""
    return key.replace("@", "_at_")


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    import time

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for s in range(0, len(items), _BATCH):
        c.log_batch(run_id, metrics=items[s : s + _BATCH])


def finish(c: MlflowClient, run_id: str, ok: bool = True) -> None:
    c.set_terminated(run_id, "FINISHED" if ok else "FAILED")


# MLflow 3.17's UI opens every experiment in its GenAI view (traces, an empty usage chart) unless the address
# says otherwise; the experiment's ``mlflow.experimentKind`` tag does not change that (checked in a browser,
# docs/ui.md). Every link we print carries the model-training view.
_ML_VIEW = "workflowType=machine_learning"


def experiment_url(exp_id: str, uri: str | None = None) -> str:
    return f"{uri or tracking_uri()}/#/experiments/{exp_id}/runs?{_ML_VIEW}"


def run_url(run_id: str, exp_id: str, uri: str | None = None) -> str:
    return f"{uri or tracking_uri()}/#/experiments/{exp_id}/runs/{run_id}?{_ML_VIEW}"


def model_url(name: str, version: str | int, uri: str | None = None) -> str:
    return f"{uri or tracking_uri()}/#/models/{name}/versions/{version}?{_ML_VIEW}"


def git_commit(repo: str | Path) -> str | None:
    """HEAD of the repository (with ``-dirty`` if tracked files changed), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        # --no-optional-locks: a plain `git status` takes the index lock to refresh it, and a pipeline killed during
        # it would leave .git/index.lock behind, failing the user's next commit.
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
