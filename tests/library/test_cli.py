import json

from typer.testing import CliRunner

from clara.cli import app

runner = CliRunner()


def test_train_scp_then_e2e_write_checkpoints(fixtures, tmp_path):
    out = tmp_path / "scp"
    res = runner.invoke(app, ["train", "scp", "--data", str(fixtures / "scp.jsonl"), "--out", str(out),
                              "--preset", "tiny", "--rate", "32", "--length-mode", "proportional",
                              "--max-steps", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "model" / "clara.json").read_text())
    assert meta["model"]["compression_rate"] == 32 and meta["model"]["length_mode"] == "proportional"
    assert meta["extra"]["completed"] and meta["extra"]["stage"] == "scp"

    res = runner.invoke(app, ["train", "e2e", "--data", str(fixtures / "qa.jsonl"), "--corpus",
                              str(fixtures / "corpus.jsonl"), "--init", str(out), "--out", str(tmp_path / "e2e"),
                              "--candidates", "5", "--top-k", "2", "--max-steps", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "e2e" / "model" / "clara.json").read_text())
    assert meta["extra"]["stage"] == "e2e" and meta["extra"]["config"]["top_k"] == 2

    res = runner.invoke(app, ["train", "instruct", "--data", str(fixtures / "scp.jsonl"), "--init", str(out),
                              "--out", str(tmp_path / "inst"), "--max-steps", "1", "--batch-size", "2"])
    assert res.exit_code == 0, res.output

    res = runner.invoke(app, ["model", "info", str(tmp_path / "e2e")])
    assert res.exit_code == 0 and '"stage": "e2e"' in res.output
    res = runner.invoke(app, ["model", "paraphrase", str(out), "--text", "Paris is in France.",
                              "--max-new-tokens", "4"])
    assert res.exit_code == 0 and "memory tokens: 1 x 64" in res.output


def test_bad_input_exits_with_a_located_message(fixtures, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"data_type": "qa", "question": ["q"], "answers": ["a"], "docs": ["d"]}\n{oops\n')
    res = runner.invoke(app, ["train", "scp", "--data", str(bad), "--out", str(tmp_path / "o"), "--preset", "tiny"])
    assert res.exit_code == 2
    assert "bad.jsonl:2: malformed JSON" in res.output
    res = runner.invoke(app, ["train", "scp", "--data", str(fixtures / "scp.jsonl"), "--out", str(tmp_path / "o"),
                              "--preset", "tiny", "--rate", "8"])
    assert res.exit_code == 2 and "compression_rate" in res.output, res.output


def test_scp_can_continue_from_a_checkpoint(fixtures, tmp_path):
    first = tmp_path / "a"
    args = ["train", "scp", "--data", str(fixtures / "scp.jsonl"), "--preset", "tiny", "--max-steps", "1",
            "--batch-size", "2"]
    assert runner.invoke(app, args + ["--out", str(first)]).exit_code == 0
    res = runner.invoke(app, ["train", "scp", "--data", str(fixtures / "scp.jsonl"), "--init", str(first),
                              "--out", str(tmp_path / "b"), "--max-steps", "1", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "scp", "--data", str(fixtures / "scp.jsonl"), "--init", str(first),
                              "--out", str(tmp_path / "c"), "--rate", "4"])
    assert res.exit_code == 2 and "cannot change compression_rate" in res.output
    # what shapes the weights is the checkpoint's: a clashing option is refused, not silently dropped
    # (a clashing --length-mode is a row of tests/cli/test_bad_input.py)
    res = runner.invoke(app, ["train", "scp", "--data", str(fixtures / "scp.jsonl"), "--init", str(first),
                              "--out", str(tmp_path / "d"), "--preset", "mistral-7b"])
    assert res.exit_code == 2 and "cannot change base" in res.output, res.output
    assert not (tmp_path / "d").exists()
