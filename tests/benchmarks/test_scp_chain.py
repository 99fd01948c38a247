"""The SCP chain on the tiny model: starts from its init, continues from its last checkpoint when lengthened,
refuses a different recipe, and records the lineage when exported as a release."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"))


def test_a_chain_continues_and_keeps_its_recipe(tiny_model, tmp_path, fixtures, monkeypatch):
    import scp_chain

    from clara.model.checkpoint import read_checkpoint_config, save_checkpoint

    init = save_checkpoint(tiny_model, tmp_path / "init")
    cfg = tmp_path / "chain.json"
    cfg.write_text(json.dumps({"model": {"memory_slots": "interleaved"}, "align": "chunks",
                               "train": {"batch_size": 2, "checkpoint_every": 1}}))
    chain = tmp_path / "chain"
    base = ["--chain", str(chain), "train", "--data", str(fixtures / "scp.jsonl"), "--init", str(init),
            "--config", str(cfg), "--prior-scp-steps", "7"]
    assert scp_chain.main(base + ["--steps", "2"]) == 0
    assert scp_chain.latest_checkpoint(chain)[1] == 2
    first = (chain / "run" / "metrics.jsonl").read_text().splitlines()
    assert scp_chain.main(base + ["--steps", "3"]) == 0  # lengthened: one more step, not three
    lines = (chain / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first and [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    saved = read_checkpoint_config(scp_chain.latest_checkpoint(chain)[0])
    assert saved["model"]["memory_slots"] == "interleaved" and saved["extra"]["config"]["align"] == "chunks"
    assert saved["extra"]["config"]["train"]["optim"]["min_lr_ratio"] == 1.0  # constant lr: stop anywhere
    cfg.write_text(json.dumps({"align": "mean"}))
    with pytest.raises(SystemExit, match="another chain's settings"):
        scp_chain.main(base + ["--steps", "4"])

    # stage 2 on top, then exported as a release with its lineage
    from clara.training.scp import train_scp
    from clara.config import SCPConfig, TrainConfig
    from clara.data.records import load_scp_records
    from clara.model.checkpoint import load_checkpoint

    scp_ck = scp_chain.latest_checkpoint(chain)[0]
    model = load_checkpoint(scp_ck)
    final = train_scp(model, load_scp_records(fixtures / "scp.jsonl"),
                      SCPConfig(model=model.cfg, train=TrainConfig(batch_size=1, max_steps=1), freeze_compressor=True),
                      tmp_path / "inst", stage="instruct", progress=False)
    out = tmp_path / "release"
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(final), "--scp-checkpoint",
                           str(scp_ck), "--out", str(out), "--data-version", "corpus-x",
                           "--init-lineage", json.dumps([{"stage": "scp", "steps": 7}]),
                           "--note", "dev_excluded=dev.jsonl"]) == 0
    assert read_checkpoint_config(out)["extra"]["dev_excluded"] == "dev.jsonl"
    lineage = read_checkpoint_config(out)["extra"]["lineage"]
    assert [(s["stage"], s["steps"]) for s in lineage] == [("scp", 7), ("scp", 3), ("instruct", 1)]
    assert lineage[-1]["freeze_compressor"] is True and lineage[1]["data"] == "corpus-x"
    assert scp_chain.prior_scp_steps(out) == 10

    # Exported in place over the chain's own init (as the shipped release is replaced): the chain goes on counting
    # from what the init was when it started, not from the new release's lineage, which holds the chain's steps.
    import shutil

    shutil.rmtree(init)
    shutil.copytree(out, init)
    cfg.write_text(json.dumps({"model": {"memory_slots": "interleaved"}, "align": "chunks",
                               "train": {"batch_size": 2, "checkpoint_every": 1}}))
    assert scp_chain.main(base + ["--steps", "4"]) == 0
    assert [json.loads(x)["step"] for x in (chain / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    scp_ck = scp_chain.latest_checkpoint(chain)[0]
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(final), "--scp-checkpoint",
                           str(scp_ck), "--out", str(out), "--data-version", "corpus-x"]) == 0
    lineage = read_checkpoint_config(out)["extra"]["lineage"]
    assert [(s["stage"], s["steps"]) for s in lineage] == [("scp", 7), ("scp", 4), ("instruct", 1)]
    # a chain step released as it is (no stage 2 on top) is its own --scp-checkpoint; alone it is refused
    with pytest.raises(SystemExit, match="stage-1 checkpoint"):
        scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(scp_ck), "--out", str(out),
                        "--data-version", "corpus-x"])
    with pytest.raises(SystemExit, match="drop --instruct-from"):
        scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(scp_ck), "--scp-checkpoint",
                        str(scp_ck), "--instruct-from", str(final), "--out", str(out), "--data-version", "corpus-x"])
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(scp_ck), "--scp-checkpoint",
                           str(scp_ck), "--out", str(out), "--data-version", "corpus-x"]) == 0
    lineage = read_checkpoint_config(out)["extra"]["lineage"]
    assert [(s["stage"], s["steps"]) for s in lineage] == [("scp", 7), ("scp", 4)]
    # a stage 2 that continued another (two runs, another data order): one lineage entry per run, oldest first
    again = train_scp(load_checkpoint(final), load_scp_records(fixtures / "scp.jsonl"),
                      SCPConfig(model=model.cfg, train=TrainConfig(batch_size=1, max_steps=2, seed=1),
                                freeze_compressor=True), tmp_path / "inst2", stage="instruct", progress=False)
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(again), "--scp-checkpoint",
                           str(scp_ck), "--instruct-from", str(final), "--out", str(out), "--data-version",
                           "corpus-x"]) == 0
    lineage = read_checkpoint_config(out)["extra"]["lineage"]
    assert [(s["stage"], s["steps"], s.get("seed")) for s in lineage[-2:]] == [("instruct", 1, 0), ("instruct", 2, 1)]
    # a stage 2 that continued the release itself (no chain steps), the compressor at a fraction of the rate
    before = lineage
    on_release = train_scp(load_checkpoint(out), load_scp_records(fixtures / "scp.jsonl"),
                           SCPConfig(model=model.cfg, train=TrainConfig(batch_size=1, max_steps=1, seed=2),
                                     compressor_lr_scale=0.1), tmp_path / "inst3", stage="instruct", progress=False)
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(on_release), "--out", str(out),
                           "--data-version", "corpus-y"]) == 0
    lineage = read_checkpoint_config(out)["extra"]["lineage"]
    assert lineage[:-1] == before and lineage[-1]["compressor_lr_scale"] == 0.1
    assert (lineage[-1]["stage"], lineage[-1]["freeze_compressor"], lineage[-1]["data"]) == ("instruct", False,
                                                                                            "corpus-y")
    # the weight average of the release and a stage 2 on top of it: its lineage adds the stage 2, then the average
    from clara.model.checkpoint import average_checkpoints, checkpoint_digest

    before = lineage
    on_top = train_scp(load_checkpoint(out), load_scp_records(fixtures / "scp.jsonl"),
                       SCPConfig(model=model.cfg, train=TrainConfig(batch_size=1, max_steps=1, seed=3)),
                       tmp_path / "inst4", stage="instruct", progress=False)
    average_checkpoints([out, on_top], tmp_path / "avg")
    digests = [checkpoint_digest(out), checkpoint_digest(on_top)]
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(tmp_path / "avg"), "--instruct-from",
                           str(on_top), "--out", str(out), "--data-version", "corpus-y"]) == 0
    lineage = read_checkpoint_config(out)["extra"]["lineage"]
    assert lineage[:-2] == before and lineage[-2]["seed"] == 3
    assert {k: lineage[-1][k] for k in ("stage", "steps", "weights", "of")} == {
        "stage": "average", "steps": 0, "weights": [0.5, 0.5], "of": digests}
    assert "parents" not in lineage[-1]  # the stage 2 recorded no stages of its own: the lineage stays one line
    # stage 2 on that release, its lineage stamped on a copy (--after: the checkpoint it started from), then the
    # average of the two: each input records its stages, so the lineage is one entry that holds both
    on_top = train_scp(load_checkpoint(out), load_scp_records(fixtures / "scp.jsonl"),
                       SCPConfig(model=model.cfg, train=TrainConfig(batch_size=1, max_steps=1, seed=4)),
                       tmp_path / "inst5", stage="instruct", progress=False)
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(on_top), "--after", str(out),
                           "--out", str(tmp_path / "stamped"), "--data-version", "corpus-y"]) == 0
    stamped = read_checkpoint_config(tmp_path / "stamped")["extra"]["lineage"]
    assert stamped[:-1] == lineage and stamped[-1]["seed"] == 4
    average_checkpoints([out, tmp_path / "stamped"], tmp_path / "avg2", weights=[0.25, 0.75])
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(tmp_path / "avg2"), "--out", str(out),
                           "--data-version", "corpus-y"]) == 0
    (entry,) = read_checkpoint_config(out)["extra"]["lineage"]
    assert (entry["stage"], entry["weights"], entry["parents"]) == ("average", [0.25, 0.75], [lineage, stamped])
    assert scp_chain.prior_scp_steps(out) == scp_chain.scp_steps(lineage) > 0
    # an average of that (not exported) average and the stamped copy: the inner one's inputs are kept as its parents
    average_checkpoints([tmp_path / "avg2", tmp_path / "stamped"], tmp_path / "avg3")
    with pytest.raises(SystemExit, match="without --scp-checkpoint"):
        scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(tmp_path / "avg3"), "--scp-checkpoint",
                        str(scp_ck), "--out", str(tmp_path / "x"), "--data-version", "corpus-y"])
    assert scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(tmp_path / "avg3"), "--out",
                           str(tmp_path / "rel3"), "--data-version", "corpus-y"]) == 0
    (outer,) = read_checkpoint_config(tmp_path / "rel3")["extra"]["lineage"]
    assert outer["parents"][1] == stamped and outer["parents"][0][0]["parents"] == [lineage, stamped]
    bare = save_checkpoint(tiny_model, tmp_path / "bare")  # no lineage to continue
    with pytest.raises(SystemExit, match="no lineage"):
        scp_chain.main(["--chain", str(chain), "release", "--checkpoint", str(on_release), "--out", str(bare),
                        "--data-version", "corpus-y"])
    assert "| cumulative_scp_steps |" in scp_chain.curve_table([{"cumulative_scp_steps": 10, "slot_cosine": 0.5}])


def test_an_average_counts_the_scp_steps_and_generations_of_its_longest_parent():
    import scp_chain

    line = [{"stage": "scp", "steps": 280}, {"stage": "instruct", "steps": 150}]
    chained = line + [{"stage": "scp", "steps": 450}, {"stage": "instruct", "steps": 600}]
    nested = [{"stage": "average", "steps": 0, "parents": [line, chained]}]
    outer = [{"stage": "average", "steps": 0, "parents": [nested, line]}, {"stage": "instruct", "steps": 600}]
    assert [scp_chain.scp_steps(x) for x in (line, chained, nested, outer)] == [280, 730, 730, 730]
    assert [scp_chain.generations(x) for x in (line, chained, nested, outer)] == [2, 4, 5, 7]
