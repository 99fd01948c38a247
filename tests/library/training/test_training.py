import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clara.config import E2EConfig, OptimSettings, SCPConfig, TrainConfig, preset
from clara.data.corpus import read_corpus
from clara.data.records import QARecord, SCPRecord, load_qa_records, load_scp_records
from clara.model import ClaraModel
from clara.model.checkpoint import load_checkpoint, read_checkpoint_config
from clara.model.prompts import PARAPHRASE_USER, QA_SYSTEM
from clara.training.common import (
    Checkpointer,
    _flatten_optimizer,
    _unflatten_optimizer,
    batch_indices,
    warmup_cosine,
)
from clara.training.e2e import pick_candidates, recall_at_k, train_e2e
from clara.training.scp import build_examples, train_scp


def test_examples_from_records():
    qa = SCPRecord("qa", ["Who?", "When?"], ["Ann", "1990"], ["doc"])
    para = SCPRecord("paraphrase", [], ["reworded"], ["doc"])
    ex = build_examples([qa, para])
    assert ex[0].target == "Question: Who?\nAnswer: Ann\nQuestion: When?\nAnswer: 1990"
    assert ex[1].target == "reworded" and ex[1].users == PARAPHRASE_USER and len(PARAPHRASE_USER) >= 3
    inst = build_examples([SCPRecord("qa", ["Who?"], ["Ann", "Anne"], ["d1", "d2"]), para], stage="instruct")
    assert len(inst) == 1 and inst[0].target == "Ann" and inst[0].system == QA_SYSTEM
    assert "Who?" in inst[0].users[0] and "{documents}" in inst[0].users[0]


def test_warmup_cosine_schedule():
    f = warmup_cosine(100, 0.1, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55, abs=0.01)
    assert f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_batch_indices_cover_each_epoch_and_are_deterministic():
    cfg = TrainConfig(batch_size=3, grad_accum=2, seed=7)
    n = 12
    seen = [i for step in range(2) for micro in range(2) for i in batch_indices(step, micro, cfg, n)]
    assert sorted(seen) == list(range(n))  # 2 steps x 2 micro x 3 = one epoch, each example once
    assert batch_indices(5, 1, cfg, n) == batch_indices(5, 1, cfg, n)
    assert batch_indices(0, 0, cfg, n) != batch_indices(0, 0, TrainConfig(batch_size=3, seed=8), n)


def test_optimizer_state_round_trips_without_pickle():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    tensors, meta = _flatten_optimizer(opt.state_dict())
    json.dumps(meta)  # all JSON
    restored = _unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(restored)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][0][k]))


def tiny_scp_cfg(**train) -> SCPConfig:
    base = dict(batch_size=2, max_steps=4, checkpoint_every=2, seed=0, optim=OptimSettings(lr=5e-3))
    base.update(train)
    return SCPConfig(model=preset("tiny", compression_rate=16), train=TrainConfig(**base))


def test_scp_learns_and_logs_both_losses(fixtures, tmp_path):
    records = load_scp_records(fixtures / "scp.jsonl")[:4]
    cfg = tiny_scp_cfg(max_steps=30, checkpoint_every=100, grad_accum=2,
                       optim=OptimSettings(lr=1e-2, warmup_ratio=0.0))
    model = ClaraModel.build(cfg.model)
    logged = []
    final = train_scp(model, records, cfg, tmp_path / "run", callback=lambda s, m: logged.append((s, m)),
                      progress=False)
    assert [s for s, _ in logged] == list(range(1, 31))
    for _, m in logged:
        assert {"loss", "ce", "mse", "lr", "grad_norm", "steps_per_s", "docs_per_s", "real_ratio"} <= set(m)
        assert m["loss"] == pytest.approx(m["ce"] + 0.1 * m["mse"], rel=1e-4)
    first = sum(m["ce"] for _, m in logged[:3]) / 3
    last = sum(m["ce"] for _, m in logged[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert (final / "clara.json").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
    # A rerun of a finished run is a no-op that reloads its weights.
    t0 = time.perf_counter()
    train_scp(ClaraModel.build(cfg.model), records, cfg, tmp_path / "run", progress=False)
    assert time.perf_counter() - t0 < 5
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 30


def test_target_dropout_feeds_pads_and_keeps_the_labels(fixtures):
    """Target dropout changes what the generator is fed, never what it is scored on; at 0 it draws nothing, so
    the recipe without it is exactly what it was."""
    import random

    from clara.training.scp import compressed_lm_loss

    with pytest.raises(ValueError, match="target_dropout"):
        SCPConfig(target_dropout=1.0)
    model = ClaraModel.build(tiny_scp_cfg().model)
    examples = build_examples(load_scp_records(fixtures / "scp.jsonl")[:2], "scp")
    with torch.no_grad():
        rng_default, rng_zero = random.Random(3), random.Random(3)
        plain, _ = compressed_lm_loss(model, examples, 0.1, 64, rng_default)
        zero, _ = compressed_lm_loss(model, examples, 0.1, 64, rng_zero, target_dropout=0.0)
        assert torch.equal(plain, zero) and rng_default.random() == rng_zero.random()
        dropped, _ = compressed_lm_loss(model, examples, 0.1, 64, random.Random(3), target_dropout=0.5)
        assert not torch.isclose(plain, dropped)
        # the labels are the targets: feeding the targets themselves is the plain loss
        prompt, target = [model.prompter.prompt_ids("Say it:")], [model.prompter.target_ids("Paris is in France.", 64)]
        with model.adapter("generator"):
            same = model.response_loss(prompt, target, [[]], fed=target)
            assert torch.equal(same, model.response_loss(prompt, target, [[]]))
            pad = [[model.tokenizer.pad_token_id] * len(target[0])]
            assert not torch.isclose(same, model.response_loss(prompt, target, [[]], fed=pad))
            with pytest.raises(ValueError, match="lengths"):
                model.response_loss(prompt, target, [[]], fed=[target[0][:-1]])


def test_a_learned_mask_row_is_what_target_dropout_feeds_and_it_trains(fixtures, tmp_path, monkeypatch):
    """``dropout_mask = "learned"``: dropped response tokens are fed a ``<MASK>`` row of their own (not the pad id,
    SmolLM2's end-of-turn marker), that row gets gradients and is saved; a run continuing a checkpoint trained
    without it gains the row and keeps every other row."""
    import random
    from dataclasses import replace

    from clara.model.checkpoint import save_checkpoint
    from clara.model.special import MASK_TOKEN, continue_with, dropout_id
    from clara.training.scp import compressed_lm_loss

    with pytest.raises(ValueError, match="dropout_mask"):
        preset("tiny", dropout_mask="eos")
    with pytest.raises(ValueError, match="layout 'clara'"):
        preset("tiny", dropout_mask="learned", layout="ml-clara")
    plain = ClaraModel.build(tiny_scp_cfg().model)
    assert dropout_id(plain) == plain.tokenizer.pad_token_id and MASK_TOKEN not in plain.special_tokens
    model = ClaraModel.build(replace(tiny_scp_cfg().model, dropout_mask="learned"))
    n = model.cfg.n_mem_max
    assert model.special_tokens[-1] == MASK_TOKEN and model.special.shape[0] == n + 3
    assert dropout_id(model) == model.first_special_id + n + 2 != model.tokenizer.pad_token_id
    assert (model.enc_id, model.sep_id) == (plain.enc_id, plain.sep_id)
    fed_log = []  # what the generator is fed in place of its targets
    original = ClaraModel.response_loss
    monkeypatch.setattr(ClaraModel, "response_loss", lambda self, *a, fed=None, **kw: (
        fed_log.append(fed), original(self, *a, fed=fed, **kw))[1])
    examples = build_examples(load_scp_records(fixtures / "scp.jsonl")[:2], "scp")
    model.set_trainable(["compressor", "generator"], special=True)
    loss, _ = compressed_lm_loss(model, examples, 0.1, 64, random.Random(3), target_dropout=0.5)
    loss.backward()
    dropped = [t for row in fed_log[0] for t in row if t == dropout_id(model)]
    assert dropped and model.tokenizer.pad_token_id not in [t for row in fed_log[0] for t in row]
    assert model.special.grad[-1].abs().sum() > 0  # the mask row learns
    # saved and loaded with its row
    ck = save_checkpoint(model, tmp_path / "masked")
    again = load_checkpoint(ck)
    assert again.special_tokens == model.special_tokens and torch.equal(again.special, model.special.detach())
    # a checkpoint without the row, continued with it: the row is added after the others, which stay
    before = plain.special.detach().clone()
    continue_with(plain, replace(plain.cfg, dropout_mask="learned"))
    assert plain.special_tokens[-1] == MASK_TOKEN and plain.special.shape[0] == n + 3
    assert torch.equal(plain.special.detach()[:-1], before) and dropout_id(plain) == dropout_id(model)
    assert plain.tokenizer.convert_tokens_to_ids(MASK_TOKEN) == dropout_id(plain)
    resaved = load_checkpoint(save_checkpoint(plain, tmp_path / "continued"))
    assert resaved.special_tokens == plain.special_tokens


def test_salient_spans_are_names_and_numbers():
    from clara.text import salient_spans

    text = "Albert Einstein\nHe was born in Ulm in 1879. In 1921, he received the Nobel Prize for 3.5 reasons."
    assert [text[a:b] for a, b in salient_spans(text)] == ["Albert", "Einstein", "Ulm", "1879", "1921", "Nobel",
                                                           "Prize", "3.5"]
    assert salient_spans("it was small and the river was slow.") == []


def test_salient_weight_is_a_weighted_mean_of_the_token_losses(fixtures):
    """At 1 the SCP loss is exactly the plain mean (and nothing else is reported); above 1 it is the per-token
    CE weighted by ``salient_weights``, which marks exactly the tokens of the names and numbers."""
    import random

    from clara.model import prompts
    from clara.training.scp import Example, compressed_lm_loss, salient_weights

    with pytest.raises(ValueError, match="salient_weight"):
        SCPConfig(salient_weight=0.5)
    model = ClaraModel.build(tiny_scp_cfg().model)
    text = "Paris lies on the Seine. It had 2,100,000 people in 2020."
    target = model.prompter.target_ids(text, 64)
    w = salient_weights(model, text, target, 4.0)
    marked = model.tokenizer.decode([t for t, x in zip(target, w) if x == 4.0])
    assert "Paris" in marked and "Seine" in marked and "2020" in marked and "people" not in marked
    assert w[-1] == 1.0 and len(w) == len(target)  # EOS is an ordinary token
    examples = [Example(["Paris is the capital of France. It lies on the Seine."], (prompts.PARAPHRASE_USER[0],),
                        text)]
    with torch.no_grad():
        plain, parts = compressed_lm_loss(model, examples, 0.0, 64, random.Random(0))
        same, parts1 = compressed_lm_loss(model, examples, 0.0, 64, random.Random(0), salient_weight=1.0)
        assert torch.equal(plain, same) and "ce_plain" not in parts1
        weighted, parts4 = compressed_lm_loss(model, examples, 0.0, 64, random.Random(0), salient_weight=4.0)
        assert abs(parts4["ce_plain"] - parts["ce"]) < 1e-5
        mems = model.compress(examples[0].docs)
        row = model.prompter.prompt_ids(prompts.PARAPHRASE_USER[0].replace("{documents}",
                                                                  model.prompter.placeholders(mems[0].shape[0])))
        with model.adapter("generator"):
            per_token = model.response_loss([row], [target], [mems], reduction="none")
        wt = torch.tensor(w)
        assert abs(float((per_token * wt).sum() / wt.sum()) - parts4["ce"]) < 1e-4


def test_checkpointer_keeps_the_last_n(fixtures, tmp_path):
    records = load_scp_records(fixtures / "scp.jsonl")[:2]
    cfg = tiny_scp_cfg(max_steps=6, checkpoint_every=1, keep_checkpoints=2)
    train_scp(ClaraModel.build(cfg.model), records, cfg, tmp_path / "r", progress=False)
    assert Checkpointer(tmp_path / "r").steps() == [5, 6]


def test_a_step_checkpoint_rewrite_that_fails_keeps_the_earlier_one(tmp_path, monkeypatch):
    """Rewriting a step folder (a resume that went back past an unreadable one) goes through the same write as a
    checkpoint: the earlier folder stays whole until the new one is complete, a failed write leaves no trace, and a
    successful one sweeps what killed writers of other steps left (``.tmp`` and ``.old`` folders)."""
    import clara.training.common as common

    model = ClaraModel.build(tiny_scp_cfg().model)
    opt = torch.optim.AdamW([model.special], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck = Checkpointer(tmp_path / "r")
    first = ck.save(model, opt, sched, 3, {"stage": "scp"})
    real_save_file = common.save_file
    monkeypatch.setattr(common, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("No space left")))
    with pytest.raises(OSError, match="No space"):
        ck.save(model, opt, sched, 3, {"stage": "scp", "second": True})
    assert sorted(p.name for p in ck.root.iterdir()) == ["step-000003"]
    assert common.read_train_meta(first / "train_state")["extra"] == {"stage": "scp"}
    monkeypatch.setattr(common, "save_file", real_save_file)
    (ck.root / ".step-000002.k1ll3dxx.tmp").mkdir()
    (ck.root / ".step-000001.old" / "train_state").mkdir(parents=True)
    ck.save(model, opt, sched, 4, {"stage": "scp"})
    assert sorted(p.name for p in ck.root.iterdir()) == ["step-000003", "step-000004"]
    (ck.root / "step-000004" / "train_state" / "trainer_state.json").write_text("[]", encoding="utf-8")
    with pytest.warns(UserWarning, match="step-000004 is unreadable .*expected a JSON object, got list"):
        assert ck.restore(model, opt, sched, stage="scp") == 3  # valid JSON of the wrong shape: skipped, not a crash


def test_a_rerun_with_other_settings_or_data_is_refused_not_handed_the_old_model(fixtures, tmp_path):
    """Into a finished run folder (or one with step checkpoints), a run with another lr, rate or data must not get
    the old model back as if it had trained, nor continue it; a new checkpoint interval or more steps may."""
    import dataclasses

    records = load_scp_records(fixtures / "scp.jsonl")[:2]
    cfg = tiny_scp_cfg(max_steps=2, checkpoint_every=1)
    run = tmp_path / "r"
    train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False)
    other_lr = tiny_scp_cfg(max_steps=2, checkpoint_every=1, optim=OptimSettings(lr=1e-3))
    with pytest.raises(ValueError, match=r"other settings or data .*train\.optim\.lr 0\.005 -> 0\.001"):
        train_scp(ClaraModel.build(cfg.model), records, other_lr, run, progress=False)
    with pytest.raises(ValueError, match="the training data"):
        train_scp(ClaraModel.build(cfg.model), records[:1], cfg, run, progress=False)
    with pytest.raises(ValueError, match="the checkpoint it started from"):  # what --init names, by content
        train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False, start="0123456789abcdef")
    same = tiny_scp_cfg(max_steps=2, checkpoint_every=5)  # where and how often: the finished run is this one
    assert train_scp(ClaraModel.build(cfg.model), records, same, run, progress=False) == run / "model"
    moved = tmp_path / "elsewhere.jsonl"  # the same rows read from another path are the same data
    moved.write_bytes((fixtures / "scp.jsonl").read_bytes())
    assert train_scp(ClaraModel.build(cfg.model), load_scp_records(moved)[:2], cfg, run, progress=False) == run / "model"
    shutil.rmtree(run / "model")  # as if killed after its last step checkpoint: the step checkpoints decide
    rate = dataclasses.replace(cfg, model=preset("tiny", compression_rate=4))
    with pytest.raises(ValueError, match="step-000002 was trained with other settings .*compression_rate 16 -> 4"):
        train_scp(ClaraModel.build(rate.model), records, rate, run, progress=False)
    longer = tiny_scp_cfg(max_steps=3, checkpoint_every=1)  # more steps: the run goes on from step 2
    train_scp(ClaraModel.build(cfg.model), records, longer, run, progress=False)
    assert Checkpointer(run).steps() == [2, 3]
    shutil.rmtree(run / "model")
    with pytest.raises(ValueError, match="step-000003 is past this run's 2 steps"):  # not labelled as 2 steps
        train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False)


def test_a_setting_a_checkpoint_does_not_record_is_the_default_it_was_trained_as(fixtures, tmp_path):
    """A checkpoint from before a setting existed was trained as that setting's default: continuing it with the
    default is the same run, with another value it would train something else (here: a generator frozen from
    now on, which the lineage would report for every step)."""
    import dataclasses

    records = load_scp_records(fixtures / "scp.jsonl")[:2]
    cfg = tiny_scp_cfg(max_steps=2, checkpoint_every=1)
    run = tmp_path / "r"
    train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False)
    old_files = [run / "model" / "clara.json", *(run / "checkpoints").glob("step-*/train_state/trainer_state.json"),
                 *(run / "checkpoints").glob("step-*/model/clara.json")]
    for file in old_files:  # as written before the setting was added to the code
        meta = json.loads(file.read_text(encoding="utf-8"))
        del meta["extra"]["config"]["freeze_generator"]
        file.write_text(json.dumps(meta), encoding="utf-8")
    frozen = dataclasses.replace(cfg, freeze_generator=True)
    with pytest.raises(ValueError, match=r"model was trained with other settings .*freeze_generator \(not "
                                         r"recorded: trained as the default False\) -> True"):
        train_scp(ClaraModel.build(cfg.model), records, frozen, run, progress=False)
    assert train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False) == run / "model"
    shutil.rmtree(run / "model")  # as if killed after its last step checkpoint: the step checkpoints decide
    longer = dataclasses.replace(frozen, train=dataclasses.replace(cfg.train, max_steps=3))
    with pytest.raises(ValueError, match=r"step-000002 was trained with other settings .*freeze_generator"):
        train_scp(ClaraModel.build(cfg.model), records, longer, run, progress=False)
    train_scp(ClaraModel.build(cfg.model), records, dataclasses.replace(longer, freeze_generator=False), run,
              progress=False)
    assert Checkpointer(run).steps()[-1] == 3


def test_resume_refuses_another_run_and_survives_a_damaged_latest_checkpoint(fixtures, tmp_path):
    """A folder is one run: not resuming into step checkpoints, or resuming another stage's, is refused (retention
    would delete the new run's steps and a later resume continue the old one). A latest checkpoint cut off by a
    full disk is skipped for the one before it, and a cut-off metrics line is dropped, not a crash."""
    records = load_scp_records(fixtures / "scp.jsonl")[:2]
    cfg = tiny_scp_cfg(max_steps=3, checkpoint_every=1, keep_checkpoints=2)
    run = tmp_path / "r"
    train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False)
    shutil.rmtree(run / "model")  # as if killed after its last step checkpoint
    with pytest.raises(ValueError, match="holds step checkpoints of an earlier run"):
        train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False, resume=False)
    with pytest.raises(ValueError, match="step checkpoint of stage 'scp', not 'instruct'"):
        train_scp(ClaraModel.build(cfg.model), records, cfg, run, stage="instruct", progress=False)
    assert Checkpointer(run).steps() == [2, 3] and not (run / "model").exists()  # nothing lost by refusing

    (run / "checkpoints" / "step-000003" / "train_state" / "optimizer.safetensors").write_bytes(b"\0" * 10)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"step": 4, "lo')  # a line cut off mid-write
    with pytest.warns(UserWarning, match="step-000003 is unreadable"):
        train_scp(ClaraModel.build(cfg.model), records, cfg, run, progress=False)
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert read_checkpoint_config(run / "model")["extra"]["completed"]


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        if "base" in f.parts:
            continue
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clara.cli", *args]


@pytest.mark.slow  # a real process killed and restarted
def test_kill_and_resume_reaches_the_same_weights(fixtures, tmp_path):
    """SIGKILL a real training process after its first checkpoint; resuming must finish exactly as an
    uninterrupted run does (same data order, optimizer state, schedule and RNG), with one metrics line per step."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                               "train": {"keep_checkpoints": 3}}))
    args = ["train", "scp", "--data", str(fixtures / "scp.jsonl"), "--preset", "tiny", "--config", str(cfg),
            "--max-steps", "40", "--checkpoint-every", "5", "--batch-size", "4", "--lr", "0.005"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not Checkpointer(killed).steps():
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_at_kill = Checkpointer(killed).steps()
    assert steps_at_kill and not (killed / "model").exists(), "the run finished before it could be killed"
    assert max(steps_at_kill) < 40

    subprocess.run(_cli(*args, "--out", str(killed)), env=env, check=True, capture_output=True)
    straight = tmp_path / "straight"
    subprocess.run(_cli(*args, "--out", str(straight)), env=env, check=True, capture_output=True)

    a, b = _adapter_tensors(killed / "model"), _adapter_tensors(straight / "model")
    assert a.keys() == b.keys() and a
    # Two fresh CPU runs already differ by ~1e-7 in the loss (threaded float reductions); a wrong resume
    # (data order, optimizer moments, schedule) moves weights by ~lr = 5e-3 per step.
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    losses_a = [json.loads(l)["loss"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    losses_b = [json.loads(l)["loss"] for l in (straight / "metrics.jsonl").read_text().splitlines()]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)


def test_candidates_and_recall_helpers():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.2], [0.0, 0.5, 0.4, 0.3, 0.9]])
    cand = pick_candidates(scores, [[1], [0, 4]], 3)
    assert cand.tolist() == [[1, 0, 2], [0, 4, 1]]
    # First-stage negatives come before the query reasoner's own top; duplicates and positives are skipped.
    assert pick_candidates(scores, [[1], [0, 4]], 3, first=[[3, 1], [4, 2, 3]]).tolist() == [[1, 3, 0], [0, 4, 2]]
    assert pick_candidates(scores, [[1]], 4, first=[[1]])[0].tolist() == [1, 0, 2, 3]  # short list: filled by score
    picked = torch.tensor([[1, 2], [1, 2]])  # positions within the candidate rows
    assert recall_at_k(picked, cand, [[1], [0, 4]]) == pytest.approx((0.0 + 0.5) / 2)


def test_e2e_trains_query_reasoner_and_generator_only(fixtures, tmp_path):
    qa = load_qa_records(fixtures / "qa.jsonl")
    corpus = {d.id: d.full_text for d in read_corpus(fixtures / "corpus.jsonl")}
    model = ClaraModel.build(preset("tiny", compression_rate=16))
    from conftest import perturb

    perturb(model)
    docs = list(corpus.values())
    compressed_before = model.compress(docs)
    gen_before = [p.clone() for p in model._adapter_params["generator"]]
    special_before = model.special.detach().clone()
    cfg = E2EConfig(n_candidates=6, top_k=3, train=TrainConfig(batch_size=4, max_steps=6, checkpoint_every=3,
                                                                optim=OptimSettings(lr=1e-2)))
    logged = []
    final = train_e2e(model, qa, corpus, cfg, tmp_path / "e2e", callback=lambda s, m: logged.append(m),
                      progress=False)
    assert len(logged) == 6 and all(0.0 <= m["recall@3"] <= 1.0 for m in logged)
    # Compressor and the special rows are frozen; the generator moved.
    for a, b in zip(compressed_before, model.compress(docs)):
        assert torch.equal(a, b)
    assert torch.equal(special_before, model.special.detach())
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, model._adapter_params["generator"]))
    # The query reasoner started as the compressor and has moved away from it.
    assert not torch.allclose(model.compress(["Who created Python?"])[0],
                              model.encode_queries(["Who created Python?"])[0])
    reloaded = load_checkpoint(final)
    q = ["Who created Python?"]
    assert torch.equal(reloaded.encode_queries(q)[0], model.encode_queries(q)[0])


def test_e2e_rejects_gold_ids_missing_from_corpus(tmp_path):
    model = ClaraModel.build(preset("tiny"))
    qa = [QARecord("1", "q?", ["a"], ["nope"])]
    with pytest.raises(ValueError, match="not in the corpus"):
        train_e2e(model, qa, {"d": "text"}, E2EConfig(n_candidates=1, top_k=1), tmp_path, progress=False)


def test_e2e_refuses_another_runs_folder_before_compressing_its_pool(fixtures, tmp_path, monkeypatch):
    """The refusal comes before the document pool is compressed (hours on a large corpus), not after it."""
    from clara.training import e2e

    cfg = tiny_scp_cfg(max_steps=1, checkpoint_every=1)
    train_scp(ClaraModel.build(cfg.model), load_scp_records(fixtures / "scp.jsonl")[:1], cfg, tmp_path, progress=False)

    def pool(*a, **k):
        raise AssertionError("the pool was built before the folder was checked")

    monkeypatch.setattr(e2e, "_document_pool", pool)
    qa = load_qa_records(fixtures / "qa.jsonl")
    corpus = {d.id: d.full_text for d in read_corpus(fixtures / "corpus.jsonl")}
    with pytest.raises(ValueError, match="step checkpoint of stage 'scp', not 'e2e'"):
        train_e2e(ClaraModel.build(cfg.model), qa, corpus, E2EConfig(n_candidates=2, top_k=1), tmp_path,
                  progress=False)
    for meta in (tmp_path / "checkpoints").glob("step-*/train_state/*.json"):
        meta.write_text("{")  # none readable: said before the pool too
    with pytest.raises(ValueError, match="no readable step checkpoint"):
        train_e2e(ClaraModel.build(cfg.model), qa, corpus, E2EConfig(n_candidates=2, top_k=1), tmp_path,
                  progress=False)


def test_first_stage_candidates_are_computed_once_and_cached(fixtures, tmp_path, monkeypatch):
    from clara.retrieval import fusion
    from clara.training.e2e import first_stage_candidates

    qa = load_qa_records(fixtures / "qa.jsonl")
    corpus = {d.id: d.full_text for d in read_corpus(fixtures / "corpus.jsonl")}
    first = first_stage_candidates(qa, corpus, 4, tmp_path)
    assert len(first) == len(qa) and all(len(c) == 4 for c in first)
    # The hybrid first stage puts the gold passage of these easy questions first.
    assert sum(c[0] in r.gold_doc_ids for c, r in zip(first, qa)) >= len(qa) - 1
    assert len(list(tmp_path.glob("first-stage-*.json"))) == 1

    def refuse(*a, **k):
        raise AssertionError("the cached candidates should have been read back")

    monkeypatch.setattr(fusion, "HybridRetriever", refuse)
    assert first_stage_candidates(qa, corpus, 4, tmp_path) == first
    # Other data is another key: a changed corpus is not served stale candidates.
    with pytest.raises(AssertionError, match="cached"):
        first_stage_candidates(qa, {**corpus, "extra": "An extra passage."}, 4, tmp_path)
