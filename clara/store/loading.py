"""The one way documents get into a build: memories come in batches of ``(ids, [n_i, H] arrays)`` from a
source — compression shard files written by the pipeline's parallel tasks, or a model compressing in this
process (``clara index``, benchmarks) — and ``load_build`` writes them with the documents and dense vectors,
then publishes the build.

Both sources resume: the loader passes the set of documents an unfinished build already holds, and a source
skips them (a compression shard file that exists is complete, and is read, not recomputed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import Engine

from clara.atomic import publish
from clara.data.corpus import Document
from clara.store.builds import Build, BuildWriter, StoreError, ready_build
from clara.store.db import reachable

Batches = Iterable[tuple[list[str], list[np.ndarray]]]
Source = Callable[[set[str]], Batches]
"""Given the ids a resumed build already holds, yield the memories of the rest in batches."""


def load_build(engine: Engine, docs: Sequence[Document], source: Source, *, model_uri: str, corpus_version: str,
               compression_rate: int, hidden_size: int, n_mem_max: int, dense=None, batch_size: int = 256) -> Build:
    """Load ``docs`` and their memories from ``source`` into the build for (model_uri, rate, corpus_version)
    and publish it.

    Args:
        dense: a ``clara.retrieval.dense.DenseEncoder``; each batch is embedded as it is loaded (the dense and hybrid first
            stages). None builds without dense vectors.
    Raises:
        ValueError: a document got no memory from the source (nothing is published).
        StoreUnavailable: the database stopped answering; what was loaded stays, and a rerun continues it.
    """
    opts = {"dense_model": dense.name, "dense_dim": dense.dim} if dense is not None else {}
    text_of = {d.id: d.full_text for d in docs}
    with reachable(engine), BuildWriter.open(engine, model_uri, compression_rate, corpus_version,
                                             hidden_size=hidden_size, n_mem_max=n_mem_max, **opts) as writer:
        writer.add_documents(corpus_version, ((d.id, d.title, d.text) for d in docs))
        for ids, mems in source(set(writer.loaded)):
            todo = [(i, m) for i, m in zip(ids, mems, strict=True) if i not in writer.loaded]
            for s in range(0, len(todo), batch_size):
                names = [i for i, _ in todo[s : s + batch_size]]
                vectors = dense.embed([text_of[i] for i in names]) if dense is not None else None
                writer.add(names, [m for _, m in todo[s : s + batch_size]], dense=vectors)
        missing = [d.id for d in docs if d.id not in writer.loaded]
        if missing:
            raise ValueError(f"{len(missing)} documents have no memory in the source, e.g. {missing[:3]}")
        return writer.publish()


# --------------------------------------------------------------------------------------------- sources

def compressing(model, docs: Sequence[Document], *, batch_size: int = 64, compress_batch_size: int = 16,
                progress: bool = True) -> Source:
    """A source that compresses the documents still missing with ``model`` (a ``ClaraModel``), in this process."""
    from tqdm.auto import tqdm

    def batches(loaded: set[str]) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        todo = [d for d in docs if d.id not in loaded]
        bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc="compress", unit="doc",
                   disable=not progress, dynamic_ncols=True, mininterval=1.0)
        start = time.perf_counter()
        for s in range(0, len(todo), batch_size):
            batch = todo[s : s + batch_size]
            mems = model.compress([d.full_text for d in batch], batch_size=compress_batch_size)
            yield [d.id for d in batch], [m.float().cpu().numpy() for m in mems]
            bar.update(len(batch))
            bar.set_postfix(docs_s=f"{(s + len(batch)) / (time.perf_counter() - start):.1f}")
        bar.close()

    return batches


def shard_files(paths: Sequence[str | Path]) -> Source:
    """A source that reads compression shard files (``compress_shard``), one batch per file."""
    def batches(loaded: set[str]) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        for p in paths:
            yield read_memory_shard(p)

    return batches


def index_corpus(engine: Engine, model, docs: Sequence[Document], *, model_uri: str, corpus_version: str,
                 dense=None, reuse: bool = False, batch_size: int = 64, compress_batch_size: int = 16,
                 progress: bool = True) -> Build:
    """Compress ``docs`` with ``model`` and load them into a published build (``load_build`` with the
    in-process source).

    Args:
        reuse: return the newest ready build of this key (with the same dense model) instead of building again.
    """
    if reuse:
        try:
            found = ready_build(engine, model_uri=model_uri, compression_rate=model.cfg.compression_rate,
                                corpus_version=corpus_version)
            if found.dense_model == (dense.name if dense is not None else None):
                return found
        except StoreError:
            pass
    source = compressing(model, docs, batch_size=batch_size, compress_batch_size=compress_batch_size,
                         progress=progress)
    return load_build(engine, docs, source, model_uri=model_uri, corpus_version=corpus_version,
                      compression_rate=model.cfg.compression_rate, hidden_size=model.hidden_size,
                      n_mem_max=model.cfg.n_mem_max, dense=dense, batch_size=batch_size)


# ------------------------------------------------------------------------------------ compression shards

def compress_shard(checkpoint: str | Path, docs: Sequence[Document], out_file: str | Path,
                   skip_ids: Sequence[str] = (), batch_size: int = 16, device: str | None = None) -> dict[str, Any]:
    """Compress ``docs`` (minus ``skip_ids``) into one safetensors file: fp16 memories, ids in its metadata.

    An existing file is kept (the shard is done): a re-run after a crash redoes only missing shards.
    """
    import torch
    from safetensors.torch import save_file

    from clara.model.checkpoint import load_checkpoint

    out_file = Path(out_file)
    if out_file.is_file():
        return {"file": str(out_file), "documents": len(memory_shard_ids(out_file)), "reused": True}
    skip = set(skip_ids)
    docs = [d for d in docs if d.id not in skip]
    tensors: dict[str, torch.Tensor] = {}
    if docs:
        model = load_checkpoint(checkpoint, device=device)
        mems = model.compress([d.full_text for d in docs], batch_size=batch_size)
        tensors = {f"m{i}": m.detach().to(torch.float16).cpu().contiguous() for i, m in enumerate(mems)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"ids": json.dumps([d.id for d in docs])})
    publish(tmp, out_file)  # a file that exists is complete
    return {"file": str(out_file), "documents": len(docs), "reused": False}


def memory_shard_ids(path: str | Path) -> list[str]:
    """The document ids of a compression shard, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return json.loads(f.metadata()["ids"])


def read_memory_shard(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        ids = json.loads(f.metadata()["ids"])
        return ids, [f.get_tensor(f"m{i}") for i in range(len(ids))]
