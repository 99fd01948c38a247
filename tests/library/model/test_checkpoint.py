import json
import pickle

import pytest
import torch

from clara.model.checkpoint import checkpoint_digest, load_checkpoint, read_checkpoint_config, save_checkpoint


def _no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("checkpoint loading tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_save_load_gives_identical_outputs_without_pickle(tiny_model, docs, tmp_path, monkeypatch):
    path = save_checkpoint(tiny_model, tmp_path / "ckpt", extra={"note": "x"})
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert all(f.endswith((".json", ".safetensors")) for f in files), files
    for name in ("compressor", "generator", "query_reasoner"):
        assert f"adapters/{name}/adapter_model.safetensors" in files
        assert f"adapters/{name}/adapter_config.json" in files
    assert "special_embeddings.safetensors" in files and "base/model.safetensors" in files

    _no_unpickling(monkeypatch)
    loaded = load_checkpoint(path)
    for a, b in zip(tiny_model.compress(docs), loaded.compress(docs)):
        assert torch.equal(a, b)
    for a, b in zip(tiny_model.encode_queries(["Where?"]), loaded.encode_queries(["Where?"])):
        assert torch.equal(a, b)
    mems = tiny_model.compress(docs[:2])
    q = ["Where is Paris?"]
    assert tiny_model.generate(q, [mems], max_new_tokens=8) == loaded.generate(q, [mems], max_new_tokens=8)
    assert read_checkpoint_config(path)["extra"] == {"note": "x"}
    assert loaded.cfg == tiny_model.cfg


def test_run_folder_resolves_to_its_model(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "run" / "model")
    assert read_checkpoint_config(tmp_path / "run")["model"]["base"] == "tiny"


def test_a_failed_overwrite_keeps_the_earlier_checkpoint_and_leaves_no_temp(tiny_model, docs, tmp_path, monkeypatch):
    import clara.model.checkpoint as ck

    path = save_checkpoint(tiny_model, tmp_path / "c")
    save_checkpoint(tiny_model, path)  # an overwrite that succeeds leaves nothing beside it either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    before = tiny_model.compress(docs[:1])[0]
    with torch.no_grad():
        tiny_model.special.add_(1.0)  # the model the failing write would have saved: other memories
    assert not torch.equal(tiny_model.compress(docs[:1])[0], before)

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tiny_model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert torch.equal(load_checkpoint(path).compress(docs[:1])[0], before)


def test_the_next_write_repairs_what_a_killed_writer_left(tiny_model, docs, tmp_path, monkeypatch):
    """SIGKILL between moving the earlier checkpoint aside and renaming the new one in: the name is gone, the
    earlier folder sits at .c.old and a temporary folder is left. The next write (here one that fails) puts the
    earlier checkpoint back and sweeps the leftovers."""
    import clara.model.checkpoint as ck

    path = save_checkpoint(tiny_model, tmp_path / "c")
    before = tiny_model.compress(docs[:1])[0]
    path.rename(tmp_path / ".c.old")
    (tmp_path / ".c.k1ll3dxx.tmp" / "adapters").mkdir(parents=True)  # mkdtemp's name: 8 random characters
    (tmp_path / ".c.v2.k1ll3dxx.tmp").mkdir()  # a writer of the checkpoint "c.v2": not this one's to sweep
    with torch.no_grad():
        tiny_model.special.add_(1.0)
    monkeypatch.setattr(ck, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(OSError):
        save_checkpoint(tiny_model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.v2.k1ll3dxx.tmp", "c"]
    assert torch.equal(load_checkpoint(path).compress(docs[:1])[0], before)


def test_a_checkpoint_is_never_written_over_a_folder_that_is_not_one(tiny_model, tmp_path):
    """An --out that names a parent folder (``releases`` for ``releases/mine``), a run folder or a file is refused
    before anything moves, and everything in it is kept; an empty folder or an earlier checkpoint is written over."""
    from clara.model.checkpoint import export_release

    (tmp_path / "releases" / "theirs").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="not a checkpoint .* would replace it and everything in it"):
        save_checkpoint(tiny_model, tmp_path / "releases")
    with pytest.raises(ValueError, match="notes.txt is a file"):
        save_checkpoint(tiny_model, tmp_path / "notes.txt")
    assert (tmp_path / "releases" / "theirs").is_dir() and (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "releases"]  # no temporary folder left
    (tmp_path / "empty").mkdir()
    first = save_checkpoint(tiny_model, tmp_path / "empty")
    with pytest.raises(ValueError, match="not a checkpoint"):
        export_release(first, tmp_path / "releases")
    assert export_release(first, first) == first and load_checkpoint(first) is not None  # its own folder: fine


def test_publish_flushes_the_data_before_the_name(tmp_path, monkeypatch):
    """A rename reaches the disk before unflushed data can, so after a power loss the final name could hold an
    empty file; publish flushes every file, then renames, then flushes the folder holding the name."""
    import os

    from clara import atomic

    tmp = tmp_path / ".out.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "a.bin").write_bytes(b"a")
    (tmp / "b.json").write_text("{}")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    atomic.publish(tmp, tmp_path / "out")
    renamed = events.index(("replace", str(tmp_path / "out")))
    flushed_before = {p for kind, p in events[:renamed] if kind == "fsync"}
    assert flushed_before == {str(tmp), str(tmp / "sub"), str(tmp / "sub" / "a.bin"), str(tmp / "b.json")}
    assert events[renamed + 1:] == [("fsync", str(tmp_path))]
    assert (tmp_path / "out" / "sub" / "a.bin").read_bytes() == b"a"


def test_bad_checkpoints_fail_clearly(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a clara checkpoint"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(tiny_model, tmp_path / "c")
    meta = json.loads((path / "clara.json").read_text())
    meta["format"] = "something-else"
    (path / "clara.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_checkpoint(path)
    path = save_checkpoint(tiny_model, tmp_path / "d")
    (path / "adapters" / "generator" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="generator"):
        load_checkpoint(path)


def test_loads_in_another_dtype(tiny_model, docs, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "c")
    bf16 = load_checkpoint(path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    ref = tiny_model.compress(docs[:1])[0]
    got = bf16.compress(docs[:1])[0].float()
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpoint_loads_on_gpu(tiny_model, docs, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "c")
    gpu = load_checkpoint(path, device="cuda", dtype="float32")
    assert gpu.device.type == "cuda"
    for a, b in zip(tiny_model.compress(docs), gpu.compress(docs)):
        assert torch.allclose(a, b.cpu(), atol=1e-4)
    path2 = save_checkpoint(gpu, tmp_path / "from-gpu")
    back = load_checkpoint(path2, device="cpu")
    assert torch.allclose(back.compress(docs[:1])[0], tiny_model.compress(docs[:1])[0], atol=1e-4)


def test_a_vocab_readout_survives_the_round_trip_and_old_configs_read_as_states(docs, tmp_path):
    from clara.config import preset
    from clara.model import ClaraModel

    from conftest import perturb

    model = ClaraModel.build(preset("tiny", compression_rate=16, memory_readout="vocab", readout_temperature=0.5))
    perturb(model)
    path = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(path)
    assert loaded.cfg.memory_readout == "vocab" and loaded.cfg.readout_temperature == 0.5
    for a, b in zip(model.compress(docs), loaded.compress(docs)):
        assert torch.equal(a, b)
    # a checkpoint written before the option existed has no such field: it is read as the paper's states
    cfg_file = path / "clara.json"
    raw = json.loads(cfg_file.read_text())
    for key in ("memory_readout", "readout_temperature"):
        raw["model"].pop(key)
    cfg_file.write_text(json.dumps(raw))
    assert load_checkpoint(path).cfg.memory_readout == "states"


def _products(path, name):
    from safetensors.torch import load_file

    state = load_file(path / "adapters" / name / "adapter_model.safetensors")
    return {k: state[k.replace(".lora_A.", ".lora_B.")].double() @ state[k].double() for k in state if ".lora_A." in k}


def test_averaging_checkpoints_averages_each_layers_product_and_the_special_rows(tmp_path, docs):
    from clara.config import preset
    from clara.model import ClaraModel
    from clara.model.checkpoint import average_checkpoints
    from tests.conftest import perturb

    a, b = (ClaraModel.build(preset("tiny", compression_rate=16)) for _ in range(2))
    perturb(a, seed=1)
    perturb(b, seed=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (n, pa), (_, pb) in zip(a.peft.named_parameters(), b.peft.named_parameters()):
            if ".query_reasoner." in n:  # trained in neither run: both keep the same untrained adapter
                pb.copy_(pa)
            elif "lora_A" in n:  # the two runs moved A as well (both models start from the same A)
                pb.add_(torch.randn(pb.shape, generator=gen) * 0.2)
    pa, pb = save_checkpoint(a, tmp_path / "a"), save_checkpoint(b, tmp_path / "b")

    residual = average_checkpoints([pa, pb], tmp_path / "avg", weights=[0.25, 0.75])
    want = {k: 0.25 * x + 0.75 * _products(pb, "generator")[k] for k, x in _products(pa, "generator").items()}
    got = _products(tmp_path / "avg", "generator")
    # two random rank-4 products add up to rank 8: the rank-4 refactoring keeps the best part of it, and the
    # error it reports is the one it makes
    err = (sum((got[k] - want[k]).pow(2).sum() for k in want) / sum(w.pow(2).sum() for w in want.values())) ** 0.5
    assert 0.01 < residual["generator"] < 1 and float(err) == pytest.approx(residual["generator"], rel=1e-4)
    assert residual["query_reasoner"] == 0.0
    avg = load_checkpoint(tmp_path / "avg")
    qa = {n: p for n, p in a.peft.named_parameters() if ".query_reasoner." in n}
    assert all(torch.equal(p, qa[n]) for n, p in avg.peft.named_parameters() if ".query_reasoner." in n)
    assert torch.allclose(avg.special, 0.25 * a.special + 0.75 * b.special)
    meta = read_checkpoint_config(tmp_path / "avg")
    assert [x["weight"] for x in meta["extra"]["averaged_from"]] == [0.25, 0.75]

    # all the weight on one checkpoint gives that checkpoint back
    assert average_checkpoints([pa, pb], tmp_path / "one", weights=[1.0, 0.0])["generator"] < 1e-6
    one = load_checkpoint(tmp_path / "one")
    for x, y in zip(a.compress(docs), one.compress(docs)):
        assert torch.allclose(x, y, atol=1e-5)


def test_averaging_refuses_what_is_not_one_model(tiny_model, tmp_path):
    from clara.config import preset
    from clara.model import ClaraModel
    from clara.model.checkpoint import average_checkpoints

    pa = save_checkpoint(tiny_model, tmp_path / "a")
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints([pa], tmp_path / "x")
    for bad in ([0.5, 0.6], [float("nan"), 0.5], [1.5, -0.5]):
        with pytest.raises(ValueError, match="summing to 1"):
            average_checkpoints([pa, pa], tmp_path / "x", weights=bad)
    other = save_checkpoint(ClaraModel.build(preset("tiny", compression_rate=4)), tmp_path / "rate4")
    with pytest.raises(ValueError, match="not a checkpoint of the same model"):
        average_checkpoints([pa, other], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # refused half-way (the generator's LoRA scale differs; the compressor was already averaged): an earlier
    # checkpoint at OUT stays as it was, and nothing else is left behind
    pb = save_checkpoint(tiny_model, tmp_path / "b")
    cfg_file = pb / "adapters" / "generator" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "lora_alpha": 99}))
    out = tmp_path / "out"
    average_checkpoints([pa, pa], out)
    before = checkpoint_digest(out)
    with pytest.raises(ValueError, match="generator adapters of .* have different configs"):
        average_checkpoints([pa, pb], out)
    assert checkpoint_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out", "rate4"]


def test_a_direction_the_average_does_not_use_stays_trainable(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from clara.model.checkpoint import average_checkpoints

    pa = save_checkpoint(tiny_model, tmp_path / "a")
    with torch.no_grad():  # the opposite run: every product is the negative of a's, so the average is zero
        for n, p in tiny_model.peft.named_parameters():
            if "lora_B" in n:
                p.neg_()
    pb = save_checkpoint(tiny_model, tmp_path / "b")
    average_checkpoints([pa, pb], tmp_path / "avg")
    a_state = load_file(pa / "adapters" / "generator" / "adapter_model.safetensors")
    state = load_file(tmp_path / "avg" / "adapters" / "generator" / "adapter_model.safetensors")
    assert all(float(v.abs().max()) == 0 for k, v in state.items() if ".lora_B." in k)
    # B = 0 with the first input's A, as a fresh LoRA: the product is zero and B still gets a gradient
    assert all(torch.equal(v, a_state[k].float()) for k, v in state.items() if ".lora_A." in k)
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if ".lora_A." in k)
