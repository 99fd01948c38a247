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
from clara.store.search import first_stage, search


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
    assert names == ["001_init.sql", "002_first_stage.sql", "003_lexical_impact.sql"]
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
    assert first_stage(engine, build, "clara", 4, query=mems[1])
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


@pytest.mark.slow  # a real process killed and restarted
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
    # A process that attaches to the running server and exits leaves it running: the MLflow server of
    # `clara_infra.services up` keeps its backend store after a pipeline run ends.
    attach = f"from clara.store.server import embedded_server; embedded_server({str(datadir)!r}).get_uri()"
    subprocess.run([sys.executable, "-c", attach], check=True)
    eng = connect(url)
    with eng.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    eng.dispose()
    assert embedded_server(datadir).get_uri() in url.replace("postgresql+psycopg", "postgresql")
    out = subprocess.run(cli + ["stop", "--datadir", str(datadir)], capture_output=True, text=True, check=True)
    assert "stopped" in out.stdout and not (datadir / "postmaster.pid").exists()
    assert not stop_embedded(datadir)


def test_stopping_with_a_stale_pid_file_starts_nothing(tmp_path):
    """A postmaster.pid left by a killed server names a dead process: stop reports 'not running' and does not
    start a server to stop it (no cluster is made in the folder)."""
    from clara.store.server import stop_embedded

    datadir = tmp_path / "pg"
    datadir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (datadir / "postmaster.pid").write_text(f"{dead.pid}\n{datadir}\n")
    assert not stop_embedded(datadir)
    assert sorted(p.name for p in datadir.iterdir()) == ["postmaster.pid"]


# ------------------------------------------------------------------------------ first-stage candidate modes

PASSAGES = {
    "volcano": ("Mount Etna", "Etna is an active volcano in Sicily; its eruption in 1669 destroyed villages."),
    "river": ("Danube", "The Danube river flows through ten countries and ends in the Black Sea."),
    "painter": ("Vermeer", "Johannes Vermeer was a Dutch painter of domestic interior scenes."),
    "city": ("Lyon", "Lyon is a city in France, known for its cuisine and the river Rhone."),
    "rivers": ("Rivers", "A river is a natural stream of water; a river carries water to a sea, a lake or a river."),
}


def load_texts(engine, key, passages, *, dense=None, dense_model="test-dense"):
    """A build over real texts, with constructed memories (and dense vectors when given)."""
    model_uri, rate, version = key
    ids = list(passages)
    mems = random_memories(len(ids), 2, 8, seed=11)
    opts = {"dense_model": dense_model, "dense_dim": dense.shape[1]} if dense is not None else {}
    with BuildWriter.open(engine, model_uri, rate, version, hidden_size=8, n_mem_max=2, **opts) as w:
        w.add_documents(version, [(d, *passages[d]) for d in ids])
        w.add(ids, mems, dense=dense)
        return w.publish(), dict(zip(ids, mems))


def python_bm25(engine, passages, question, k1=1.2, b=0.75, per_term=None, pool=None):
    """BM25 written out from Postgres's own lexemes: the reference the SQL must equal. Pruned (``per_term``): each
    term contributes its ``per_term`` highest weights to a partial sum, and the ``pool`` best partial sums get their
    exact scores."""
    import math

    with engine.connect() as conn:
        def lexemes(s):
            return conn.execute(text("SELECT lexeme, cardinality(positions) FROM unnest(to_tsvector('english', :s))"),
                                {"s": s}).all()
        docs = {d: dict(lexemes(t + "\n" + body)) for d, (t, body) in passages.items()}
        q = {lex for lex, _ in lexemes(question)}
    avg = sum(sum(v.values()) for v in docs.values()) / len(docs)
    weights, idf = {}, {}
    for lex in q:
        df = sum(1 for v in docs.values() if lex in v)
        idf[lex] = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        weights[lex] = {d: tf[lex] * (k1 + 1) / (tf[lex] + k1 * (1 - b + b * sum(tf.values()) / avg))
                        for d, tf in docs.items() if lex in tf}
    partial: dict[str, float] = {}
    for lex, w in weights.items():
        for d in sorted(w, key=lambda d: (-w[d], d))[:per_term]:
            partial[d] = partial.get(d, 0.0) + idf[lex] * w[d]
    pool = sorted(partial, key=lambda d: (-partial[d], d))[:pool]
    return {d: sum(idf[lex] * w[d] for lex, w in weights.items() if d in w) for d in pool}


def test_lexical_mode_is_bm25_over_postgres_full_text(engine):
    build, _ = load_texts(engine, ("m-lex", 16, "lex-v1"), PASSAGES)
    question = "Which volcano erupted in Sicily in 1669?"
    got = first_stage(engine, build, "lexical", 5, text_query=question)
    assert got[0][0] == "volcano"
    expected = python_bm25(engine, PASSAGES, question)
    assert dict(got) == pytest.approx(expected, rel=1e-5)
    # idf: "river" is in three passages and "Rhone" in one, so the passage with Rhone wins although
    # another repeats "river" four times.
    assert first_stage(engine, build, "lexical", 5, text_query="river Rhone")[0][0] == "city"
    assert first_stage(engine, build, "lexical", 5, text_query="zzz qqq") == []
    # Pruned: each term proposes only its best posting; those candidates get their exact score over all terms
    # (the passage repeating "river" keeps its "sea" weight too), and a passage that no list proposes is dropped.
    pruned = dict(first_stage(engine, build, "lexical", 5, text_query="river sea Rhone", postings_per_term=1))
    full = dict(first_stage(engine, build, "lexical", 5, text_query="river sea Rhone"))
    assert pruned == pytest.approx(python_bm25(engine, PASSAGES, "river sea Rhone", per_term=1), rel=1e-5)
    # The pool (10x the results asked for) holds the best partial sums: with n=1 a pool of 10 covers them all here.
    top1 = first_stage(engine, build, "lexical", 1, text_query="river sea Rhone", postings_per_term=1)
    assert dict(top1) == pytest.approx(dict(sorted(pruned.items(), key=lambda kv: -kv[1])[:1]), rel=1e-6)
    assert all(pruned[d] == pytest.approx(full[d], rel=1e-6) for d in pruned)
    assert len(first_stage(engine, build, "lexical", 5, text_query="river", postings_per_term=1)) == 1
    assert len(first_stage(engine, build, "lexical", 5, text_query="river")) == 3
    with pytest.raises(ValueError, match="postings_per_term"):
        first_stage(engine, build, "lexical", 5, text_query=question, postings_per_term=0)
    # A second build of the same corpus version reuses the statistics instead of duplicating them.
    again, _ = load_texts(engine, ("m-lex-2", 16, "lex-v1"), PASSAGES)
    assert first_stage(engine, again, "lexical", 5, text_query=question) == got
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM lexical_corpora WHERE corpus_version = 'lex-v1'")).scalar() == 1


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_dense_and_hybrid_modes(engine):
    rng = np.random.default_rng(3)
    dense = unit(rng.standard_normal((len(PASSAGES), 16)))
    build, mems = load_texts(engine, ("m-dense", 16, "dense-v1"), PASSAGES, dense=dense)
    assert build.dense_model == "test-dense" and build.dense_dim == 16
    ids = list(PASSAGES)
    target = ids.index("painter")
    q = unit(dense[target] + 0.1 * rng.standard_normal(16))
    got = first_stage(engine, build, "dense", 3, dense_query=q)
    assert got[0][0] == "painter"
    assert [s for _, s in got] == pytest.approx(sorted((float(dense[i] @ q) for i in range(len(ids))),
                                                       reverse=True)[:3], abs=1e-5)
    # Hybrid is reciprocal-rank fusion of the two lists (2n deep): the SQL agrees with the in-memory twin.
    from clara.retrieval.fusion import rrf

    question = "Dutch painter of interior scenes"
    lex = first_stage(engine, build, "lexical", 10, text_query=question)
    den = first_stage(engine, build, "dense", 10, dense_query=q)
    hybrid = first_stage(engine, build, "hybrid", 5, text_query=question, dense_query=q)
    expected = rrf([lex, den], 5)
    assert [d for d, _ in hybrid] == [d for d, _ in expected]
    assert [s for _, s in hybrid] == pytest.approx([s for _, s in expected], abs=1e-9)
    # The full search: hybrid candidates re-ranked by the flattened cosine against the query tensor.
    hits = search(engine, build, mems["river"], k=2, mode="hybrid", text_query="river sea", dense_query=q)
    assert hits[0].doc_id == "river" and hits[0].first_rank is not None
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    # Fusing the first-stage rank: with a large weight the first stage's order wins.
    fused = search(engine, build, mems["river"], k=3, mode="hybrid", text_query=question, dense_query=q, fuse=100.0)
    assert [h.first_rank for h in fused] == sorted(h.first_rank for h in fused)
    # No re-rank (query None): the first stage's top k as it ranked them, with their memories and text.
    plain = search(engine, build, None, k=3, mode="hybrid", text_query=question, dense_query=q)
    deep = first_stage(engine, build, "hybrid", 20, text_query=question, dense_query=q)
    assert [(h.doc_id, h.first_rank) for h in plain] == [(d, i + 1) for i, (d, _) in enumerate(deep[:3])]
    assert [h.score for h in plain] == pytest.approx([s for _, s in deep[:3]])
    assert all(np.allclose(h.memory, mems[h.doc_id], rtol=1e-2, atol=1e-3) and h.text for h in plain)
    with pytest.raises(ValueError, match="query reasoner"):
        search(engine, build, None, mode="clara")


def test_dense_needs_a_build_with_dense_vectors(engine):
    build, mems = load_texts(engine, ("m-nodense", 16, "nodense-v1"), PASSAGES)
    assert build.dense_model is None
    with pytest.raises(StoreError, match="no dense vectors"):
        first_stage(engine, build, "hybrid", 5, text_query="river", dense_query=np.ones(16, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown retrieval mode"):
        first_stage(engine, build, "bm42", 5, text_query="river")
    with pytest.raises(ValueError, match="needs the question text"):
        search(engine, build, mems["river"], mode="lexical")


def test_dense_build_resume_and_mismatch(engine):
    rng = np.random.default_rng(9)
    dense = unit(rng.standard_normal((4, 8)))
    mems = random_memories(4, 2, 8, seed=12)
    key = ("m-dense-resume", 16, "dr-v1")
    with BuildWriter.open(engine, *key, hidden_size=8, n_mem_max=2, dense_model="enc", dense_dim=8) as w:
        w.add_documents(key[2], [(f"d{i}", "t", f"body {i}") for i in range(4)])
        w.add(["d0", "d1"], mems[:2], dense=dense[:2])
        with pytest.raises(StoreError, match="pass dense="):
            w.add(["d2"], mems[2:3])
    # Killed here: nothing of it is visible (no ready build, no BM25 statistics for its corpus version); the rerun
    # must use the same dense model, keeps d0/d1 and loads the rest once.
    with pytest.raises(StoreError, match="no ready index build"):
        ready_build(engine, model_uri=key[0])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM lexical_corpora WHERE corpus_version = :c"),
                            {"c": key[2]}).scalar() == 0
    with pytest.raises(StoreError, match="dense"):
        BuildWriter.open(engine, *key, hidden_size=8, n_mem_max=2)
    with BuildWriter.open(engine, *key, hidden_size=8, n_mem_max=2, dense_model="enc", dense_dim=8) as w:
        assert w.loaded == {"d0", "d1"}
        w.add([f"d{i}" for i in range(4)], mems, dense=dense)
        build = w.publish()
    assert build.n_docs == 4
    got = first_stage(engine, build, "dense", 4, dense_query=dense[3])
    assert got[0][0] == "d3" and len(got) == 4
    assert first_stage(engine, build, "lexical", 4, text_query="body 2")  # statistics published with the build


def test_dense_stage_uses_the_builds_partial_hnsw_index(engine):
    n = 1500
    rng = np.random.default_rng(4)
    ids = [f"doc-{i}" for i in range(n)]
    with BuildWriter.open(engine, "m-dense-explain", 16, "de-v1", hidden_size=8, n_mem_max=2,
                          dense_model="enc", dense_dim=16) as w:
        w.add_documents("de-v1", [(d, "t", "b") for d in ids])
        w.add(ids, random_memories(n, 2, 8, seed=2), dense=unit(rng.standard_normal((n, 16))))
        build = w.publish()
    with engine.begin() as conn:
        conn.execute(text("ANALYZE memories"))
        conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        plan = "\n".join(r[0] for r in conn.execute(text(
            f"EXPLAIN SELECT doc_id FROM memories WHERE build_id = CAST(:b AS bigint) ORDER BY {build.dense_expr} "
            "<=> CAST(:q AS vector(16)) LIMIT 5"), {"b": build.id, "q": "[" + ",".join(["0.1"] * 16) + "]"}))
    assert build.dense_index_name in plan


def test_one_loader_for_shard_files_and_in_process_compression(engine, tmp_path, tiny_model):
    """The pipeline's shard files and ``clara compress``'s in-process compression go through the same loader:
    the same documents give the same stored memories; a resumed load is told what is there; a document the
    source never delivers stops the build from being published."""
    from clara.data.corpus import Document
    from clara.model.checkpoint import save_checkpoint
    from clara.store.loading import compress_shard, compressing, index_corpus, load_build, shard_files
    from clara.store.search import memories_of

    docs = [Document(f"d{i}", f"T{i}", f"Passage {i} tells fact {i * 3}.") for i in range(6)]
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    files = [compress_shard(ckpt, docs[s:e], tmp_path / f"s{s}.safetensors")["file"] for s, e in ((0, 4), (4, 6))]
    shape = dict(compression_rate=tiny_model.cfg.compression_rate, hidden_size=tiny_model.hidden_size,
                 n_mem_max=tiny_model.cfg.n_mem_max)
    from_files = load_build(engine, docs, shard_files(files), model_uri="m-files", corpus_version="one-loader",
                            **shape)
    in_process = index_corpus(engine, tiny_model, docs, model_uri="m-inproc", corpus_version="one-loader",
                              progress=False)
    a = memories_of(engine, from_files, [d.id for d in docs])
    b = memories_of(engine, in_process, [d.id for d in docs])
    assert from_files.n_docs == in_process.n_docs == 6
    for d in docs:
        np.testing.assert_allclose(a[d.id], b[d.id], atol=2e-2)  # shard files hold fp16

    # A resumed build: the source is told what is already loaded, and only the rest is compressed.
    seen: list[set[str]] = []
    with BuildWriter.open(engine, "m-resume", 16, "one-loader", hidden_size=tiny_model.hidden_size,
                          n_mem_max=tiny_model.cfg.n_mem_max) as w:
        w.add_documents("one-loader", [(d.id, d.title, d.text) for d in docs])
        w.add(["d0", "d1"], [m.numpy() for m in tiny_model.compress([docs[0].full_text, docs[1].full_text])])
    inner = compressing(tiny_model, docs, progress=False)

    def watched(loaded):
        seen.append(set(loaded))
        return inner(loaded)

    resumed = load_build(engine, docs, watched, model_uri="m-resume", corpus_version="one-loader", **shape)
    assert seen == [{"d0", "d1"}] and resumed.n_docs == 6

    with pytest.raises(ValueError, match="1 documents have no memory"):
        load_build(engine, docs, shard_files(files[:1] + [compress_shard(ckpt, docs[4:5], tmp_path / "x.st")["file"]]),
                   model_uri="m-missing", corpus_version="one-loader", **shape)
    with pytest.raises(StoreError, match="no ready index build"):
        ready_build(engine, model_uri="m-missing")


def test_a_database_outage_during_queries_is_a_clear_error_and_answers_resume(tiny_model, docs, own_server):
    """A real embedded server of its own, stopped between two questions: the question asked while it is down
    gets StoreUnavailable naming the server and how to restart it (the served model turns that into a 503), and
    once it is started again the same Answerer answers without being rebuilt."""
    from clara.data.corpus import Document
    from clara.serving import Answerer
    from clara.store.builds import StoreUnavailable
    from clara.store.loading import index_corpus

    corpus = [Document(f"d{i}", f"Doc {i}", t) for i, t in enumerate(docs)]
    build = index_corpus(own_server.engine, tiny_model, corpus, model_uri="m-outage", corpus_version="outage",
                         progress=False)
    # CLaRa's own first stage, and a lexical one whose SQL runs in a worker thread beside the query reasoner
    answerers = [Answerer(tiny_model, own_server.engine, build, k=2, mode="clara", max_new_tokens=2),
                 Answerer(tiny_model, own_server.engine, build, k=2, mode="lexical", rerank="always",
                          max_new_tokens=2)]
    before = [a.ask(["Which river flows through Paris?"]) for a in answerers]
    own_server.stop()
    try:
        for answerer in answerers:
            with pytest.raises(StoreUnavailable, match=r"database at postgresql\+psycopg://.*did not answer.*"
                                                       r"python -m clara_infra.services up"):
                answerer.ask(["Which river flows through Paris?"])
    finally:
        own_server.start()
    for answerer, b in zip(answerers, before):
        after = answerer.ask(["Which river flows through Paris?"])
        assert after[0].doc_ids == b[0].doc_ids and after[0].answer == b[0].answer


def test_served_retrieval_of_a_batch_ranks_as_one_question_at_a_time(tiny_model, docs, engine):
    """``retrieve_batch`` (the served path: one query-reasoner and one MiniLM forward for the batch) returns the top
    k that each question alone gets, scores included."""
    from clara.data.corpus import Document
    from clara.retrieval.dense import DenseEncoder
    from clara.retrieval.rerank import ClaraRetriever
    from clara.store.loading import index_corpus

    corpus = [Document(f"d{i}", f"Doc {i}", t) for i, t in enumerate(docs)]
    build = index_corpus(engine, tiny_model, corpus, model_uri="m-batch", corpus_version="batch",
                         dense=DenseEncoder(), progress=False)
    retriever = ClaraRetriever(tiny_model, [], engine=engine, build=build, mode="hybrid", fuse=2.0)
    questions = ["Which river flows through Paris?", "Who wrote Hamlet?", "What is the capital of France?"]
    together = retriever.retrieve_batch(questions, 3)
    for q, got in zip(questions, together):
        alone = retriever.retrieve(q, retriever.encode([q])[0], 3)
        assert [d for d, _ in got] == [d for d, _ in alone] and len(got) == 3
        assert [s for _, s in got] == pytest.approx([s for _, s in alone], abs=1e-5)
    first = retriever.retrieve_batch(questions, 3, rerank=False)  # the first stage's order, no query reasoner
    assert [len(r) for r in first] == [3, 3, 3]


def test_a_database_outage_while_loading_a_build_keeps_what_was_loaded_and_a_rerun_finishes(tiny_model, tmp_path,
                                                                                             own_server):
    """The server stops after the first shard is loaded: StoreUnavailable, nothing published; started again, the
    same load continues from what is there (the source is told) and publishes each document exactly once."""
    from clara.data.corpus import Document
    from clara.model.checkpoint import save_checkpoint
    from clara.store.builds import StoreUnavailable
    from clara.store.loading import compress_shard, load_build, shard_files

    docs = [Document(f"d{i}", f"T{i}", f"Passage {i} tells fact {i * 3}.") for i in range(6)]
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    files = [compress_shard(ckpt, docs[s:e], tmp_path / f"s{s}.safetensors")["file"] for s, e in ((0, 3), (3, 6))]
    shape = dict(compression_rate=tiny_model.cfg.compression_rate, hidden_size=tiny_model.hidden_size,
                 n_mem_max=tiny_model.cfg.n_mem_max, model_uri="m-load-outage", corpus_version="load-outage")
    engine = own_server.engine
    seen = []

    def stops_after_first(loaded):
        for i, batch in enumerate(shard_files(files)(loaded)):
            if i == 1:
                own_server.stop()  # the first shard went in; the database goes away before the second
            seen.append(set(loaded))
            yield batch

    def told(loaded):
        seen.append(set(loaded))
        return shard_files(files)(loaded)

    try:
        with pytest.raises(StoreUnavailable, match="did not answer.*python -m clara_infra.services up"):
            load_build(engine, docs, stops_after_first, batch_size=2, **shape)
    finally:
        own_server.start()
    # between the failure and the rerun nothing is published: no reader can pick the half-loaded build
    (half,) = [b for b in list_builds(engine) if b.corpus_version == "load-outage"]
    assert half.status != "ready"
    with pytest.raises(StoreError, match="no ready index build"):
        ready_build(engine, model_uri="m-load-outage")
    with pytest.raises(StoreError, match="is not ready"):
        ready_build(engine, half.id)
    build = load_build(engine, docs, told, **shape)
    assert build.id == half.id  # the rerun finished that build, not a second one
    assert seen[-1] == {"d0", "d1", "d2"}  # the rerun was told what the first load had written
    assert build.status == "ready" and build.n_docs == 6
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT doc_id, count(*) FROM memories WHERE build_id = :b GROUP BY doc_id"),
                            {"b": build.id}).all()
    assert sorted(r[0] for r in rows) == [d.id for d in docs] and {r[1] for r in rows} == {1}
