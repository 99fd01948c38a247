"""Index builds: bulk-load compressed documents with binary COPY, index after loading, publish atomically.

A build is keyed by (model URI, compression rate, corpus version). While it loads, its status is ``loading``
and readers keep using the previous ``ready`` build of the same key. Rows are committed batch by batch, so a
killed build keeps what it loaded and ``open_build`` resumes it (the primary key (build_id, doc_id) makes a
duplicate impossible). A session-level advisory lock per key stops two processes from loading the same build;
builds of different keys run side by side without touching each other's rows or indexes.

Only integers read back from our own tables (build id, dimensions) are ever formatted into SQL (index names and
the partial index's dimension); every value from the caller travels as a bound parameter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
from sqlalchemy import Engine, text

from clara.errors import ClaraError

HALFVEC_INDEX_LIMIT = 4000  # pgvector: HNSW over halfvec supports at most 4,000 dimensions


class StoreError(ClaraError):
    pass


class StoreUnavailable(StoreError):
    """The database did not answer (stopped, restarting, unreachable): the same call can succeed later."""


@dataclass(frozen=True)
class Build:
    id: int
    model_uri: str
    compression_rate: int
    corpus_version: str
    hidden_size: int
    n_mem_max: int
    ann_kind: str
    status: str
    n_docs: int
    dense_model: str | None = None
    """The sentence encoder whose vectors the build holds (``clara.retrieval.dense``); None: no dense first stage."""
    dense_dim: int | None = None

    @property
    def ann_expr(self) -> str:
        """The indexed expression (dimension from our own row, validated as int)."""
        d = int(self.hidden_size)
        return f"(ann::halfvec({d}))" if self.ann_kind == "halfvec" else f"(binary_quantize(ann)::bit({d}))"

    @property
    def index_name(self) -> str:
        return f"memories_ann_build_{int(self.id)}"

    @property
    def dense_index_name(self) -> str:
        return f"memories_dense_build_{int(self.id)}"

    @property
    def dense_expr(self) -> str:
        return f"(dense::vector({int(self.dense_dim or 0)}))"


_COLUMNS = ("id, model_uri, compression_rate, corpus_version, hidden_size, n_mem_max, ann_kind, status, n_docs, "
            "dense_model, dense_dim")
# BM25 parameters (the Lucene/bm25s defaults), recorded per corpus version in lexical_corpora.
BM25_K1, BM25_B = 1.2, 0.75


def _build(row) -> Build:
    return Build(*row)


def _lock_key(model_uri: str, rate: int, corpus_version: str) -> int:
    digest = hashlib.sha256(f"{model_uri}\x00{rate}\x00{corpus_version}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def get_build(engine: Engine, build_id: int) -> Build:
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT {_COLUMNS} FROM index_builds WHERE id = :id"), {"id": build_id}).first()
    if row is None:
        raise StoreError(f"index build {build_id} does not exist")
    return _build(row)


def ready_build(engine: Engine, build_id: int | None = None, *, model_uri: str | None = None,
                compression_rate: int | None = None, corpus_version: str | None = None) -> Build:
    """The build to read from: ``build_id`` (must be ready), else the newest ready build matching the filters."""
    if build_id is not None:
        build = get_build(engine, build_id)
        if build.status != "ready":
            raise StoreError(f"index build {build_id} is not ready (status: {build.status})")
        return build
    with engine.connect() as conn:
        row = conn.execute(text(
            f"SELECT {_COLUMNS} FROM index_builds WHERE status = 'ready'"
            " AND (CAST(:m AS text) IS NULL OR model_uri = :m)"
            " AND (CAST(:r AS integer) IS NULL OR compression_rate = :r)"
            " AND (CAST(:c AS text) IS NULL OR corpus_version = :c)"
            " ORDER BY published_at DESC, id DESC LIMIT 1"),
            {"m": model_uri, "r": compression_rate, "c": corpus_version}).first()
    if row is None:
        raise StoreError(f"no ready index build for model={model_uri!r} rate={compression_rate!r} "
                         f"corpus_version={corpus_version!r}")
    return _build(row)


def list_builds(engine: Engine) -> list[Build]:
    with engine.connect() as conn:
        return [_build(r) for r in conn.execute(text(f"SELECT {_COLUMNS} FROM index_builds ORDER BY id"))]


def loaded_ids(engine: Engine, *, model_uri: str, corpus_version: str, compression_rate: int) -> set[str]:
    """Documents an unfinished build of this key already holds (a killed run's work, not redone)."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT m.doc_id FROM memories m JOIN index_builds b ON b.id = m.build_id WHERE b.model_uri = :m "
            "AND b.compression_rate = :r AND b.corpus_version = :c AND b.status IN ('loading', 'indexing')"),
            {"m": model_uri, "r": compression_rate, "c": corpus_version}).all()
    return {r[0] for r in rows}


def _release(raw) -> None:
    """Drop the session's advisory locks, then hand the connection back to the pool."""
    try:
        raw.rollback()
        with raw.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        raw.commit()
    finally:
        raw.close()


class BuildWriter:
    """Loads one build over one pooled DBAPI connection (COPY needs the driver's API), holding the key's
    advisory lock while open. Use as a context manager::

        with BuildWriter.open(engine, "models:/clara/3", 16, "c1a2…", hidden_size=576, n_mem_max=8) as w:
            todo = [d for d in docs if d.id not in w.loaded]
            w.add(ids, memories)            # batches; each one committed
            w.publish()                     # index, then flip to ready
    """

    def __init__(self, engine: Engine, raw, build: Build, loaded: set[str]):
        self.engine = engine
        self.raw = raw
        self.build = build
        self.loaded = loaded

    @classmethod
    def open(cls, engine: Engine, model_uri: str, compression_rate: int, corpus_version: str, *,
             hidden_size: int, n_mem_max: int, ann_kind: str | None = None, dense_model: str | None = None,
             dense_dim: int | None = None) -> "BuildWriter":
        """Resume the unfinished build of this key, or start a new one.

        Args:
            dense_model, dense_dim: the sentence encoder whose vectors ``add`` will be given (None: no dense
                first stage in this build).
        """
        if (dense_model is None) != (dense_dim is None):
            raise ValueError("give dense_model and dense_dim together")
        kind = ann_kind or ("halfvec" if hidden_size <= HALFVEC_INDEX_LIMIT else "bit")
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (_lock_key(model_uri, compression_rate, corpus_version),))
                if not cur.fetchone()[0]:
                    raise StoreError(f"another process is building the index for model={model_uri!r} "
                                     f"rate={compression_rate} corpus_version={corpus_version!r}")
                cur.execute(f"SELECT {_COLUMNS} FROM index_builds WHERE model_uri = %s AND compression_rate = %s"
                            " AND corpus_version = %s AND status IN ('loading', 'indexing') ORDER BY id DESC LIMIT 1",
                            (model_uri, compression_rate, corpus_version))
                row = cur.fetchone()
                if row is not None:
                    build = _build(row)
                    have = (build.hidden_size, build.n_mem_max, build.ann_kind, build.dense_model, build.dense_dim)
                    if have != (hidden_size, n_mem_max, kind, dense_model, dense_dim):
                        raise StoreError(f"unfinished build {build.id} has (hidden, n_mem_max, ann, dense model, "
                                         f"dense dim) = {have}; this run has "
                                         f"{(hidden_size, n_mem_max, kind, dense_model, dense_dim)}")
                    if build.status == "indexing":  # killed while indexing: back to loading, redo the index
                        cur.execute("UPDATE index_builds SET status = 'loading' WHERE id = %s", (build.id,))
                        build = replace(build, status="loading")
                else:
                    cur.execute("INSERT INTO index_builds (model_uri, compression_rate, corpus_version, hidden_size,"
                                " n_mem_max, ann_kind, dense_model, dense_dim, status) VALUES (%s, %s, %s, %s, %s, %s,"
                                " %s, %s, 'loading') RETURNING " + _COLUMNS,
                                (model_uri, compression_rate, corpus_version, hidden_size, n_mem_max, kind,
                                 dense_model, dense_dim))
                    build = _build(cur.fetchone())
                cur.execute("SELECT doc_id FROM memories WHERE build_id = %s", (build.id,))
                loaded = {r[0] for r in cur.fetchall()}
            raw.commit()
        except BaseException:
            # close() only returns a pooled connection to the pool: the session's advisory lock would stay held.
            _release(raw)
            raise
        return cls(engine, raw, build, loaded)

    def __enter__(self) -> "BuildWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        _release(self.raw)

    def add_documents(self, corpus_version: str, docs: Iterable[tuple[str, str, str]]) -> None:
        """Upsert (doc_id, title, body) rows of a corpus version (binary COPY into a temp table, then insert)."""
        with self.raw.cursor() as cur:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS _docs_in (doc_id text, title text, body text) "
                        "ON COMMIT DELETE ROWS")
            with cur.copy("COPY _docs_in (doc_id, title, body) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "text"])
                for doc_id, title, body in docs:
                    copy.write_row((doc_id, title, body))
            cur.execute("INSERT INTO documents (corpus_version, doc_id, title, body) "
                        "SELECT %s, doc_id, title, body FROM _docs_in ON CONFLICT DO NOTHING", (corpus_version,))
        self.raw.commit()

    def add(self, doc_ids: Sequence[str], memories: Sequence[np.ndarray], dense: np.ndarray | None = None) -> int:
        """Load one batch (binary COPY) and commit it; documents already in the build are skipped.

        Args:
            dense: [len(doc_ids), dense_dim] sentence vectors; required when the build has a dense model.
        """
        if self.build.status != "loading":
            raise StoreError(f"build {self.build.id} is {self.build.status}, not loading")
        b, n = self.build, 0
        if b.dense_model is not None:
            if dense is None:
                raise StoreError(f"build {b.id} holds {b.dense_model} vectors: pass dense= with every batch")
            dense = np.asarray(dense, dtype=np.float32)
            if dense.shape != (len(doc_ids), b.dense_dim):
                raise StoreError(f"dense vectors of shape {dense.shape} do not fit build {b.id} "
                                 f"({len(doc_ids)} documents x {b.dense_dim})")
        elif dense is not None:
            raise StoreError(f"build {b.id} was opened without a dense model; its dense vectors would be lost")
        with self.raw.cursor() as cur:
            with cur.copy("COPY memories (build_id, doc_id, n_mem, memory, ann, dense) FROM STDIN (FORMAT BINARY)"
                          ) as copy:
                copy.set_types(["int8", "text", "int2", "bytea", "vector", "vector"])
                for i, (doc_id, mem) in enumerate(zip(doc_ids, memories, strict=True)):
                    if doc_id in self.loaded:
                        continue
                    mem = np.asarray(mem, dtype=np.float32)
                    if mem.ndim != 2 or mem.shape[1] != b.hidden_size or not 1 <= mem.shape[0] <= b.n_mem_max:
                        raise StoreError(f"document {doc_id!r}: memory of shape {mem.shape} does not fit build "
                                         f"{b.id} (hidden {b.hidden_size}, at most {b.n_mem_max} rows)")
                    copy.write_row((b.id, doc_id, mem.shape[0], mem.astype("<f2").tobytes(), mem.mean(0),
                                    None if dense is None else dense[i]))
                    n += 1
        self.raw.commit()
        self.loaded.update(doc_ids)
        return n

    def publish(self, ef_construction: int = 64, m: int = 16, maintenance_work_mem: str = "512MB",
                parallel_workers: int = 2) -> Build:
        """Build the ANN index (after loading, as pgvector advises), then make the build visible in one UPDATE.

        Args:
            maintenance_work_mem: memory for the HNSW build; pgvector builds much faster while the graph fits.
            parallel_workers: parallel maintenance workers for the index build.
        """
        b = self.build
        with self.raw.cursor() as cur:
            cur.execute("UPDATE index_builds SET status = 'indexing', n_docs = "
                        "(SELECT count(*) FROM memories WHERE build_id = %s) WHERE id = %s", (b.id, b.id))
        self.raw.commit()
        ops = "halfvec_cosine_ops" if b.ann_kind == "halfvec" else "bit_hamming_ops"
        # A plain CREATE INDEX in the same transaction as the publishing UPDATE: index and visibility commit
        # together or not at all (a kill leaves the build 'indexing', and the rerun redoes both). Not
        # CONCURRENTLY: two concurrent CREATE INDEX CONCURRENTLY on one table deadlock (each waits for the
        # other's snapshot); a plain build only makes other builds' COPY wait until it commits.
        with self.raw.cursor() as cur:
            cur.execute("SELECT set_config('maintenance_work_mem', %s, true), "
                        "set_config('max_parallel_maintenance_workers', %s, true)",
                        (maintenance_work_mem, str(int(parallel_workers))))
            cur.execute(f"CREATE INDEX IF NOT EXISTS {b.index_name} ON memories USING hnsw ({b.ann_expr} {ops})"
                        f" WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) WHERE build_id = {int(b.id)}")
            if b.dense_model is not None:
                cur.execute(f"CREATE INDEX IF NOT EXISTS {b.dense_index_name} ON memories USING hnsw "
                            f"({b.dense_expr} vector_cosine_ops) WITH (m = {int(m)}, "
                            f"ef_construction = {int(ef_construction)}) WHERE build_id = {int(b.id)}")
            _lexical_statistics(cur, b.corpus_version)
            cur.execute("UPDATE index_builds SET status = 'ready', published_at = now() WHERE id = %s", (b.id,))
        self.raw.commit()
        self.build = get_build(self.engine, b.id)
        return self.build


def _lexical_statistics(cur, corpus_version: str) -> None:
    """BM25 statistics of a corpus version from its documents' tsvectors, once (the first build to publish
    computes them; a concurrent one waits on the lock and then finds them done). Runs inside the publishing
    transaction, so a build is never ready without them."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("lexical", 0, corpus_version),))
    cur.execute("SELECT 1 FROM lexical_corpora WHERE corpus_version = %s", (corpus_version,))
    if cur.fetchone() is not None:
        return
    cur.execute("CREATE TEMP TABLE _tf ON COMMIT DROP AS SELECT d.doc_id, u.lexeme, cardinality(u.positions) AS tf "
                "FROM documents d, unnest(d.tsv) u WHERE d.corpus_version = %s", (corpus_version,))
    cur.execute("SELECT (SELECT count(*) FROM documents WHERE corpus_version = %s), coalesce(sum(tf), 0) FROM _tf",
                (corpus_version,))
    n_docs, total = cur.fetchone()
    avg_len = float(total) / max(1, int(n_docs))
    cur.execute("INSERT INTO lexical_terms (corpus_version, lexeme, df, idf) SELECT %(c)s, lexeme, count(*), "
                "ln(1 + (%(n)s - count(*) + 0.5) / (count(*) + 0.5)) FROM _tf GROUP BY lexeme",
                {"c": corpus_version, "n": int(n_docs)})
    cur.execute("INSERT INTO lexical_postings (corpus_version, lexeme, doc_id, w) "
                "SELECT %(c)s, t.lexeme, t.doc_id, t.tf * (%(k1)s + 1) / (t.tf + %(k1)s * (1 - %(b)s + %(b)s * l.n / "
                "%(avg)s)) FROM _tf t JOIN (SELECT doc_id, sum(tf) AS n FROM _tf GROUP BY doc_id) l USING (doc_id)",
                {"c": corpus_version, "k1": BM25_K1, "b": BM25_B, "avg": max(avg_len, 1e-9)})
    cur.execute("INSERT INTO lexical_corpora (corpus_version, n_docs, avg_len, k1, b) VALUES (%s, %s, %s, %s, %s)",
                (corpus_version, int(n_docs), avg_len, BM25_K1, BM25_B))
    cur.execute("ANALYZE lexical_postings")
    cur.execute("ANALYZE lexical_terms")


def delete_build(engine: Engine, build_id: int) -> None:
    """Remove a build, its rows and its index."""
    build = get_build(engine, build_id)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {build.index_name}")
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {build.dense_index_name}")
        conn.execute(text("DELETE FROM index_builds WHERE id = :b"), {"b": build_id})
