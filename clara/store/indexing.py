"""The offline compression job: compress a corpus with a checkpoint's compressor into a new index build."""

from __future__ import annotations

import hashlib
import time
from typing import Sequence

from sqlalchemy import Engine
from tqdm.auto import tqdm

from clara.data.corpus import Document, dumps
from clara.model.clara_model import ClaraModel
from clara.store.builds import Build, BuildWriter, StoreError, ready_build


def corpus_version_of(docs: Sequence[Document]) -> str:
    """A content hash of the corpus (used when no DVC data version is given)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(dumps(d.row()).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()[:16]


def index_corpus(engine: Engine, model: ClaraModel, docs: Sequence[Document], *, model_uri: str,
                 corpus_version: str, dense=None, reuse: bool = False, batch_size: int = 64,
                 compress_batch_size: int = 16, progress: bool = True) -> Build:
    """Compress ``docs`` and load them into the build for (model_uri, rate, corpus_version); publish it.

    Args:
        dense: a ``clara.dense.DenseEncoder`` whose vectors go in with each batch (the dense and hybrid first
            stages); None builds without them.
        reuse: return the newest ready build of this key (with the same dense model) instead of building again.

    Resumable: documents a killed run already committed are skipped. Returns the published build.
    """
    if reuse:
        try:
            found = ready_build(engine, model_uri=model_uri, compression_rate=model.cfg.compression_rate,
                                corpus_version=corpus_version)
            if found.dense_model == (dense.name if dense is not None else None):
                return found
        except StoreError:
            pass
    opts = {"dense_model": dense.name, "dense_dim": dense.dim} if dense is not None else {}
    with BuildWriter.open(engine, model_uri, model.cfg.compression_rate, corpus_version,
                          hidden_size=model.hidden_size, n_mem_max=model.cfg.n_mem_max, **opts) as writer:
        writer.add_documents(corpus_version, ((d.id, d.title, d.text) for d in docs))
        todo = [d for d in docs if d.id not in writer.loaded]
        bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc=f"compress → build {writer.build.id}",
                   unit="doc", disable=not progress, dynamic_ncols=True, mininterval=1.0)
        start = time.perf_counter()
        for s in range(0, len(todo), batch_size):
            batch = todo[s : s + batch_size]
            texts = [d.full_text for d in batch]
            mems = model.compress(texts, batch_size=compress_batch_size)
            writer.add([d.id for d in batch], [m.float().cpu().numpy() for m in mems],
                       dense=dense.embed(texts) if dense is not None else None)
            bar.update(len(batch))
            bar.set_postfix(docs_s=f"{(s + len(batch)) / (time.perf_counter() - start):.1f}")
        bar.close()
        return writer.publish()
