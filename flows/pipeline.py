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
returns its own as a small JSON dict. Whether a stage is skipped is decided by one rule (``clara_flows.stagerun``): a
finished run of that stage with the same input key whose outputs still exist; its recorded result is returned
and the reason is logged. The shard tasks and the store are idempotent by themselves (finished shards and
published builds are found and reused), and an interrupted stage resumes from its own checkpoints. Two runs
with the same inputs at once: the second waits for the first at each stage (a lock on the shared Postgres) and
then reuses its result. Shards run on the flow's task runner: threads by default, a Dask cluster when
``dask_address`` or ``dask_workers`` is set.
"""

# No `from __future__ import annotations`: Prefect builds the parameter form (a pydantic model) from the
# evaluated annotations, and string annotations such as "Literal[...]" fail to resolve there.
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
from clara_flows import PROJECT, params, profiles, tracking
from clara_flows.stagerun import PipelineRun, StageRun, exclusive, reuse, stage_key


# ------------------------------------------------------------------------------------------- plumbing

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


_RETRIED = dict(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient)


def _stage(name: str, ctx: dict[str, Any], params: dict[str, Any], key: str, data: dict[str, Any] | None = None,
           reads: tuple[tuple[str, str], ...] = ()) -> StageRun:
    """The nested run of stage ``name``, with the DVC-versioned files it reads (``(data key, context)`` pairs of
    the synthesize stage's reference) as its dataset inputs."""
    datasets = [] if data is None else _datasets(data, reads)
    return StageRun(name, ctx["parent_run"], ctx["experiment"], params, key, datasets, str(flow_run.id))


def _datasets(data: dict[str, Any], reads: tuple[tuple[str, str], ...]) -> list[tuple[Any, str]]:
    return [(tracking.dvc_dataset(_data_file(data, k), data["data_version"], data.get("project_dir")), context)
            for k, context in reads if _data_file(data, k)]


def _checkpoint_missing(result: dict[str, Any]) -> str | None:
    """The cache rule's check for a training stage: its checkpoint is on disk or in MLflow."""
    if (Path(result["checkpoint"]) / "clara.json").is_file():
        return None
    uri = result["model_uri"]
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return None if tracking.client().list_artifacts(run_id, path) else f"its checkpoint {uri} is gone"
    name, _, version = uri.removeprefix("models:/").partition("/")
    return _version_missing({"name": name, "version": version})


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
               project_dir: str, dvc_push: bool, parent_run: str, experiment: str, refresh: bool = False,
               seed: int = 0) -> dict[str, Any]:
    """Corpus -> data/corpus/<name>.jsonl; teacher -> data/synth/<name>/ (train/dev); then a DVC snapshot.

    The work always runs (finished shards are found, not redone; the data version is known only after the
    snapshot); the run that records it is skipped when one with the same inputs and data version exists."""
    log = get_run_logger()
    name = corpus_name(corpus)
    prepared = ingest_corpus(corpus, preset, project_dir)
    corpus_file = prepared["path"]
    n = min(prepared["documents"], max_docs) if max_docs else prepared["documents"]
    cfg = {"seed": seed}
    from clara.data.teachers import teacher_version

    # the teacher's version too: changed teacher code must make new shards, not resume the old ones
    work_key = stage_key("synthesize", {"source": prepared["key"], "n": n, "teacher": teacher, "cfg": cfg,
                                        "teacher_version": teacher_version(**teacher)})
    ranges = stages.shard_ranges(n, shards)
    work = _work_dir("synth", work_key)
    shard_dirs = [str(work / f"shard-{i:04d}") for i in range(len(ranges))]
    futures = [synthesize_shard.submit(corpus_file, s, e, d, teacher, cfg) for (s, e), d in zip(ranges, shard_dirs)]
    shard_reports = [f.result() for f in futures]
    out = Path(project_dir) / "data" / "synth" / name
    report = stages.merge_synthesis(shard_dirs, out, cfg, corpus_report=prepared["report"])
    mixes = stages.training_mixes(corpus_file, out / "mix", out, max_docs=n, seed=seed)
    version = dvc_snapshot(project_dir, dvc_push)
    log.info("synthesized %d documents in %d shard(s); data version %s", n, len(ranges), version)
    data = {"data_version": version, "corpus_file": corpus_file, "max_docs": n, "synth_dir": str(out),
            "scp_file": mixes["scp"], "instruct_file": mixes["instruct"],
            "corpus_version": version if n == prepared["documents"] else f"{version}/first-{n}",
            "project_dir": project_dir}
    ctx = {"parent_run": parent_run, "experiment": experiment}
    # The pipeline's own run lists the data it trains and is judged on too: its row in the runs table (where the
    # stage runs are folded away) then names the data version instead of "-".
    tracking.log_datasets(tracking.client(), parent_run, _datasets(data, (
        ("corpus_file", "corpus"), ("scp_file", "training"), ("instruct_file", "training"), ("train", "training"),
        ("dev", "evaluation"))))
    key = stage_key("synthesize", {"work": work_key, **data})
    with exclusive("synthesize", key):  # a second run with these inputs waits, then reuses
        found = reuse(experiment, "synthesize", key, lambda r: None, refresh)  # the files were just written
        if found:
            return found
        with _stage("synthesize", ctx, {"corpus": corpus, "max_docs": max_docs, "shards": len(ranges),
                                        "teacher": teacher, "data_version": version}, key,
                    data, reads=(("corpus_file", "source corpus"),)) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": version})
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
            return st.finish(data)


# ------------------------------------------------------------------------------------------- training

@task(name="pretrain_scp", **_RETRIED)
def pretrain_scp(data: dict[str, Any], preset: str, compression_rate: int, memory_readout: str, steps: int,
                 batch_size: int, lr: float, target_dropout: float, init_from: Optional[str], device: Optional[str],
                 processes: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 (SCP): compressor + generator on every passage's reconstruction and the synthesized QA;
    registers the compressor as ``clara-compressor``."""
    inputs = dict(data=data, preset=preset, compression_rate=compression_rate, memory_readout=memory_readout,
                  steps=steps, batch_size=batch_size, lr=lr, init_from=init_from, device=device, processes=processes)
    if target_dropout:  # only when set, so the paper recipe's stage keys stay what they were
        inputs["target_dropout"] = target_dropout
    from clara.config import ModelConfig, OptimSettings, SCPConfig, TrainConfig, from_dict, preset as make_preset
    from clara.model.checkpoint import read_checkpoint_config, resolve_checkpoint

    start = None
    if init_from:  # a starting point of another base or rate is refused before anything else
        start = read_checkpoint_config(init_from)["model"]
        if start["base"] != preset and start["base"] != make_preset(preset).base:
            raise ValueError(f"init_from {init_from} is a {start['base']!r} checkpoint, not {preset!r}: pass "
                             f"init_from=none (and scp_steps) to train {preset!r} from scratch")
        if start["compression_rate"] != compression_rate:
            raise ValueError(f"init_from {init_from} was trained at rate {start['compression_rate']}, "
                             f"not {compression_rate}")
        start_readout = start.get("memory_readout", ModelConfig.memory_readout)  # older checkpoints: the default
        if start_readout != memory_readout:
            raise ValueError(f"init_from {init_from} reads its memory as {start_readout!r}, not {memory_readout!r}: "
                             f"set model.memory_readout to match")
    key = stage_key("pretrain_scp", inputs)
    with exclusive("pretrain_scp", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "pretrain_scp", key, _checkpoint_missing, ctx["refresh"])
        if found:
            return found
        from clara.config import to_dict
        from clara.data.records import load_scp_records
        from clara.model import ClaraModel
        from clara.model.checkpoint import load_checkpoint
        from clara.training.scp import train_scp
        from clara_flows.registry import log_pyfunc, register_once

        device_over = {"device": device} if device else {}
        # The starting point's own config (read, not loaded: used as it is, it is never loaded here at all).
        model_cfg = from_dict(ModelConfig, {**start, **device_over}) if start is not None else \
            make_preset(preset, compression_rate=compression_rate, memory_readout=memory_readout, **device_over)
        cfg = SCPConfig(model=model_cfg, target_dropout=target_dropout,
                        train=TrainConfig(batch_size=batch_size, max_steps=steps, checkpoint_every=max(10, steps // 4),
                                          optim=OptimSettings(lr=lr)))
        with _stage("pretrain_scp", ctx, {"data_version": data["data_version"], "init_from": init_from, **to_dict(cfg)},
                    key, data, reads=(("scp_file", "training"),)) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"]})
            work, train_file = _work_dir("scp", key), Path(data["scp_file"])
            if init_from and steps == 0:  # a trained starting point, used as it is
                final = resolve_checkpoint(init_from)
            elif processes > 1 and not init_from:
                work.mkdir(parents=True, exist_ok=True)
                # the whole model config, so the processes build exactly the model this stage describes
                (work / "train.json").write_text(json.dumps({"model": to_dict(cfg.model),
                                                             "train": to_dict(cfg.train),
                                                             "mse_weight": cfg.mse_weight,
                                                             "target_dropout": cfg.target_dropout}))
                args = ["train", "scp", "--data", str(train_file), "--out", str(work), "--preset", preset,
                        "--rate", str(compression_rate), "--config", str(work / "train.json"),
                        *(["--device", device] if device else [])]
                final = _torchrun(processes, args, work, st.c, st.run_id)
            else:
                model = load_checkpoint(init_from, device=device) if init_from else ClaraModel.build(cfg.model)
                live = _LiveMetrics(st.c, st.run_id)
                final = train_scp(model, load_scp_records(train_file), cfg, work, callback=live, progress=False)
                live.replay_if_silent(work)
            version, _ = register_once(
                st.c, "clara-compressor", key,
                lambda: log_pyfunc(st.run_id, "compressor", final, {}, input_column="text"),
                {"data_version": data["data_version"], "compression_rate": compression_rate, "preset": preset},
                description="CLaRa compressor (SCP): documents -> memory tokens")
            return st.finish({"checkpoint": str(final), "model_uri": f"models:/clara-compressor/{version}",
                              "version": version})


@task(name="instruct", **_RETRIED)
def instruct(scp: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int, lr: float,
             device: Optional[str], ctx: dict[str, Any], freeze_compressor: bool = True) -> dict[str, Any]:
    """Stage 2: each synthesized question over its gold passage and k-1 hard negatives, compressed; the
    generator continues from SCP (and the compressor too unless ``freeze_compressor``). No steps (or no
    questions): SCP's checkpoint passes through."""
    if steps <= 0 or not data.get("instruct_file"):
        return {**scp, "skipped": True, "reused": False}
    inputs = dict(scp=scp, data=data, steps=steps, batch_size=batch_size, lr=lr, device=device,
                  freeze_compressor=freeze_compressor)
    key = stage_key("instruct", inputs)
    with exclusive("instruct", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "instruct", key, _checkpoint_missing, ctx["refresh"])
        if found:
            return found
        from clara.config import OptimSettings, SCPConfig, TrainConfig, to_dict
        from clara.data.records import load_scp_records
        from clara.model.checkpoint import load_checkpoint
        from clara.training.scp import train_scp

        model = load_checkpoint(_checkpoint(scp), device=device)
        cfg = SCPConfig(model=model.cfg, train=TrainConfig(batch_size=batch_size, max_steps=steps,
                                                           checkpoint_every=max(10, steps // 4),
                                                           optim=OptimSettings(lr=lr)),
                        freeze_compressor=freeze_compressor)
        with _stage("instruct", ctx, {"data_version": data["data_version"], "init": scp["model_uri"], **to_dict(cfg)},
                    key, data, reads=(("instruct_file", "training"),)) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"], "init": scp["model_uri"]})
            work, live = _work_dir("instruct", key), _LiveMetrics(st.c, st.run_id)
            final = train_scp(model, load_scp_records(data["instruct_file"]), cfg, work, stage="instruct",
                              callback=live, progress=False)
            live.replay_if_silent(work)
            st.c.log_artifacts(st.run_id, str(final), "checkpoint")  # safetensors + JSON, no pickles
            return st.finish({"checkpoint": str(final), "model_uri": f"runs:/{st.run_id}/checkpoint"})


@task(name="train_e2e", **_RETRIED)
def train_e2e(init: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int, lr: float, top_k: int,
              n_candidates: int, device: Optional[str], processes: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Stage 3: query reasoner + generator end to end through the differentiable top-k."""
    inputs = dict(init=init, data=data, steps=steps, batch_size=batch_size, lr=lr, top_k=top_k,
                  n_candidates=n_candidates, device=device, processes=processes)
    key = stage_key("train_e2e", inputs)
    with exclusive("train_e2e", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "train_e2e", key, _checkpoint_missing, ctx["refresh"])
        if found:
            return found
        from clara.config import E2EConfig, OptimSettings, TrainConfig, to_dict
        from clara.eval.datasets import synth_qa
        from clara.model.checkpoint import load_checkpoint, read_checkpoint_config
        from clara.training.e2e import train_e2e as train

        cfg = E2EConfig(train=TrainConfig(batch_size=batch_size, max_steps=steps, checkpoint_every=max(10, steps // 4),
                                          optim=OptimSettings(lr=lr)), n_candidates=n_candidates, top_k=top_k)
        with _stage("train_e2e", ctx, {"data_version": data["data_version"], "init": init["model_uri"], **to_dict(cfg)},
                    key, data, reads=(("train", "training"), ("corpus_file", "retrieval corpus"))) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"], "init": init["model_uri"]})
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
                                              str(work / "corpus.jsonl"), "--init", str(_checkpoint(init)), "--out",
                                              str(work), "--config", str(work / "e2e.json"),
                                              *(["--device", device] if device else [])], work, st.c, st.run_id)
            else:
                model, live = load_checkpoint(_checkpoint(init), device=device), _LiveMetrics(st.c, st.run_id)
                final = train(model, qa, {d.id: d.full_text for d in docs}, cfg, work, callback=live, progress=False)
                live.replay_if_silent(work)
            st.c.log_artifacts(st.run_id, str(final), "checkpoint")  # safetensors + JSON, no pickles
            return st.finish({"checkpoint": str(final), "model_uri": f"runs:/{st.run_id}/checkpoint",
                              "rate": read_checkpoint_config(final)["model"]["compression_rate"]})


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
    from clara.config import ModelConfig, from_dict
    from clara.model.checkpoint import read_checkpoint_config
    from clara.dense import DenseEncoder
    from clara.store.db import connect
    from clara.store.loading import load_build as load, shard_files as shards

    mcfg = from_dict(ModelConfig, read_checkpoint_config(checkpoint)["model"])
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


def _build_missing(result: dict[str, Any]) -> str | None:
    """The cache rule's check for compress_corpus: its build is still published in the store."""
    from clara.store.builds import StoreError, ready_build
    from clara.store.db import connect

    engine = connect()
    try:
        ready_build(engine, result["build_id"])
        return None
    except StoreError as exc:
        return f"its build is not available ({exc})"
    finally:
        engine.dispose()


@flow(name="compress_corpus", task_runner=ThreadPoolTaskRunner(max_workers=1))
def compress_corpus(e2e: dict[str, Any], data: dict[str, Any], shards: int, batch_size: int,
                    device: Optional[str], parent_run: str, experiment: str, refresh: bool = False) -> dict[str, Any]:
    """The corpus through the trained compressor into a published pgvector build."""
    import time

    key = stage_key("compress_corpus", {"model": e2e["model_uri"], "rate": e2e["rate"],
                                        "corpus": data["corpus_version"], "shards": shards})
    with exclusive("compress_corpus", key):  # a second run with these inputs waits, then reuses
        found = reuse(experiment, "compress_corpus", key, _build_missing, refresh)
        if found:
            return found
        ctx = {"parent_run": parent_run, "experiment": experiment}
        store = find_build(e2e["model_uri"], e2e["rate"], data["corpus_version"])
        ranges = stages.shard_ranges(data["max_docs"], shards)
        params = {"model_uri": e2e["model_uri"], "corpus_version": data["corpus_version"], "shards": len(ranges)}
        with _stage("compress_corpus", ctx, params, key, data, reads=(("corpus_file", "corpus"),)) as st:
            started, new = time.perf_counter(), 0
            if store["build_id"] is not None:  # the store's own finished work (e.g. its run was deleted): recorded
                get_run_logger().info("build %s already holds this model's compression of %s: not rebuilt",
                                      store["build_id"], data["corpus_version"])
                built = {k: store[k] for k in ("build_id", "n_docs", "ann", "dense_model")}
            else:
                checkpoint = str(_checkpoint(e2e))
                work = _work_dir("compress", key)
                futures = [compress_shard.submit(checkpoint, data["corpus_file"], s, e,
                                                 str(work / f"shard-{i:04d}.safetensors"), store["loaded"], batch_size,
                                                 device) for i, (s, e) in enumerate(ranges)]
                parts = [f.result() for f in futures]
                new = sum(p["documents"] for p in parts if not p["reused"])
                built = load_build([p["file"] for p in parts], data, checkpoint, e2e["model_uri"])
                shutil.rmtree(work, ignore_errors=True)  # the memories now live in the store
            seconds = time.perf_counter() - started
            tracking.set_tags(st.c, st.run_id, {"build_id": built["build_id"], "data_version": data["data_version"]})
            tracking.log_metrics(st.c, st.run_id, {"documents": built["n_docs"], "compress_seconds": seconds,
                                                   "docs_per_s": new / seconds if new else 0.0})
            return st.finish(built)


# ------------------------------------------------------------------------------------ evaluate, promote

def _evaluation_missing(result: dict[str, Any]) -> str | None:
    """The cache rule's check for evaluate: the per-question predictions the gate pairs are still logged."""
    names = {a.path for a in tracking.client().list_artifacts(result["run_id"], "evaluation")}
    return None if "evaluation/predictions.jsonl" in names else "its predictions are gone"


@task(name="evaluate", **_RETRIED)
def evaluate(e2e: dict[str, Any], build: dict[str, Any], data: dict[str, Any], questions: int, top_k: int,
             baselines: str, retrieval: dict[str, Any], device: Optional[str], ctx: dict[str, Any]
             ) -> dict[str, Any]:
    """CLaRa (from the store) beside the raw-text baselines and closed book on the synthesized dev split."""
    inputs = dict(e2e=e2e, build=build, data=data, questions=questions, top_k=top_k, baselines=baselines,
                  retrieval=retrieval, device=device)
    key = stage_key("evaluate", inputs)
    with exclusive("evaluate", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "evaluate", key, _evaluation_missing, ctx["refresh"])
        if found:
            return found
        from clara.eval.datasets import subsample, synth_qa
        from clara.eval.run import EvalConfig, evaluate as run_eval
        from clara.model.checkpoint import load_checkpoint
        from clara.store.builds import ready_build
        from clara.store.db import connect

        out = _work_dir("eval", key)
        cfg = EvalConfig(k=top_k, baselines=tuple(b for b in baselines.split(",") if b), settings=("normal",),
                         mode=retrieval["mode"], fuse=retrieval["fuse"], n_candidates=retrieval["candidates"],
                         retrieval_modes=())
        with _stage("evaluate", ctx, {"model_uri": e2e["model_uri"], "build_id": build["build_id"],
                                      "questions": questions, "k": top_k, "baselines": baselines,
                                      "data_version": data["data_version"],
                                      **{f"retrieval.{k}": v for k, v in retrieval.items()}},
                    key, data, reads=(("dev", "evaluation"), ("corpus_file", "retrieval corpus"))) as st:
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
            return st.finish({"metrics": metrics, "table": table, "questions": len(qa)})


def _version_missing(result: dict[str, Any]) -> str | None:
    """The cache rule's check for promote: the registered version still exists."""
    try:
        tracking.client().get_model_version(result["name"], result["version"])
        return None
    except Exception:  # MlflowException: deleted
        return f"model version {result['name']} v{result['version']} is gone"


@task(name="promote", **_RETRIED)
def promote(e2e: dict[str, Any], build: dict[str, Any], scores: dict[str, Any], data: dict[str, Any],
            scp: dict[str, Any], model_name: str, gate_metric: str, gate_rule: dict[str, float], top_k: int,
            retrieval: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Register the model (once per set of inputs: a rerun finds its version) and run the gate (every time, so
    the decision reflects the production version as it is now)."""
    from clara.eval.gate import GateRule
    from clara_flows.registry import PER_QUESTION_METRICS, gate, log_pyfunc, register_once

    if gate_metric not in PER_QUESTION_METRICS:
        raise ValueError(f"gate metric {gate_metric!r} cannot be compared question by question; "
                         f"choose one of {', '.join(PER_QUESTION_METRICS)}")
    inputs = dict(e2e=e2e, build=build, scores=scores, data=data, scp=scp, model_name=model_name, top_k=top_k,
                  retrieval=retrieval)
    key = stage_key("promote", inputs)
    with exclusive("promote", key):  # a second run with these inputs waits, then reuses
        registered = reuse(ctx["experiment"], "promote", key, _version_missing, ctx["refresh"])
        if registered is None:
            with _stage("promote", ctx, {"model_name": model_name, "model_uri": e2e["model_uri"],
                                         "build_id": build["build_id"]}, key) as st:
                c = st.c
                # A killed run may have registered and died before finishing its run: that version is found, not
                # registered twice.
                version, _ = register_once(c, model_name, key, lambda: log_pyfunc(
                    e2e["run_id"], "qa", _checkpoint(e2e), {"build_id": build["build_id"], "k": top_k, **retrieval},
                    input_column="question"), {
                    **{f"eval.{k}": round(v, 6) for k, v in scores["metrics"].items()}, "eval.run_id": scores["run_id"],
                    "data_version": data["data_version"], "build_id": build["build_id"], "compressor": scp["model_uri"],
                    **{f"retrieval.{k}": v for k, v in retrieval.items()},
                    "git_commit": tracking.git_commit(PROJECT), "prefect.flow_run_id": str(flow_run.id)},
                    description="CLaRa end to end: questions -> answers from the compressed corpus in pgvector")
                tracking.set_tags(c, st.run_id, {"model_version": version})
                registered = st.finish({"name": model_name, "version": version,
                                        "model_uri": f"models:/{model_name}/{version}"})
        decision = gate(tracking.client(), model_name, registered["version"], gate_metric, rule=GateRule(**gate_rule))
        return {**registered, "alias": decision.alias, "reason": decision.reason}


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
    for stage in ("synthesize", "pretrain_scp", "instruct", "train_e2e", "compress_corpus", "evaluate", "promote"):
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
    dropout = p.get("scp_target_dropout")
    if dropout is not None and not 0 <= dropout < 1:
        problems.append(f"scp_target_dropout={dropout} (in [0, 1))")
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


@flow(name="clara", log_prints=True)
def clara(
    profile: Literal["demo", "quality", "gpu"] = "demo",
    data: params.Data = params.Data(),
    model: params.Model = params.Model(),
    training: params.Training = params.Training(),
    evaluation: params.Evaluation = params.Evaluation(),
    gate: params.Gate = params.Gate(),
    execution: params.Execution = params.Execution(),
) -> dict[str, Any]:
    """Synthesize -> SCP -> instruct -> E2E -> compress the corpus into pgvector -> evaluate -> promote.

    ``profile`` sets the budgets (``clara_flows.profiles``: ``demo`` runs on a CPU laptop in minutes, ``quality`` for
    hours on a CPU, ``gpu`` on one GPU); a budget given explicitly wins (``data.max_docs=0``: the whole corpus).
    ``model.init_from``: a checkpoint folder to continue SCP from (``training.scp_steps=0`` uses it as it is;
    relative to the project folder; ``none`` turns the profile's off). The groups are ``clara_flows.params``.
    """
    p = {"profile": profile, **params.flat({"data": data, "model": model, "training": training,
                                             "evaluation": evaluation, "gate": gate, "execution": execution})}
    ex, ev, t = execution, evaluation, training
    project = str(Path(ex.project_dir).resolve()) if ex.project_dir else str(PROJECT)
    run = PipelineRun.start(ex.experiment, str(flow_run.id), str(flow_run.name), tracking.git_commit(project))
    try:
        b = _budget(p, project)  # bad parameters fail here, before any stage, with the reason on the run
        tracking.log_params(tracking.client(), run.run_id, {**p, **b})
        ctx = {"parent_run": run.run_id, "experiment": ex.experiment, "refresh": ex.refresh_cache}
        runner = task_runner(ex.dask_address, ex.dask_workers)
        retrieval = {"mode": ev.retrieval_mode, "fuse": ev.retrieval_fuse, "candidates": ev.n_candidates}

        synthesized = run.record("synthesize", synthesize.with_options(task_runner=runner)(
            corpus=data.corpus, max_docs=b["max_docs"] or None, preset=model.preset, shards=data.shards,
            project_dir=project, teacher={"kind": data.teacher, "model": data.teacher_model,
                                          "base_url": data.teacher_base_url},
            dvc_push=data.dvc_push, parent_run=run.run_id, experiment=ex.experiment, refresh=ex.refresh_cache))
        scp = run.record("pretrain_scp", pretrain_scp(
            data=synthesized, preset=model.preset, compression_rate=model.compression_rate,
            memory_readout=model.memory_readout, steps=b["scp_steps"],
            batch_size=b["scp_batch_size"], lr=t.scp_lr, target_dropout=b["scp_target_dropout"],
            init_from=b["init_from"], device=model.device,
            processes=t.train_processes, ctx=ctx))
        inst = run.record("instruct", instruct(
            scp=scp, data=synthesized, steps=b["instruct_steps"], batch_size=b["instruct_batch_size"],
            lr=t.instruct_lr, device=model.device, ctx=ctx, freeze_compressor=t.instruct_freeze_compressor))
        e2e = run.record("train_e2e", train_e2e(
            init=inst, data=synthesized, steps=b["e2e_steps"], batch_size=b["e2e_batch_size"], lr=t.e2e_lr,
            top_k=ev.top_k, n_candidates=ev.n_candidates, device=model.device, processes=t.train_processes,
            ctx=ctx))
        build = run.record("compress_corpus", compress_corpus.with_options(task_runner=runner)(
            e2e=e2e, data=synthesized, shards=data.shards, batch_size=16, device=model.device,
            parent_run=run.run_id, experiment=ex.experiment, refresh=ex.refresh_cache))
        scores = run.record("evaluate", evaluate(
            e2e=e2e, build=build, data=synthesized, questions=b["eval_questions"], top_k=ev.top_k,
            baselines=ev.baselines, retrieval=retrieval, device=model.device, ctx=ctx))
        run.record("promote", promote(
            e2e=e2e, build=build, scores=scores, data=synthesized, scp=scp, model_name=gate.model_name,
            gate_metric=gate.gate_metric, gate_rule={"margin": gate.gate_margin,
                                                     "max_latency_regression": gate.gate_max_latency_regression},
            top_k=ev.top_k, retrieval=retrieval, ctx=ctx))

        return _report(run)
    except BaseException as exc:
        run.fail(exc)
        raise


def _budget(p: dict[str, Any], project: str) -> dict[str, Any]:
    """The profile's budgets with the explicit parameters on top, checked; ``init_from`` made absolute."""
    budget = profiles.resolve(p["profile"], {k: p[k] for k in profiles.PROFILES["demo"]})
    check_parameters({**p, **budget})
    init = budget["init_from"]
    if init and not Path(init).is_absolute():
        budget["init_from"] = str(Path(project) / init)
    return budget


def _report(run: PipelineRun) -> dict[str, Any]:
    """Finish the parent run (tags, metrics, summary) and return what every stage returned."""
    s = run.stages
    result = {"flow_run": run.flow_run_name, "parent_run": run.run_id, "data": s["synthesize"],
              "scp": s["pretrain_scp"], "e2e": s["train_e2e"], "build": s["compress_corpus"],
              "evaluation": s["evaluate"], "promotion": s["promote"], "cached": run.cached,
              "runs": {k: None if r.get("skipped") else r.get("run_id") for k, r in s.items()}}
    summary = _summary(result, run.exp_id)
    p = result["promotion"]
    run.finish({"data_version": result["data"]["data_version"], "corpus_version": result["data"]["corpus_version"],
                "build_id": result["build"]["build_id"], "model_version": p["version"], "alias": p["alias"],
                "gate_reason": p["reason"]},
               {f"eval.{k}": v for k, v in result["evaluation"]["metrics"].items()}, summary)
    create_markdown_artifact(summary, key="clara-evaluation",
                             description="CLaRa evaluation and model promotion for this pipeline run")
    print(summary)
    return result
