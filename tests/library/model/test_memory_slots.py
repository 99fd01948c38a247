"""The options that keep memory slots from collapsing into one vector (docs/memory.md)."""

import random

import pytest
import torch

from clara.config import SCPConfig, init_model_config, preset
from clara.model import ClaraModel
from clara.model.memory import chunk_bounds, clara_row, initial_special_rows

from conftest import perturb

TEXT = ("Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891 and studied physics at the Sorbonne. "
        "She won the Nobel Prize in Physics in 1903 and in Chemistry in 1911.")


def build(**kw) -> ClaraModel:
    m = ClaraModel.build(preset("tiny", compression_rate=16, **kw))
    perturb(m)
    return m


def test_chunk_bounds_cover_the_text_in_order():
    for n_tok in (0, 3, 16, 37, 256):
        b = chunk_bounds(n_tok, 8)
        assert len(b) == 8 and b[0][0] == 0 and b[-1][1] == n_tok
        assert all(b[i][1] == b[i + 1][0] for i in range(7))
        assert max(e - a for a, e in b) - min(e - a for a, e in b) <= 1


def test_interleaved_slot_sees_only_its_chunk_and_those_before():
    """Changing a word in the last chunk moves only the last slots; with every slot after the text it moves all."""
    edited = TEXT.replace("1911", "1922")
    inter, after = build(memory_slots="interleaved"), build()
    n_tok = len(inter.tokenize_texts([TEXT], 256)[0])
    bounds = chunk_bounds(n_tok, inter.cfg.n_mem_max)
    first_changed = inter.tokenize_texts([TEXT], 256)[0]
    diff = next(i for i, (x, y) in enumerate(zip(first_changed, inter.tokenize_texts([edited], 256)[0])) if x != y)
    slot = next(j for j, (a, e) in enumerate(bounds) if a <= diff < e)
    assert slot > 0
    a, b = inter.compress([TEXT, edited])
    assert torch.equal(a[:slot], b[:slot])  # slots before the edited chunk cannot see it
    assert not torch.allclose(a[slot:], b[slot:])
    a2, b2 = after.compress([TEXT, edited])
    assert all(not torch.allclose(a2[j], b2[j]) for j in range(a2.shape[0]))


def test_interleaved_rows_place_each_memory_token_after_its_chunk():
    m = build(memory_slots="interleaved")
    tokens = list(range(10, 30))  # 20 text tokens, 16 slots at rate 16 with 256-token documents
    row, text_pos, mem_pos = clara_row(tokens, 4, m.cfg.memory_slots, m.enc_id, m.mem_ids)
    assert [row[p] for p in text_pos] == tokens
    assert [row[p] for p in mem_pos] == m.mem_ids[:4]
    assert mem_pos == [6, 12, 18, 24]  # <ENC> + 5 tokens, slot 0, 5 tokens, slot 1, …
    assert row[0] == m.enc_id and len(row) == 1 + 20 + 4


def test_chunk_means_are_the_mean_text_state_of_each_chunk():
    m = build(memory_slots="interleaved")
    with torch.no_grad(), m.adapter("compressor"):
        enc = m.encode_texts([TEXT], max_len=256)
        ids = m.tokenize_texts([TEXT], 256)[0]
        row, text_pos, mem_pos = clara_row(ids, m.cfg.n_mem_max, m.cfg.memory_slots, m.enc_id, m.mem_ids)
        hidden = m._decode_hidden(m.embed(torch.tensor([row])), torch.ones(1, len(row), dtype=torch.long))[0]
    for j, (a, e) in enumerate(chunk_bounds(len(ids), m.cfg.n_mem_max)):
        assert torch.allclose(enc.chunk_mean[0, j], hidden[text_pos[a:e]].mean(0), atol=1e-5)
        assert torch.allclose(enc.states[0, j], hidden[mem_pos[j]], atol=1e-5)
    assert bool(enc.chunk_used.all())


def test_chunk_alignment_is_not_met_by_collapse():
    """``align="mean"`` is zero when every slot equals the passage mean; ``"chunks"`` is not."""
    from clara.training.scp import alignment_mse

    m = build(memory_slots="interleaved")
    with torch.no_grad(), m.adapter("compressor"):
        enc = m.encode_texts([TEXT, TEXT[:60]], max_len=256)
    collapsed = enc.text_mean.unsqueeze(1).expand_as(enc.states).clone()
    enc.states, enc.mem_mean = collapsed, collapsed.mean(1)
    assert float(alignment_mse(enc, "mean")) == pytest.approx(0.0, abs=1e-10)
    assert float(alignment_mse(enc, "chunks")) > 1e-3
    enc.states = enc.chunk_mean.clone()
    assert float(alignment_mse(enc, "chunks")) == pytest.approx(0.0, abs=1e-10)


def test_chunk_alignment_trains_through_the_loss():
    from clara.training.scp import Example, compressed_lm_loss

    m = build(memory_slots="interleaved")
    m.set_trainable(["compressor", "generator"], special=True)
    ex = Example([TEXT], ("Background: {documents}",), "Curie was born in Warsaw.")
    loss, parts = compressed_lm_loss(m, [ex], 1.0, 32, random.Random(0), align="chunks")
    loss.backward()
    assert parts["mse"] > 0
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m._adapter_params["compressor"])


def test_orthogonal_rows_start_distinct_and_in_distribution():
    emb = torch.randn(500, 64) * 0.3 + 0.05
    rows = initial_special_rows(emb, 18, "orthogonal", seed=0)
    centred = rows - emb.mean(0)
    cos = torch.nn.functional.cosine_similarity(centred.unsqueeze(1), centred.unsqueeze(0), dim=-1)
    assert torch.allclose(cos, torch.eye(18), atol=1e-5)
    assert torch.allclose(centred.norm(dim=1), (emb - emb.mean(0)).norm(dim=1).mean().expand(18), rtol=1e-4)
    near = initial_special_rows(emb, 18, "mean", seed=0)
    off = ~torch.eye(18, dtype=torch.bool)
    near_cos = torch.nn.functional.cosine_similarity(near.unsqueeze(1), near.unsqueeze(0), dim=-1)[off]
    assert float(near_cos.mean()) > 0.5  # the old start: near-identical rows
    model = ClaraModel.build(preset("tiny", compression_rate=16, memory_init="orthogonal"))
    sp = model.special.detach() - model.input_embeddings.weight.detach().float().mean(0)
    cos = torch.nn.functional.cosine_similarity(sp.unsqueeze(1), sp.unsqueeze(0), dim=-1)
    assert torch.allclose(cos, torch.eye(len(sp)), atol=1e-4)
    with pytest.raises(ValueError, match="hidden size"):
        initial_special_rows(torch.randn(50, 8), 18, "orthogonal", seed=0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="memory_slots"):
        preset("tiny", memory_slots="between")
    with pytest.raises(ValueError, match="interleaved"):
        preset("tiny", memory_slots="interleaved", layout="ml-clara")
    with pytest.raises(ValueError, match="pooled"):
        preset("tiny", memory_slots="pooled", layout="ml-clara")
    with pytest.raises(ValueError, match="memory_init"):
        preset("tiny", memory_init="zeros")
    with pytest.raises(ValueError, match="align"):
        SCPConfig(align="slots")


def test_a_continued_checkpoint_may_change_its_slots_but_not_its_shape():
    loaded = preset("tiny", compression_rate=16)
    cfg = init_model_config(loaded, {"memory_slots": "interleaved"})
    assert cfg.memory_slots == "interleaved" and cfg.compression_rate == 16
    assert init_model_config(loaded, {"compression_rate": 16}).compression_rate == 16  # same value is fine
    with pytest.raises(ValueError, match="compression_rate"):
        init_model_config(loaded, {"compression_rate": 4})
    with pytest.raises(ValueError, match="unknown"):
        init_model_config(loaded, {"memory_slot": "interleaved"})


def test_stage_two_can_freeze_the_compressor(tmp_path):
    from clara.data.records import SCPRecord
    from clara.training.scp import train_scp
    from clara.config import TrainConfig

    m = build()
    before = [p.detach().clone() for p in m._adapter_params["compressor"]] + [m.special.detach().clone()]
    gen_before = [p.detach().clone() for p in m._adapter_params["generator"]]
    rec = SCPRecord(data_type="qa", questions=["Where was Curie born?"], answers=["Warsaw"], docs=[TEXT])
    cfg = SCPConfig(model=m.cfg, train=TrainConfig(batch_size=1, max_steps=2, checkpoint_every=10),
                    freeze_compressor=True)
    train_scp(m, [rec], cfg, tmp_path / "run", stage="instruct", progress=False)
    after = [p.detach() for p in m._adapter_params["compressor"]] + [m.special.detach()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(gen_before, m._adapter_params["generator"]))


def test_either_stage_can_freeze_the_generator(tmp_path):
    """The compressor and the special rows learn, the generator is left as it was given; and the option refuses
    the settings it contradicts."""
    from clara.data.records import SCPRecord
    from clara.training.scp import train_scp
    from clara.config import TrainConfig

    m = build()
    gen_before = [p.detach().clone() for p in m.adapter_parameters("generator")]
    comp_before = [p.detach().clone() for p in m.adapter_parameters("compressor")] + [m.special.detach().clone()]
    rec = SCPRecord(data_type="qa", questions=["Where was Curie born?"], answers=["Warsaw"], docs=[TEXT])
    cfg = SCPConfig(model=m.cfg, train=TrainConfig(batch_size=1, max_steps=2, checkpoint_every=10),
                    freeze_generator=True)
    train_scp(m, [rec], cfg, tmp_path / "run", stage="scp", progress=False)
    assert all(torch.equal(a, b.detach()) for a, b in zip(gen_before, m.adapter_parameters("generator")))
    comp_after = [p.detach() for p in m.adapter_parameters("compressor")] + [m.special.detach()]
    assert any(not torch.equal(a, b) for a, b in zip(comp_before[:-1], comp_after[:-1]))
    assert not torch.equal(comp_before[-1], comp_after[-1])

    with pytest.raises(ValueError, match="nothing would train"):
        SCPConfig(freeze_generator=True, freeze_compressor=True)
    with pytest.raises(ValueError, match="no other rate"):
        SCPConfig(freeze_generator=True, compressor_lr_scale=0.1)
    with pytest.raises(ValueError, match="blank reader"):
        SCPConfig(freeze_generator=True, fresh_generator=True)
    # stage 2 freezes the compressor by default; asking for the generator frozen instead trains the compressor
    inst = SCPConfig.for_stage("instruct", {"freeze_generator": True})
    assert inst.freeze_generator and not inst.freeze_compressor


def test_stage_two_can_train_the_compressor_at_a_fraction_of_the_rate(tmp_path):
    """One Adam step moves each weight by about its group's rate: the compressor's and the special rows' steps are
    the fraction of the generator's, and a run with two rates resumes from its step checkpoint."""
    from clara.data.records import SCPRecord
    from clara.training.scp import train_scp
    from clara.config import OptimSettings, TrainConfig

    m = build()
    parts = {"compressor": m.adapter_parameters("compressor"), "generator": m.adapter_parameters("generator"),
             "special": [m.special]}
    before = {k: [p.detach().clone() for p in ps] for k, ps in parts.items()}
    rec = SCPRecord(data_type="qa", questions=["Where was Curie born?"], answers=["Warsaw"], docs=[TEXT])
    train = TrainConfig(batch_size=1, max_steps=1, checkpoint_every=1, optim=OptimSettings(lr=1e-3, warmup_ratio=0))
    cfg = SCPConfig(model=m.cfg, train=train, freeze_compressor=False, compressor_lr_scale=0.01)
    train_scp(m, [rec], cfg, tmp_path / "run", stage="instruct", progress=False)
    step = {k: max(float((p.detach() - b).abs().max()) for p, b in zip(parts[k], before[k])) for k in parts}
    assert 0.5e-3 < step["generator"] <= 1.01e-3
    assert 0.5e-5 < step["compressor"] <= 1.01e-5 and 0.5e-5 < step["special"] <= 1.01e-5
    cfg.train.max_steps = 2
    train_scp(m, [rec], cfg, tmp_path / "run", stage="instruct", progress=False)  # the two groups' state loads

    with pytest.raises(ValueError, match="freeze_compressor"):
        SCPConfig(freeze_compressor=True, compressor_lr_scale=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SCPConfig(compressor_lr_scale=0.0)


def test_pooled_memory_is_each_chunks_mean_state_without_memory_tokens():
    m = build(memory_slots="pooled")
    tokens = list(range(10, 30))
    row, text_pos, mem_pos = clara_row(tokens, 4, "pooled", m.enc_id, m.mem_ids)
    assert row == [m.enc_id] + tokens and [row[p] for p in text_pos] == tokens and len(mem_pos) == 4
    assert not set(row) & set(m.mem_ids)
    with torch.no_grad(), m.adapter("compressor"):
        enc = m.encode_texts([TEXT], max_len=256)
        ids = torch.tensor([[m.enc_id] + m.tokenize_texts([TEXT], 256)[0]])
        hidden = m._decode_hidden(m.embed(ids), torch.ones_like(ids))[0]
    n = int(enc.n_mem[0])
    for j, (a, e) in enumerate(chunk_bounds(ids.shape[1] - 1, n)):
        assert torch.allclose(enc.memory[0, j], hidden[1 + a : 1 + e].mean(0), atol=1e-5)
    # a slot sees only its chunk and the text before it, as interleaved slots do
    a, b = m.compress([TEXT, TEXT.replace("1911", "1922")])
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[-1], b[-1])
    # a question shorter than its slots: the empty chunks are zero vectors, the others are not
    q = m.encode_queries(["Why?"])[0]
    assert q.shape[0] == m.cfg.n_mem_max and (q.abs().sum(-1) == 0).any() and (q.abs().sum(-1) > 0).any()


def test_pooled_memory_trains_the_compressor_through_the_loss():
    m = build(memory_slots="pooled")
    m.set_trainable(["compressor"])
    with m.adapter("compressor"):
        mem = m.encode_texts([TEXT], max_len=256).memory
    mem.sum().backward()
    grads = [p.grad for p in m.trainable_parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
