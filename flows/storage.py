"""The compress_corpus subflow: the corpus through the trained compressor (shards mapped on the task runner) into a
published pgvector build, or the build a previous run already published."""

# No `from __future__ import annotations`: Prefect builds a flow's and a task's parameter model (pydantic) from the
# evaluated annotations, and string annotations such as "Literal[...]" fail to resolve there.
import shutil
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from clara import stages
from clara.data.corpus import read_corpus
from clara_flows import tracking
from clara_flows.plumbing import checkpoint_dir, stage_run, transient, work_dir
from clara_flows.stagerun import exclusive, reuse, stage_key


@task(name="find-build", retries=3, retry_delay_seconds=5, retry_condition_fn=transient)
def find_build_task(model_uri: str, rate: int, corpus_version: str) -> dict[str, Any]:
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


@task(name="compress-shard", retries=1, retry_condition_fn=transient)
def compress_shard_task(checkpoint: str, corpus_file: str, start: int, end: int, out_file: str, skip_ids: list[str],
                        batch_size: int, device: Optional[str]) -> dict[str, Any]:
    from clara.store.loading import compress_shard

    return compress_shard(checkpoint, read_corpus(corpus_file)[start:end], out_file, skip_ids, batch_size, device)


@task(name="load-build", retries=2, retry_delay_seconds=10, retry_condition_fn=transient)
def load_build_task(files: list[str], data: dict[str, Any], checkpoint: str, model_uri: str) -> dict[str, Any]:
    from clara.config import ModelConfig, from_dict
    from clara.model.checkpoint import read_checkpoint_config
    from clara.retrieval.dense import DenseEncoder
    from clara.store.db import connect
    from clara.store.loading import load_build, shard_files

    mcfg = from_dict(ModelConfig, read_checkpoint_config(checkpoint)["model"])
    hidden = _hidden_size(checkpoint)
    engine = connect()
    try:
        # Every build carries the dense vectors and BM25 statistics the first-stage modes need.
        b = load_build(engine, read_corpus(data["corpus_file"], data["max_docs"]), shard_files(files),
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
def compression_flow(e2e: dict[str, Any], data: dict[str, Any], shards: int, batch_size: int,
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
        store = find_build_task(e2e["model_uri"], e2e["rate"], data["corpus_version"])
        ranges = stages.shard_ranges(data["max_docs"], shards)
        params = {"model_uri": e2e["model_uri"], "corpus_version": data["corpus_version"], "shards": len(ranges)}
        with stage_run("compress_corpus", ctx, params, key, data, reads=(("corpus_file", "corpus"),)) as st:
            started, new = time.perf_counter(), 0
            if store["build_id"] is not None:  # the store's own finished work (e.g. its run was deleted): recorded
                get_run_logger().info("build %s already holds this model's compression of %s: not rebuilt",
                                      store["build_id"], data["corpus_version"])
                built = {k: store[k] for k in ("build_id", "n_docs", "ann", "dense_model")}
            else:
                checkpoint = str(checkpoint_dir(e2e))
                work = work_dir("compress", key)
                futures = [compress_shard_task.submit(checkpoint, data["corpus_file"], s, e,
                                                 str(work / f"shard-{i:04d}.safetensors"), store["loaded"], batch_size,
                                                 device) for i, (s, e) in enumerate(ranges)]
                parts = [f.result() for f in futures]
                new = sum(p["documents"] for p in parts if not p["reused"])
                built = load_build_task([p["file"] for p in parts], data, checkpoint, e2e["model_uri"])
                shutil.rmtree(work, ignore_errors=True)  # the memories now live in the store
            seconds = time.perf_counter() - started
            tracking.set_tags(st.c, st.run_id, {"build_id": built["build_id"], "data_version": data["data_version"]})
            tracking.log_metrics(st.c, st.run_id, {"documents": built["n_docs"], "compress_seconds": seconds,
                                                   "docs_per_s": new / seconds if new else 0.0})
            return st.finish(built)
