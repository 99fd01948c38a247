"""Integration tests against a real PostgreSQL + pgvector (the embedded server, or $CLARA_DATABASE_URL)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from sqlalchemy import text

from clara.store.builds import BuildWriter, StoreError, delete_build, list_builds, ready_build
from clara.store.db import connect, migrate
from clara.store.search import ann_candidates, search


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    url = os.environ.get("CLARA_DATABASE_URL")
    if not url:
        from clara.store.server import embedded_server, sqlalchemy_url

        url = sqlalchemy_url(embedded_server(tmp_path_factory.mktemp("pg") / "data").get_uri())
    eng = connect(url)
    yield eng
    eng.dispose()


def random_memories(n_docs, n_mem, hidden, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n_mem, hidden)).astype(np.float32) for _ in range(n_docs)]


def load(engine, key, memories, *, hidden, n_mem_max, titles=None, ids=None, publish=True):
    model_uri, rate, version = key
    ids = ids or [f"doc-{i}" for i in range(len(memories))]
    with BuildWriter.open(engine, model_uri, rate, version, hidden_size=hidden, n_mem_max=n_mem_max) as w:
        w.add_documents(version, [(d, (titles or {}).get(d, f"title {d}"), f"body of {d}") for d in ids])
        for s in range(0, len(ids), 64):
            w.add(ids[s : s + 64], memories[s : s + 64])
        return w.publish() if publish else w.build


def test_migrations_from_empty_are_idempotent(engine):
    with engine.connect() as conn:
        names = [r[0] for r in conn.execute(text("SELECT name FROM schema_migrations"))]
        tables = {r[0] for r in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}
        ext = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
    assert names == ["001_init.sql"]
    assert {"documents", "index_builds", "memories"} <= tables
    assert ext is not None
    assert migrate(engine) == []


def test_load_search_finds_the_planted_neighbours(engine):
    mems = random_memories(300, 4, 32, seed=1)
    build = load(engine, ("m-search", 16, "v1"), mems, hidden=32, n_mem_max=4)
    assert build.status == "ready" and build.n_docs == 300 and build.ann_kind == "halfvec"
    rng = np.random.default_rng(5)
    for target in (0, 17, 299):
        query = mems[target] + 0.05 * rng.standard_normal(mems[target].shape).astype(np.float32)
        hits = search(engine, build, query, k=5, candidates=50)
        exact = search(engine, build, query, k=5, exact=True)
        assert hits[0].doc_id == exact[0].doc_id == f"doc-{target}"
        # With every document a candidate, ANN + exact re-score is exact search.
        everything = search(engine, build, query, k=5, candidates=300)
        assert [h.doc_id for h in everything] == [h.doc_id for h in exact]
        assert [h.score for h in everything] == pytest.approx([h.score for h in exact], abs=1e-6)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert hits[0].title == f"title doc-{target}" and hits[0].text == f"body of doc-{target}"
        np.testing.assert_allclose(hits[0].memory, mems[target], atol=2e-3)  # float16 storage


def test_ann_stage_uses_the_builds_partial_hnsw_index(engine):
    build = load(engine, ("m-explain", 16, "v1"), random_memories(1500, 2, 16, seed=2), hidden=16, n_mem_max=2)
    q = "[" + ",".join(["0.1"] * 16) + "]"
    with engine.begin() as conn:
        conn.execute(text("ANALYZE memories"))
        conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        plan = "\n".join(r[0] for r in conn.execute(text(
            f"EXPLAIN SELECT doc_id FROM memories WHERE build_id = CAST(:b AS bigint) ORDER BY {build.ann_expr} <=> "
            "CAST(:q AS halfvec(16)) LIMIT 5"), {"b": build.id, "q": q}))
    assert build.index_name in plan


def test_publish_is_atomic_for_readers(engine):
    key = ("m-atomic", 16, "v1")
    old = load(engine, key, random_memories(20, 2, 8, seed=3), hidden=8, n_mem_max=2)
    with BuildWriter.open(engine, *key, hidden_size=8, n_mem_max=2) as w:
        assert w.build.id != old.id and w.build.status == "loading"
        w.add([f"new-{i}" for i in range(10)], random_memories(10, 2, 8, seed=4))
        # A reader in the middle of the new build still gets the old one, complete.
        current = ready_build(engine, model_uri=key[0], compression_rate=16, corpus_version="v1")
        assert current.id == old.id and current.n_docs == 20
        with pytest.raises(StoreError, match="not ready"):
            ready_build(engine, w.build.id)
        new = w.publish()
    assert ready_build(engine, model_uri=key[0], compression_rate=16, corpus_version="v1").id == new.id
    assert new.n_docs == 10


def test_missing_builds_fail_clearly(engine):
    with pytest.raises(StoreError, match="does not exist"):
        ready_build(engine, 10**9)
    with pytest.raises(StoreError, match="no ready index build"):
        ready_build(engine, model_uri="never-built")
    build = load(engine, ("m-shape", 16, "v1"), random_memories(5, 2, 8), hidden=8, n_mem_max=2)
    with pytest.raises(StoreError, match="does not match build"):
        search(engine, build, np.zeros((2, 9), dtype=np.float32))


def test_hidden_4096_uses_binary_quantisation_and_rescoring(engine):
    mems = random_memories(200, 2, 4096, seed=6)
    build = load(engine, ("m-4096", 16, "v1"), mems, hidden=4096, n_mem_max=2)
    assert build.ann_kind == "bit"
    for target in (3, 150):
        hits = search(engine, build, mems[target], k=3, candidates=20)
        assert hits[0].doc_id == f"doc-{target}" and hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_injection_attempts_are_stored_literally(engine):
    evil = "x'); DROP TABLE memories; --"
    ids = [evil, "$$; DELETE FROM documents; $$", 'quote " and \\ backslash', "ok"]
    titles = {d: evil for d in ids}
    mems = random_memories(len(ids), 2, 8, seed=7)
    key = (evil, 16, "v'); DROP TABLE documents; --")
    build = load(engine, key, mems, hidden=8, n_mem_max=2, ids=ids, titles=titles)
    assert ready_build(engine, model_uri=evil, compression_rate=16, corpus_version=key[2]).id == build.id
    hits = search(engine, build, mems[0], k=4, exact=True)
    assert hits[0].doc_id == evil and hits[0].title == evil
    assert {h.doc_id for h in hits} == set(ids)
    assert ann_candidates(engine, build, mems[1], 4)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM memories WHERE build_id = :b"), {"b": build.id}).scalar() == 4
        assert conn.execute(text("SELECT count(*) FROM documents")).scalar() > 0


def test_two_builds_at_once_and_the_same_build_twice(engine):
    errors = []

    def build(key, seed):
        try:
            load(engine, key, random_memories(150, 2, 16, seed=seed), hidden=16, n_mem_max=2)
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(("m-par-a", 16, "v1"), 8)),
               threading.Thread(target=build, args=(("m-par-b", 16, "v1"), 9))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a = ready_build(engine, model_uri="m-par-a")
    b = ready_build(engine, model_uri="m-par-b")
    assert a.n_docs == b.n_docs == 150
    with BuildWriter.open(engine, "m-par-c", 16, "v1", hidden_size=8, n_mem_max=2):
        with pytest.raises(StoreError, match="another process is building"):
            BuildWriter.open(engine, "m-par-c", 16, "v1", hidden_size=8, n_mem_max=2)


def test_delete_build(engine):
    build = load(engine, ("m-del", 16, "v1"), random_memories(5, 2, 8), hidden=8, n_mem_max=2)
    delete_build(engine, build.id)
    assert build.id not in {b.id for b in list_builds(engine)}


def test_database_down_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot reach the database at postgresql\\+psycopg://postgres:\\*\\*\\*@"):
        connect("postgresql://postgres:secret@127.0.0.1:9/clara")


def test_compress_job_kill_and_resume(engine, tmp_path):
    """SIGKILL `clara compress` after its first committed batch; the rerun finishes the same build with every
    document exactly once."""
    from clara.config import preset
    from clara.data.corpus import Document, write_corpus
    from clara.model import ClaraModel
    from clara.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(ClaraModel.build(preset("tiny", compression_rate=16)), tmp_path / "ckpt")
    docs = [Document(f"d{i}", f"T{i}", f"Document number {i} says fact {i * 7}. " * 3) for i in range(2500)]
    corpus = write_corpus(docs, tmp_path / "corpus.jsonl")
    url = engine.url.render_as_string(hide_password=False)
    cmd = [sys.executable, "-m", "clara.cli", "compress", "--model", str(ckpt), "--corpus", str(corpus),
           "--database-url", url, "--corpus-version", "kill-v1", "--batch-size", "50", "--model-uri", "m-kill"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline and count == 0:
        if proc.poll() is not None:
            pytest.fail(f"compress exited early ({proc.returncode})")
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM memories m JOIN index_builds b ON b.id = m.build_id "
                                      "WHERE b.model_uri = 'm-kill'")).scalar()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM index_builds WHERE model_uri = 'm-kill'")).scalars().all()
    assert status == ["loading"], "the job finished before it could be killed"
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with engine.connect() as conn:
        builds = conn.execute(text("SELECT id, status, n_docs FROM index_builds WHERE model_uri = 'm-kill'")).all()
        assert len(builds) == 1 and builds[0][1] == "ready" and builds[0][2] == 2500
        n, distinct = conn.execute(text("SELECT count(*), count(DISTINCT doc_id) FROM memories WHERE build_id = :b"),
                                   {"b": builds[0][0]}).one()
    assert n == distinct == 2500
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["build_id"] == builds[0][0] and summary["status"] == "ready"


def test_embedded_server_start_reuse_stop(tmp_path):
    from clara.store.server import embedded_server, stop_embedded

    datadir = tmp_path / "pg"
    cli = [sys.executable, "-m", "clara.cli", "store"]
    url = subprocess.run(cli + ["start", "--datadir", str(datadir)], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    # The server outlives the process that started it, and another process reuses it.
    assert (datadir / "postmaster.pid").exists()
    eng = connect(url)
    with eng.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    eng.dispose()
    assert embedded_server(datadir).get_uri() in url.replace("postgresql+psycopg", "postgresql")
    out = subprocess.run(cli + ["stop", "--datadir", str(datadir)], capture_output=True, text=True, check=True)
    assert "stopped" in out.stdout and not (datadir / "postmaster.pid").exists()
    assert not stop_embedded(datadir)
