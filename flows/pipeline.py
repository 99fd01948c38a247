"""The CLaRa pipeline as Prefect flows: thin wrappers over ``clara.stages`` that track everything in MLflow.

    clara (parent flow, deployment ``full-pipeline``)
      synthesize        subflow: ingest -> synthesize shards (map) -> merge -> DVC snapshot + push
      pretrain_scp      task: SCP training (every passage reconstructed + synthesized QA), registers
                        ``clara-compressor``
      instruct          task: stage 2, QA over k compressed passages (gold + hard negatives)
      train_e2e         task: end-to-end training (query reasoner + generator)
      compress_corpus   subflow: compress shards (map) -> load + publish a pgvector build
      evaluate          task: CLaRa vs baselines on the synthesized dev split, from the store
      promote           task: register ``clara`` and move ``production`` only if it beats the current one

Each stage receives explicit references from the one before (data version, run ids, model URIs, build id) and
returns its own as a small JSON dict. The training, evaluation and promotion tasks are cached by their inputs
(a rerun with unchanged inputs skips them: Prefect shows them as Cached); the shard tasks and the store are
idempotent by themselves (finished shards and published builds are found and reused), and an interrupted
stage resumes from its own checkpoints. Shards run on the flow's task runner: threads by default, a Dask
cluster when ``dask_address`` or ``dask_workers`` is set.
"""

# No `from __future__ import annotations`: Prefect builds the parameter form (a pydantic model) from the
# evaluated annotations, and string annotations such as "Literal[...]" fail to resolve there.
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from clara import stages
from clara.data.corpus import corpus_name, prepare_corpus, read_corpus
from flows import profiles, tracking

PROJECT = Path(__file__).resolve().parent.parent
CACHE_VERSION = "2"  # bump when a stage's outputs change meaning, to invalidate cached results


# ------------------------------------------------------------------------------------------- plumbing

_NOT_INPUTS = ("parent_run", "run_id", "reused")


def _key(stage: str, params: dict[str, Any]) -> str:
    """The input hash of a stage: its parameters and upstream references, minus what names this run rather than
    its inputs (the parent run, upstream run ids), plus the tracking server (results name MLflow runs, which
    only exist on that server)."""
    body = {k: ({kk: vv for kk, vv in v.items() if kk not in _NOT_INPUTS} if isinstance(v, dict) else v)
            for k, v in params.items() if k not in _NOT_INPUTS}
    raw = json.dumps([CACHE_VERSION, stage, tracking.tracking_uri(), body], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _cache_key(context, parameters: dict[str, Any]) -> str:
    return _key(context.task.name, parameters)


def _transient(task, task_run, state) -> bool:
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


def _work_dir(stage: str, key: str) -> Path:
    """Checkpoints and shard files: the cache folder, never the repository (STYLE: no weights in git)."""
    from clara.model.base import cache_dir

    return cache_dir() / "pipeline" / f"{stage}-{key}"


def _checkpoint(ref: dict[str, Any]) -> Path:
    """A stage's checkpoint: its local folder if still there, else downloaded from MLflow."""
    local = Path(ref["checkpoint"])
    if (local / "clara.json").is_file():
        return local
    from clara.eval.datasets import resolve_model

    return resolve_model(ref["model_uri"], tracking.download_model)


class _Stage:
    """A nested MLflow run for one stage, finished (or failed) on exit. ``reads``: the DVC-versioned files the
    stage reads, as ``(data key, context)`` pairs of the synthesize stage's reference, logged as the run's
    dataset inputs."""

    def __init__(self, name: str, parent_run: str, experiment: str, params: dict[str, Any],
                 data: dict[str, Any] | None = None, reads: tuple[tuple[str, str], ...] = ()):
        self.c = tracking.client()
        self.exp = tracking.experiment_id(self.c, experiment)
        self.run_id = tracking.start_run(self.c, self.exp, name, parent=parent_run,
                                         tags={"clara.stage": name, "prefect.flow_run_id": str(flow_run.id)})
        tracking.log_params(self.c, self.run_id, params)
        if data is not None:
            tracking.log_datasets(self.c, self.run_id, [
                (tracking.dvc_dataset(_data_file(data, key), data["data_version"], data.get("project_dir")), ctx)
                for key, ctx in reads if _data_file(data, key)])

    def __enter__(self) -> "_Stage":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        tracking.finish(self.c, self.run_id, ok=exc_type is None)


def _data_file(data: dict[str, Any], key: str) -> str | None:
    """A file of the synthesize stage's reference: a key of it, or ``train``/``dev`` (the synthesized splits)."""
    if key in ("train", "dev"):
        return str(Path(data["synth_dir"]) / f"{key}.jsonl")
    return data.get(key)


def _torchrun(nproc: int, cli_args: list[str], out: Path, c, run_id: str) -> Path:
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
    _replay_metrics(out, c, run_id)
    return out / "model"


def _replay_metrics(out: Path, c, run_id: str) -> None:
    """Log a training folder's metrics.jsonl (one line per step) to ``run_id``."""
    path = out / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        row = json.loads(line)
        tracking.log_metrics(c, run_id, {k: v for k, v in row.items() if k != "step"}, row["step"])


class _LiveMetrics:
    """The training callback: each step to MLflow as it happens. When the training call found its run already
    finished on disk (a recomputed cached stage), nothing streamed, and ``replay`` logs the recorded steps."""

    def __init__(self, c, run_id: str):
        self.c, self.run_id, self.calls = c, run_id, 0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.calls += 1
        tracking.log_metrics(self.c, self.run_id, metrics, step)

    def replay_if_silent(self, out: Path) -> None:
        if not self.calls:
            _replay_metrics(out, self.c, self.run_id)


_CACHED = dict(cache_key_fn=_cache_key, persist_result=True, result_serializer="json",
               retries=2, retry_delay_seconds=10, retry_condition_fn=_transient)


# ----------------------------------------------------------------------------------------- synthesis

@task(name="ingest-corpus", retries=1, retry_condition_fn=_transient)
def ingest_corpus(corpus: str, preset: str, project_dir: str) -> dict[str, Any]:
    from clara.config import preset as make_preset

    out = Path(project_dir) / "data" / "corpus" / f"{corpus_name(corpus)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    return prepare_corpus(corpus, make_preset(preset), out)


@task(name="synthesize-shard", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient)
def synthesize_shard(corpus_file: str, start: int, end: int, out_dir: str, teacher: dict[str, Any],
                     cfg: dict[str, Any]) -> dict[str, Any]:
    return stages.synthesize_shard(corpus_file, start, end, out_dir, teacher, cfg)


@task(name="dvc-snapshot", retries=2, retry_delay_seconds=5)
def dvc_snapshot(project_dir: str, push: bool) -> str:
    from clara.data.versioning import snapshot

    return snapshot(project_dir, "data", push=push)


@flow(name="synthesize", task_runner=ThreadPoolTaskRunner(max_workers=1))
def synthesize(corpus: str, max_docs: Optional[int], preset: str, teacher: dict[str, Any], shards: int,
               project_dir: str, dvc_push: bool, parent_run: str, experiment: str, seed: int = 0) -> dict[str, Any]:
    """Corpus -> data/corpus/<name>.jsonl; teacher -> data/synth/<name>/ (train/dev); then a DVC snapshot."""
    log = get_run_logger()
    name = corpus_name(corpus)
    prepared = ingest_corpus(corpus, preset, project_dir)
    corpus_file = prepared["path"]
    n = min(prepared["documents"], max_docs) if max_docs else prepared["documents"]
    cfg = {"seed": seed}
    key = _key("synthesize", {"source": prepared["key"], "n": n, "teacher": teacher, "cfg": cfg})
    ranges = stages.shard_ranges(n, shards)
    work = _work_dir("synth", key)
    shard_dirs = [str(work / f"shard-{i:04d}") for i in range(len(ranges))]
    futures = [synthesize_shard.submit(corpus_file, s, e, d, teacher, cfg) for (s, e), d in zip(ranges, shard_dirs)]
    shard_reports = [f.result() for f in futures]
    out = Path(project_dir) / "data" / "synth" / name
    report = stages.merge_synthesis(shard_dirs, out, cfg, corpus_report=prepared["report"])
    mixes = stages.training_mixes(corpus_file, out / "mix", out, max_docs=n, seed=seed)
    version = dvc_snapshot(project_dir, dvc_push)
    log.info("synthesized %d documents in %d shard(s); data version %s", n, len(ranges), version)

    c = tracking.client()
    exp = tracking.experiment_id(c, experiment)
    earlier = c.search_runs([exp], f"tags.`clara.stage` = 'synthesize' AND tags.data_version = '{version}' "
                                   f"AND tags.`clara.synth_key` = '{key}' AND attributes.status = 'FINISHED'",
                            max_results=1)
    if earlier:  # the same data from the same inputs: point at the run that recorded it
        run_id, cached = earlier[0].info.run_id, True
    else:
        with _Stage("synthesize", parent_run, experiment,
                    {"corpus": corpus, "max_docs": max_docs, "shards": len(ranges), "teacher": teacher,
                     "data_version": version},
                    {"data_version": version, "corpus_file": corpus_file, "project_dir": project_dir},
                    reads=(("corpus_file", "source corpus"),)) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": version, "clara.synth_key": key})
            tracking.log_metrics(st.c, st.run_id, {
                "documents_in": report["documents_in"], "documents_kept": report["documents_kept"],
                "yield_documents": report["yield_documents"],
                "verification_pass_rate": report["verification_pass_rate"],
                "mean_coverage_kept": report["mean_coverage_kept"],
                "seconds": sum(r["seconds_this_run"] for r in shard_reports),
                **{f"rows.{k}": v for k, v in report["rows_out"].items()}})
            st.c.log_dict(st.run_id, report, "synthesis/report.json")
            st.c.log_artifact(st.run_id, str(out / "report.md"), "synthesis")
            st.c.log_artifact(st.run_id, str(Path(project_dir) / "data.dvc"))
        run_id, cached = st.run_id, False
    return {"data_version": version, "corpus_file": corpus_file, "max_docs": n, "synth_dir": str(out),
            "scp_file": mixes["scp"], "instruct_file": mixes["instruct"],
            "corpus_version": version if n == prepared["documents"] else f"{version}/first-{n}",
            "project_dir": project_dir, "run_id": run_id, "reused": cached}


# ------------------------------------------------------------------------------------------- training

@task(name="pretrain_scp", **_CACHED)
def pretrain_scp(data: dict[str, Any], preset: str, compression_rate: int, steps: int, batch_size: int,
                 lr: float, init_from: Optional[str], device: Optional[str], processes: int, parent_run: str,
                 experiment: str) -> dict[str, Any]:
    key = _key("pretrain_scp", dict(locals()))  # first: only the parameters are local yet
    from clara.config import OptimSettings, SCPConfig, TrainConfig, preset as make_preset, to_dict
    from clara.data.records import load_scp_records
    from clara.model import ClaraModel
    from clara.model.checkpoint import load_checkpoint
    from flows.registry import log_pyfunc, register
    from clara.training.scp import train_scp

    init = load_checkpoint(init_from, device=device) if init_from else None
    if init is not None and init.cfg.base != preset:
        raise ValueError(f"init_from {init_from} is a {init.cfg.base!r} checkpoint, not {preset!r}: pass "
                         f"init_from=none (and scp_steps) to train {preset!r} from scratch")
    if init is not None and init.cfg.compression_rate != compression_rate:
        raise ValueError(f"init_from {init_from} was trained at rate {init.cfg.compression_rate}, "
                         f"not {compression_rate}")
    model_cfg = init.cfg if init is not None else \
        make_preset(preset, compression_rate=compression_rate, **({"device": device} if device else {}))
    cfg = SCPConfig(model=model_cfg,
                    train=TrainConfig(batch_size=batch_size, max_steps=steps, checkpoint_every=max(10, steps // 4),
                                      optim=OptimSettings(lr=lr)))
    with _Stage("pretrain_scp", parent_run, experiment,
                {"data_version": data["data_version"], "init_from": init_from, **to_dict(cfg)},
                data, reads=(("scp_file", "training"),)) as st:
        tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"]})
        work, train_file = _work_dir("scp", key), Path(data["scp_file"])
        if init is not None and steps == 0:  # a trained starting point, used as it is
            from clara.model.checkpoint import resolve_checkpoint

            final = resolve_checkpoint(init_from)
        elif processes > 1 and init is None:
            work.mkdir(parents=True, exist_ok=True)
            (work / "train.json").write_text(json.dumps({"train": to_dict(cfg.train), "mse_weight": cfg.mse_weight}))
            final = _torchrun(processes, ["train", "scp", "--data", str(train_file), "--out", str(work),
                                          "--preset", preset, "--rate", str(compression_rate),
                                          "--config", str(work / "train.json"), *(["--device", device] if device
                                                                                   else [])], work, st.c, st.run_id)
        else:
            model, live = init or ClaraModel.build(cfg.model), _LiveMetrics(st.c, st.run_id)
            final = train_scp(model, load_scp_records(train_file), cfg, work, callback=live, progress=False)
            live.replay_if_silent(work)
        logged = log_pyfunc(st.run_id, "compressor", final, {}, input_column="text")
        version = register(st.c, "clara-compressor", logged,
                           {"data_version": data["data_version"], "compression_rate": compression_rate,
                            "preset": preset}, description="CLaRa compressor (SCP): documents -> memory tokens")
    return {"run_id": st.run_id, "checkpoint": str(final), "model_uri": f"models:/clara-compressor/{version}",
            "version": version}


@task(name="instruct", **_CACHED)
def instruct(scp: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int, lr: float,
             device: Optional[str], parent_run: str, experiment: str) -> dict[str, Any]:
    """Stage 2: each synthesized question over its gold passage and k-1 hard negatives, compressed; the
    compressor and generator continue from SCP. No steps (or no questions): SCP's checkpoint passes through."""
    key = _key("instruct", dict(locals()))  # first: only the parameters are local yet
    from clara.config import OptimSettings, SCPConfig, TrainConfig, to_dict
    from clara.data.records import load_scp_records
    from clara.model.checkpoint import load_checkpoint
    from clara.training.scp import train_scp

    if steps <= 0 or not data.get("instruct_file"):
        return {**scp, "skipped": True}
    model = load_checkpoint(_checkpoint(scp), device=device)
    cfg = SCPConfig(model=model.cfg, train=TrainConfig(batch_size=batch_size, max_steps=steps,
                                                       checkpoint_every=max(10, steps // 4),
                                                       optim=OptimSettings(lr=lr)))
    with _Stage("instruct", parent_run, experiment,
                {"data_version": data["data_version"], "init": scp["model_uri"], **to_dict(cfg)},
                data, reads=(("instruct_file", "training"),)) as st:
        tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"], "init": scp["model_uri"]})
        work, live = _work_dir("instruct", key), _LiveMetrics(st.c, st.run_id)
        final = train_scp(model, load_scp_records(data["instruct_file"]), cfg, work, stage="instruct",
                          callback=live, progress=False)
        live.replay_if_silent(work)
        st.c.log_artifacts(st.run_id, str(final), "checkpoint")  # safetensors + JSON, no pickles
    return {"run_id": st.run_id, "checkpoint": str(final), "model_uri": f"runs:/{st.run_id}/checkpoint"}


@task(name="train_e2e", **_CACHED)
def train_e2e(scp: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int, lr: float, top_k: int,
              n_candidates: int, device: Optional[str], processes: int, parent_run: str, experiment: str
              ) -> dict[str, Any]:
    key = _key("train_e2e", dict(locals()))  # first: only the parameters are local yet
    from clara.config import E2EConfig, OptimSettings, TrainConfig, to_dict
    from clara.eval.datasets import synth_qa
    from clara.model.checkpoint import load_checkpoint, read_checkpoint_config
    from clara.training.e2e import train_e2e as train

    cfg = E2EConfig(train=TrainConfig(batch_size=batch_size, max_steps=steps, checkpoint_every=max(10, steps // 4),
                                      optim=OptimSettings(lr=lr)), n_candidates=n_candidates, top_k=top_k)
    with _Stage("train_e2e", parent_run, experiment,
                {"data_version": data["data_version"], "init": scp["model_uri"], **to_dict(cfg)},
                data, reads=(("train", "training"), ("corpus_file", "retrieval corpus"))) as st:
        tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"], "init": scp["model_uri"]})
        docs = read_corpus(data["corpus_file"], data["max_docs"])
        qa = synth_qa(data["synth_dir"], split="train")
        work = _work_dir("e2e", key)
        if processes > 1:
            from clara.data.corpus import atomic_write_lines, write_corpus

            work.mkdir(parents=True, exist_ok=True)
            atomic_write_lines(work / "qa.jsonl", (json.dumps(vars(r)) for r in qa))
            write_corpus(docs, work / "corpus.jsonl")
            (work / "e2e.json").write_text(json.dumps(to_dict(cfg)))
            final = _torchrun(processes, ["train", "e2e", "--data", str(work / "qa.jsonl"), "--corpus",
                                          str(work / "corpus.jsonl"), "--init", str(_checkpoint(scp)), "--out",
                                          str(work), "--config", str(work / "e2e.json"),
                                          *(["--device", device] if device else [])], work, st.c, st.run_id)
        else:
            model, live = load_checkpoint(_checkpoint(scp), device=device), _LiveMetrics(st.c, st.run_id)
            final = train(model, qa, {d.id: d.full_text for d in docs}, cfg, work, callback=live, progress=False)
            live.replay_if_silent(work)
        st.c.log_artifacts(st.run_id, str(final), "checkpoint")  # safetensors + JSON, no pickles
    return {"run_id": st.run_id, "checkpoint": str(final), "model_uri": f"runs:/{st.run_id}/checkpoint",
            "rate": read_checkpoint_config(final)["model"]["compression_rate"]}


# -------------------------------------------------------------------------------------------- storage

@task(name="find-build", retries=3, retry_delay_seconds=5, retry_condition_fn=_transient)
def find_build(model_uri: str, rate: int, corpus_version: str) -> dict[str, Any]:
    """A published build of exactly this model and corpus version (reused), else what a killed run loaded."""
    from clara.store.builds import StoreError, loaded_ids, ready_build
    from clara.store.db import connect

    engine = connect()
    try:
        try:
            b = ready_build(engine, model_uri=model_uri, compression_rate=rate, corpus_version=corpus_version)
            if b.dense_model is not None:  # a build from before the first-stage modes is rebuilt, not reused
                return {"build_id": b.id, "n_docs": b.n_docs, "ann": b.ann_kind, "dense_model": b.dense_model,
                        "loaded": []}
        except StoreError:
            pass
        loaded = loaded_ids(engine, model_uri=model_uri, corpus_version=corpus_version, compression_rate=rate)
        return {"build_id": None, "loaded": sorted(loaded)}
    finally:
        engine.dispose()


@task(name="compress-shard", retries=1, retry_condition_fn=_transient)
def compress_shard(checkpoint: str, corpus_file: str, start: int, end: int, out_file: str, skip_ids: list[str],
                   batch_size: int, device: Optional[str]) -> dict[str, Any]:
    from clara.store.loading import compress_shard as compress

    return compress(checkpoint, read_corpus(corpus_file)[start:end], out_file, skip_ids, batch_size, device)


@task(name="load-build", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient)
def load_build(shard_files: list[str], data: dict[str, Any], checkpoint: str, model_uri: str) -> dict[str, Any]:
    from clara.config import ModelConfig, _from_dict
    from clara.model.checkpoint import read_checkpoint_config
    from clara.dense import DenseEncoder
    from clara.store.db import connect
    from clara.store.loading import load_build as load, shard_files as shards

    mcfg = _from_dict(ModelConfig, read_checkpoint_config(checkpoint)["model"])
    hidden = _hidden_size(checkpoint)
    engine = connect()
    try:
        # Every build carries the dense vectors and BM25 statistics the first-stage modes need.
        b = load(engine, read_corpus(data["corpus_file"], data["max_docs"]), shards(shard_files),
                 model_uri=model_uri, corpus_version=data["corpus_version"], compression_rate=mcfg.compression_rate,
                 hidden_size=hidden, n_mem_max=mcfg.n_mem_max, dense=DenseEncoder())
    finally:
        engine.dispose()
    return {"build_id": b.id, "n_docs": b.n_docs, "ann": b.ann_kind, "dense_model": b.dense_model}


def _hidden_size(checkpoint: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint) / "special_embeddings.safetensors"), framework="pt") as f:
        return int(f.get_slice(next(iter(f.keys()))).get_shape()[-1])


@flow(name="compress_corpus", task_runner=ThreadPoolTaskRunner(max_workers=1))
def compress_corpus(e2e: dict[str, Any], data: dict[str, Any], shards: int, batch_size: int,
                    device: Optional[str], parent_run: str, experiment: str) -> dict[str, Any]:
    """The corpus through the trained compressor into a published pgvector build (reused when it exists)."""
    import time

    log = get_run_logger()
    found = find_build(e2e["model_uri"], e2e["rate"], data["corpus_version"])
    if found["build_id"] is not None:
        log.info("build %s already holds this model's compression of %s: reused",
                 found["build_id"], data["corpus_version"])
        c = tracking.client()
        earlier = c.search_runs([tracking.experiment_id(c, experiment)],
                                f"tags.`clara.stage` = 'compress_corpus' AND tags.build_id = '{found['build_id']}'",
                                max_results=1)
        # The same fields as a fresh build's: the evaluate stage's cache key is computed from this dict.
        return {"build_id": found["build_id"], "n_docs": found["n_docs"], "ann": found["ann"],
                "dense_model": found["dense_model"], "reused": True,
                "run_id": earlier[0].info.run_id if earlier else None}
    checkpoint = str(_checkpoint(e2e))
    key = _key("compress", {"model": e2e["model_uri"], "corpus": data["corpus_version"]})
    work = _work_dir("compress", key)
    started = time.perf_counter()
    ranges = stages.shard_ranges(data["max_docs"], shards)
    futures = [compress_shard.submit(checkpoint, data["corpus_file"], s, e, str(work / f"shard-{i:04d}.safetensors"),
                                     found["loaded"], batch_size, device) for i, (s, e) in enumerate(ranges)]
    parts = [f.result() for f in futures]
    compress_s = time.perf_counter() - started
    built = load_build([p["file"] for p in parts], data, checkpoint, e2e["model_uri"])
    with _Stage("compress_corpus", parent_run, experiment,
                {"model_uri": e2e["model_uri"], "corpus_version": data["corpus_version"], "shards": len(ranges),
                 "build_id": built["build_id"]}, data, reads=(("corpus_file", "corpus"),)) as st:
        new = sum(p["documents"] for p in parts if not p["reused"])
        tracking.set_tags(st.c, st.run_id, {"build_id": built["build_id"], "data_version": data["data_version"]})
        tracking.log_metrics(st.c, st.run_id, {"documents": built["n_docs"], "compress_seconds": compress_s,
                                               "docs_per_s": new / compress_s if new else 0.0})
    shutil.rmtree(work, ignore_errors=True)  # the memories now live in the store
    return {**built, "reused": False, "run_id": st.run_id}


# ------------------------------------------------------------------------------------ evaluate, promote

@task(name="evaluate", **_CACHED)
def evaluate(e2e: dict[str, Any], build: dict[str, Any], data: dict[str, Any], questions: int, top_k: int,
             baselines: str, retrieval: dict[str, Any], device: Optional[str], parent_run: str, experiment: str
             ) -> dict[str, Any]:
    key = _key("evaluate", dict(locals()))  # first: only the parameters are local yet
    from clara.eval.datasets import subsample, synth_qa
    from clara.eval.run import EvalConfig, evaluate as run_eval
    from clara.model.checkpoint import load_checkpoint
    from clara.store.builds import ready_build
    from clara.store.db import connect

    out = _work_dir("eval", key)
    cfg = EvalConfig(k=top_k, baselines=tuple(b for b in baselines.split(",") if b), settings=("normal",),
                     mode=retrieval["mode"], fuse=retrieval["fuse"], n_candidates=retrieval["candidates"],
                     retrieval_modes=())
    with _Stage("evaluate", parent_run, experiment,
                {"model_uri": e2e["model_uri"], "build_id": build["build_id"], "questions": questions,
                 "k": top_k, "baselines": baselines, "data_version": data["data_version"],
                 **{f"retrieval.{k}": v for k, v in retrieval.items()}},
                data, reads=(("dev", "evaluation"), ("corpus_file", "retrieval corpus"))) as st:
        docs = read_corpus(data["corpus_file"], data["max_docs"])
        qa, _ = subsample(synth_qa(data["synth_dir"], split="dev"), docs, questions, None)
        model = load_checkpoint(_checkpoint(e2e), device=device)
        engine = connect()
        rows = run_eval(qa, docs, {model.cfg.compression_rate: model}, out, cfg,
                        stores={model.cfg.compression_rate: (engine, ready_build(engine, build["build_id"]))},
                        progress=lambda msg: None)
        engine.dispose()
        for r in rows:
            prefix = r["system"] if r["system"] != "raw-text" else f"raw-text.{r['retriever']}"
            tracking.log_metrics(st.c, st.run_id, {f"{prefix}.{k}": v for k, v in stages.numeric(r).items()})
        st.c.log_artifacts(st.run_id, str(out), "evaluation")
        table = (out / "report.md").read_text(encoding="utf-8")
    metrics = {tracking.metric_name(k): v for k, v in stages.numeric(stages.clara_row(rows)).items()}
    return {"run_id": st.run_id, "metrics": metrics, "table": table,
            "questions": len(qa)}


@task(name="promote", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient)
def promote(e2e: dict[str, Any], build: dict[str, Any], scores: dict[str, Any], data: dict[str, Any],
            scp: dict[str, Any], model_name: str, gate_metric: str, gate_rule: dict[str, float], top_k: int,
            retrieval: dict[str, Any], parent_run: str, experiment: str) -> dict[str, Any]:
    """Register the model (once per set of inputs: a rerun finds its version) and run the gate (every time, so
    the decision reflects the production version as it is now)."""
    key = _key("promote", dict(locals()))
    from clara.eval.gate import GateRule
    from flows.registry import PER_QUESTION_METRICS, gate, log_pyfunc, register

    metrics = scores["metrics"]
    if gate_metric not in PER_QUESTION_METRICS:
        raise ValueError(f"gate metric {gate_metric!r} cannot be compared question by question; "
                         f"choose one of {', '.join(PER_QUESTION_METRICS)}")
    c = tracking.client()
    found = c.search_model_versions(f"name = '{model_name}' AND tags.`clara.promote_key` = '{key}'")
    if found:
        version, reused = str(found[0].version), True
    else:
        logged = log_pyfunc(e2e["run_id"], "qa", _checkpoint(e2e),
                            {"build_id": build["build_id"], "k": top_k, **retrieval}, input_column="question")
        version = register(c, model_name, logged, {
            **{f"eval.{k}": round(v, 6) for k, v in metrics.items()}, "eval.run_id": scores["run_id"],
            "data_version": data["data_version"], "build_id": build["build_id"], "compressor": scp["model_uri"],
            **{f"retrieval.{k}": v for k, v in retrieval.items()},
            "git_commit": tracking.git_commit(PROJECT), "prefect.flow_run_id": str(flow_run.id),
            "clara.promote_key": key},
            description="CLaRa end to end: questions -> answers from the compressed corpus in pgvector")
        reused = False
    decision = gate(c, model_name, version, gate_metric, rule=GateRule(**gate_rule))
    return {"name": model_name, "version": version, "alias": decision.alias, "reason": decision.reason,
            "model_uri": f"models:/{model_name}/{version}", "reused": reused}


# -------------------------------------------------------------------------------------------- parent

def task_runner(dask_address: Optional[str], dask_workers: int):
    """Threads (one at a time: torch already uses every core) unless a Dask cluster is asked for."""
    if dask_address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=1)


def _summary(result: dict[str, Any], exp: str) -> str:
    uri = tracking.tracking_uri()
    p = result["promotion"]
    lines = [f"# CLaRa pipeline `{result['flow_run']}`", "",
             f"- data version: `{result['data']['data_version']}` (corpus `{result['data']['corpus_version']}`)",
             f"- store build: **{result['build']['build_id']}** ({result['build']['n_docs']} documents"
             f"{', reused' if result['build'].get('reused') else ''})",
             f"- model: [{p['name']} v{p['version']}]({tracking.model_url(p['name'], p['version'], uri)}) -> "
             f"**{p['alias']}**: {p['reason']}", "",
             f"## Evaluation ({result['evaluation']['questions']} synthesized dev questions)", "",
             result["evaluation"]["table"], "", "## MLflow runs", "",
             f"- [pipeline]({tracking.run_url(result['parent_run'], exp, uri)})"]
    for stage in ("synthesize", "pretrain_scp", "instruct", "train_e2e", "compress_corpus", "evaluate"):
        run = result["runs"].get(stage)
        if run:
            cached = " (cached)" if stage in result["cached"] else ""
            lines.append(f"- [{stage}]({tracking.run_url(run, exp, uri)}){cached}")
    return "\n".join(lines) + "\n"


def check_parameters(p: dict[str, Any]) -> None:
    """Every budget and choice the stages would otherwise reject late (after minutes of synthesis or training),
    all reported at once."""
    from clara.config import COMPRESSION_RATES

    problems = []
    if p["compression_rate"] not in COMPRESSION_RATES:
        problems.append(f"compression_rate={p['compression_rate']} (one of {', '.join(map(str, COMPRESSION_RATES))})")
    at_least = {"top_k": 1, "n_candidates": 1, "eval_questions": 1, "shards": 1, "train_processes": 1,
                "scp_batch_size": 1, "instruct_batch_size": 1, "e2e_batch_size": 1, "max_docs": 0,
                "scp_steps": 0, "instruct_steps": 0, "e2e_steps": 0, "dask_workers": 0}
    for name, low in at_least.items():
        value = p.get(name)
        if value is not None and value < low:
            problems.append(f"{name}={value} (at least {low})")
    if p["n_candidates"] < p["top_k"]:
        problems.append(f"n_candidates={p['n_candidates']} is below top_k={p['top_k']}")
    for name in ("scp_lr", "instruct_lr", "e2e_lr"):
        if not p[name] > 0:
            problems.append(f"{name}={p[name]} (must be > 0)")
    if p["retrieval_fuse"] < 0 or p["gate_max_latency_regression"] < 0:
        problems.append("retrieval_fuse and gate_max_latency_regression must be >= 0")
    problems += _model_problems(p["preset"])
    if problems:
        raise ValueError("invalid parameters: " + "; ".join(problems))


def _model_problems(name: str) -> list[str]:
    """A preset that is neither bundled nor readable (a local folder, or a hub id this machine can fetch or has
    cached) would fail only when SCP loads it, after synthesis: read its config now instead."""
    from clara.config import preset

    base = preset(name).base
    if base in ("tiny", "smollm2-135m"):  # built or converted locally from installed packages
        return []
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return [f"preset={name!r}: not a bundled preset (tiny, smollm2-135m), and no model config could be read "
                f"from {base!r} ({first})"]
    return []


def _fail(c, parent: str, exc: BaseException) -> None:
    # The reason goes on the run, so that someone browsing MLflow sees why it failed without Prefect's logs.
    tracking.set_tags(c, parent, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
    tracking.finish(c, parent, ok=False)


@flow(name="clara", log_prints=True)
def clara(
    profile: Literal["demo", "quality", "gpu"] = "demo",
    corpus: str = "bundled",
    max_docs: Optional[int] = None,
    preset: str = "smollm2-135m",
    compression_rate: int = 16,
    init_from: Optional[str] = None,
    teacher: Literal["natural", "extractive", "transformers", "openai"] = "natural",
    teacher_model: Optional[str] = None,
    teacher_base_url: Optional[str] = None,
    scp_steps: Optional[int] = None,
    scp_batch_size: Optional[int] = None,
    scp_lr: float = 5e-4,
    instruct_steps: Optional[int] = None,
    instruct_batch_size: Optional[int] = None,
    instruct_lr: float = 2e-4,
    e2e_steps: Optional[int] = None,
    e2e_batch_size: Optional[int] = None,
    e2e_lr: float = 1e-4,
    train_processes: int = 1,
    top_k: int = 5,
    n_candidates: int = 20,
    retrieval_mode: Literal["clara", "dense", "lexical", "hybrid"] = "hybrid",
    retrieval_fuse: float = 2.0,
    eval_questions: Optional[int] = None,
    baselines: str = "bm25",
    gate_metric: str = "f1",
    gate_margin: float = 0.0,
    gate_max_latency_regression: float = 0.10,
    shards: int = 1,
    dask_address: Optional[str] = None,
    dask_workers: int = 0,
    device: Optional[str] = None,
    model_name: str = "clara",
    experiment: str = tracking.EXPERIMENT,
    project_dir: Optional[str] = None,
    dvc_push: bool = True,
    refresh_cache: bool = False,
) -> dict[str, Any]:
    """Synthesize -> SCP -> instruct -> E2E -> compress the corpus into pgvector -> evaluate -> promote.

    ``profile`` sets the budgets (``flows.profiles``: ``demo`` runs on a CPU laptop in minutes, ``quality`` for
    hours on a CPU, ``gpu`` on one GPU); a budget parameter given explicitly wins (``max_docs=0``: the whole
    corpus). ``init_from``: a checkpoint folder to continue SCP from (``scp_steps=0`` uses it as it is; relative
    to the project folder; ``none`` turns the profile's off).
    """
    params = dict(locals())
    project = str(Path(project_dir).resolve()) if project_dir else str(PROJECT)
    c = tracking.client()
    exp = tracking.experiment_id(c, experiment)
    parent = tracking.start_run(c, exp, f"pipeline {flow_run.name}", tags={
        "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
        "git_commit": tracking.git_commit(project), "clara.stage": "pipeline"})
    try:
        # Bad parameters fail here, before any stage, with the reason on the MLflow run as well as in Prefect.
        budget = profiles.resolve(profile, {k: params[k] for k in profiles.PROFILES["demo"]})
        params.update(budget)  # MLflow records the budgets this run used, not the Nones it was called with
        check_parameters(params)
    except BaseException as exc:
        _fail(c, parent, exc)
        raise
    tracking.log_params(c, parent, params)
    runner = task_runner(dask_address, dask_workers)
    teacher_spec = {"kind": teacher, "model": teacher_model, "base_url": teacher_base_url}
    result: dict[str, Any] = {"flow_run": str(flow_run.name), "parent_run": parent, "runs": {}, "cached": []}
    common = dict(parent_run=parent, experiment=experiment)

    def staged(t, *args, **kwargs):
        # refresh_cache recomputes a cached stage (e.g. after its MLflow runs or checkpoints were deleted)
        state = (t.with_options(refresh_cache=True) if refresh_cache else t)(*args, **kwargs, return_state=True)
        if state.is_completed() and state.name == "Cached":
            result["cached"].append(t.name)
        return state.result()

    try:
        data = synthesize.with_options(task_runner=runner)(corpus, budget["max_docs"] or None, preset, teacher_spec,
                                                           shards, project, dvc_push, **common)
        if data["reused"]:
            result["cached"].append("synthesize")
        tracking.set_tags(c, parent, {"data_version": data["data_version"],
                                      "corpus_version": data["corpus_version"]})
        init = budget["init_from"]
        if init and not Path(init).is_absolute():
            init = str(Path(project) / init)
        scp = staged(pretrain_scp, data, preset, compression_rate, budget["scp_steps"], budget["scp_batch_size"],
                     scp_lr, init, device, train_processes, **common)
        inst = staged(instruct, scp, data, budget["instruct_steps"], budget["instruct_batch_size"], instruct_lr,
                      device, **common)
        e2e = staged(train_e2e, inst, data, budget["e2e_steps"], budget["e2e_batch_size"], e2e_lr, top_k,
                     n_candidates, device, train_processes, **common)
        build = compress_corpus.with_options(task_runner=runner)(e2e, data, shards, 16, device, **common)
        if build["reused"]:
            result["cached"].append("compress_corpus")
        retrieval = {"mode": retrieval_mode, "fuse": retrieval_fuse, "candidates": n_candidates}
        scores = staged(evaluate, e2e, build, data, budget["eval_questions"], top_k, baselines, retrieval, device,
                        **common)
        gate_rule = {"margin": gate_margin, "max_latency_regression": gate_max_latency_regression}
        promotion = staged(promote, e2e, build, scores, data, scp, model_name, gate_metric, gate_rule,
                           top_k, retrieval, **common)
        if promotion["reused"]:
            result["cached"].append("promote")
        result.update(data=data, scp=scp, e2e=e2e, build=build, evaluation=scores, promotion=promotion)
        result["runs"] = {"synthesize": data["run_id"], "pretrain_scp": scp["run_id"],
                          "instruct": None if inst.get("skipped") else inst["run_id"], "train_e2e": e2e["run_id"],
                          "compress_corpus": build.get("run_id"), "evaluate": scores["run_id"]}
        tracking.set_tags(c, parent, {
            "build_id": build["build_id"], "model_version": promotion["version"], "alias": promotion["alias"],
            "gate_reason": promotion["reason"], "cached_stages": ",".join(result["cached"]) or "none",
            **{f"run.{k}": v for k, v in result["runs"].items()}})
        tracking.log_metrics(c, parent, {f"eval.{k}": v for k, v in scores["metrics"].items()})
        summary = _summary(result, exp)
        c.log_text(parent, summary, "summary.md")
        create_markdown_artifact(summary, key="clara-evaluation",
                                 description="CLaRa evaluation and model promotion for this pipeline run")
        print(summary)
    except BaseException as exc:
        _fail(c, parent, exc)
        raise
    tracking.finish(c, parent)
    return result
