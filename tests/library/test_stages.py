"""The pipeline's library side without services: sharding, merging, compression shards, cache keys, retries,
and the registry's gate / rollback rules (on a local SQLite MLflow store)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clara import stages
from clara.data.corpus import Document, corpus_name, prepare_corpus, read_corpus, write_corpus


@pytest.mark.parametrize("n,shards", [(10, 3), (3, 5), (0, 2), (7, 1), (100, 7)])
def test_shard_ranges_cover_everything_once(n, shards):
    ranges = stages.shard_ranges(n, shards)
    covered = [i for s, e in ranges for i in range(s, e)]
    assert covered == list(range(n))
    assert len(ranges) == max(1, min(shards, n))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


def _corpus(tmp_path: Path, n: int = 12) -> Path:
    docs = [Document(f"d{i}", f"Town {i}", f"Town {i} is a town in the county of Shire {i % 3}. It had "
                                             f"{1000 + i} inhabitants in 2020. Its mayor is Jane Doe {i}.")
            for i in range(n)]
    return write_corpus(docs, tmp_path / "corpus.jsonl")


def test_merged_shards_equal_one_run_and_are_byte_stable(tmp_path):
    corpus = _corpus(tmp_path)
    teacher, cfg = {"kind": "extractive"}, {"seed": 0, "dev_fraction": 0.25}
    stages.synthesize_shard(corpus, 0, 12, tmp_path / "one" / "s0", teacher, cfg)
    one = stages.merge_synthesis([tmp_path / "one" / "s0"], tmp_path / "one" / "out", cfg)
    parts = []
    for i, (s, e) in enumerate(stages.shard_ranges(12, 3)):
        stages.synthesize_shard(corpus, s, e, tmp_path / "three" / f"s{i}", teacher, cfg)
        parts.append(tmp_path / "three" / f"s{i}")
    three = stages.merge_synthesis(parts, tmp_path / "three" / "out", cfg)
    assert three["shards"] == 3 and three["documents_in"] == one["documents_in"] == 12
    for split in ("train.jsonl", "dev.jsonl"):
        a = (tmp_path / "one" / "out" / split).read_text()
        b = (tmp_path / "three" / "out" / split).read_text()
        assert sorted(a.splitlines()) == sorted(b.splitlines()) and a.strip()
    # data/ must not change when nothing changed: the report there carries no timings.
    report = json.loads((tmp_path / "three" / "out" / "report.json").read_text())
    assert not set(stages.RUN_FIELDS) & set(report)
    before = (tmp_path / "three" / "out" / "report.json").read_bytes()
    stages.synthesize_shard(corpus, 0, 4, parts[0], teacher, cfg)  # a resumed shard: nothing new
    stages.merge_synthesis(parts, tmp_path / "three" / "out", cfg)
    assert (tmp_path / "three" / "out" / "report.json").read_bytes() == before


def test_merge_refuses_overlapping_or_unfinished_shards(tmp_path):
    corpus = _corpus(tmp_path, 4)
    teacher, cfg = {"kind": "extractive"}, {"seed": 0}
    stages.synthesize_shard(corpus, 0, 3, tmp_path / "a", teacher, cfg)
    stages.synthesize_shard(corpus, 2, 4, tmp_path / "b", teacher, cfg)
    with pytest.raises(ValueError, match="more than one shard"):
        stages.merge_synthesis([tmp_path / "a", tmp_path / "b"], tmp_path / "out", cfg)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        stages.merge_synthesis([tmp_path / "a", tmp_path / "missing"], tmp_path / "out", cfg)


def test_compress_shard_writes_once_and_round_trips(tmp_path, tiny_model, monkeypatch):
    from clara.model.checkpoint import save_checkpoint
    from clara.store.loading import compress_shard, read_memory_shard

    corpus = _corpus(tmp_path, 5)
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "shards" / "s0.safetensors"
    info = compress_shard(ckpt, read_corpus(corpus)[1:5], out, skip_ids=["d2"])
    assert info == {"file": str(out), "documents": 3, "reused": False}
    ids, mems = read_memory_shard(out)
    assert ids == ["d1", "d3", "d4"]
    docs = {d.id: d for d in read_corpus(corpus)}
    expected = tiny_model.compress([docs[i].full_text for i in ids])
    for got, want in zip(mems, expected):
        np.testing.assert_allclose(got.astype(np.float32), want.detach().float().numpy(), atol=1e-2)
    # A finished shard is never recomputed (a rerun after a crash redoes only the missing ones).
    monkeypatch.setattr("clara.model.checkpoint.load_checkpoint", lambda *a, **k: pytest.fail("recomputed"))
    assert compress_shard(ckpt, read_corpus(corpus)[1:5], out)["reused"] is True
    assert not list(out.parent.glob("*.tmp*"))


def test_prepare_corpus_reuses_an_unchanged_source(tmp_path):
    from clara.config import preset

    src = _corpus(tmp_path, 3)
    out = tmp_path / "data" / "corpus" / "c.jsonl"
    out.parent.mkdir(parents=True)
    first = prepare_corpus(str(src), preset("tiny"), out)
    assert first["documents"] == 3 and out.is_file()
    mtime = out.stat().st_mtime_ns
    assert prepare_corpus(str(src), preset("tiny"), out) == first
    assert out.stat().st_mtime_ns == mtime
    write_corpus([Document("x", "X", "Something else entirely.")], src)
    assert prepare_corpus(str(src), preset("tiny"), out)["documents"] == 1
    assert corpus_name("bundled") == "wiki_en" and corpus_name("/a/My Corpus.jsonl") == "My-Corpus"
