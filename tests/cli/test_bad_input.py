"""Every user mistake through the ``clara`` command: exit 2 and one line that names the file, line or option, never a
traceback. The table in docs/faults.md is this list (``test_the_docs_table_is_this_list``)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "faults.md"
LONG = " ".join(f"Sentence {i} is about Paris." for i in range(60))


def _tiny_checkpoint(tmp: Path) -> Path:
    from clara.config import preset
    from clara.model import ClaraModel
    from clara.model.checkpoint import save_checkpoint

    return save_checkpoint(ClaraModel.build(preset("tiny", compression_rate=16)), tmp / "ckpt")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def setup(case: str, t: Path) -> list[str]:
    """The command line of ``case``, with whatever files it needs written under ``t``."""
    good = _jsonl(t / "good.jsonl", [{"id": "a", "title": "A", "text": "Alpha is first."}])
    if case == "ingest: a row takes a split passage's id":
        c = _jsonl(t / "c.jsonl", [{"id": "a", "title": "A", "text": LONG}, {"id": "a#p1", "title": "B", "text": "Bob."}])
        return ["data", "ingest", "--corpus", str(c), "--out", str(t / "o.jsonl"), "--max-doc-tokens", "40"]
    if case == "ingest: NaN in an extra field":
        c = t / "c.jsonl"
        c.write_text('{"id": "a", "text": "Alpha.", "score": NaN}\n')
        return ["data", "ingest", "--corpus", str(c), "--out", str(t / "o.jsonl")]
    if case == "ingest: --out is a directory":
        return ["data", "ingest", "--corpus", str(good), "--out", str(t)]
    if case == "ingest: --out under a file":
        return ["data", "ingest", "--corpus", str(good), "--out", str(good / "o.jsonl")]
    if case == "ingest: --max-doc-tokens -1":
        return ["data", "ingest", "--corpus", str(good), "--out", str(t / "o.jsonl"), "--max-doc-tokens", "-1"]
    if case == "ingest: --preset bogus":
        return ["data", "ingest", "--corpus", str(good), "--out", str(t / "o.jsonl"), "--preset", "bogus"]
    if case == "model info: clara.json with a wrong type":
        ck = _tiny_checkpoint(t)
        meta = json.loads((ck / "clara.json").read_text())
        meta["model"]["compression_rate"] = "sixteen"
        (ck / "clara.json").write_text(json.dumps(meta))
        return ["model", "info", str(ck)]
    if case == "model info: clara.json not JSON":
        ck = _tiny_checkpoint(t)
        (ck / "clara.json").write_text('{"format": ')
        return ["model", "info", str(ck)]
    if case == "model paraphrase: truncated adapter":
        ck = _tiny_checkpoint(t)
        f = ck / "adapters" / "generator" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        return ["model", "paraphrase", str(ck), "--text", "Paris."]
    if case == "import ml-clara: config.json not JSON":
        (t / "rel").mkdir()
        (t / "rel" / "config.json").write_text("{oops")
        return ["import", "ml-clara", str(t / "rel"), "--out", str(t / "out")]
    if case == "import ml-clara: config.json with a wrong type":
        (t / "rel").mkdir()
        (t / "rel" / "config.json").write_text(json.dumps({"compr_rate": "16", "doc_max_length": 256, "lora_r": 16}))
        return ["import", "ml-clara", str(t / "rel"), "--out", str(t / "out")]
    if case == "import ml-clara: truncated adapters.pth":
        import torch

        (t / "rel").mkdir()
        (t / "rel" / "config.json").write_text(json.dumps({"compr_rate": 16, "doc_max_length": 256, "lora_r": 16,
                                                           "decoder_model_name": "tiny"}))
        torch.save({"w": torch.zeros(64, 64)}, t / "rel" / "adapters.pth")
        data = (t / "rel" / "adapters.pth").read_bytes()
        (t / "rel" / "adapters.pth").write_bytes(data[: len(data) // 2])
        return ["import", "ml-clara", str(t / "rel"), "--out", str(t / "out"), "--base", "tiny"]
    if case == "evaluate: gold_doc_ids is a string":
        ck = _tiny_checkpoint(t)
        corpus = _jsonl(t / "c.jsonl", [{"id": "abc", "title": "A", "text": "Alpha."}])
        qa = _jsonl(t / "qa.jsonl", [{"id": "q", "question": "What?", "answers": ["Alpha"], "gold_doc_ids": "abc"}])
        return ["evaluate", "--qa", str(qa), "--corpus", str(corpus), "--model", str(ck), "--out", str(t / "ev")]
    if case == "evaluate: --out is a file":
        return ["evaluate", "--qa", str(good), "--corpus", str(good), "--model", str(t), "--out", str(good)]
    if case == "compress: --rate other than the checkpoint's":
        # a corpus that is not there: the clash is said first, from the checkpoint's config, before any work
        return ["compress", "--model", str(_tiny_checkpoint(t)), "--corpus", str(t / "absent.jsonl"), "--rate", "4"]
    if case == "train scp: a --config table that is a number":
        cfg = t / "c.json"
        cfg.write_text(json.dumps({"train": 5}))
        return ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--preset", "tiny", "--config", str(cfg)]
    if case == "train scp: a --config lora that is a number":
        cfg = t / "c.json"
        cfg.write_text(json.dumps({"model": {"lora": 5}}))
        return ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--preset", "tiny", "--config", str(cfg)]
    if case == "train scp: --init with a clashing --length-mode":
        return ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--init", str(_tiny_checkpoint(t)),
                "--length-mode", "proportional"]
    if case == "train scp: --no-resume into an earlier run's checkpoints":
        args = ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--preset", "tiny", "--max-steps", "1",
                "--batch-size", "1", "--checkpoint-every", "1"]
        from clara.cli import app
        from typer.testing import CliRunner

        assert CliRunner().invoke(app, args).exit_code == 0
        return args + ["--no-resume"]
    if case == "train scp: another --lr into a finished run's folder":
        args = ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--preset", "tiny", "--max-steps", "1",
                "--batch-size", "1"]
        from clara.cli import app
        from typer.testing import CliRunner

        assert CliRunner().invoke(app, args + ["--lr", "0.01"]).exit_code == 0
        return args + ["--lr", "0.02"]
    if case == "data mix: a synthesized row without answers":
        (t / "synth").mkdir()
        _jsonl(t / "synth" / "train.jsonl", [{"data_type": "qa", "question": ["Q?"], "docs": ["d"], "doc_id": "a"}])
        return ["data", "mix", "--corpus", str(good), "--synth", str(t / "synth"), "--out", str(t / "mix")]
    if case == "data mix: --limit 0":
        return ["data", "mix", "--corpus", str(good), "--out", str(t / "mix"), "--limit", "0"]
    if case == "data version: data.dvc not YAML":
        (t / "data.dvc").write_text("outs: [\n")
        return ["data", "version", "--repo", str(t)]
    if case == "ask: --k 0":
        return ["ask", "--k", "0", "What?"]
    if case == "ask: --model a folder, not a model URI":
        return ["ask", "--model", str(t), "What?"]
    if case == "model release: --out a folder that is not a checkpoint":
        (t / "releases" / "other").mkdir(parents=True)  # what a release over the parent folder would delete
        return ["model", "release", str(_tiny_checkpoint(t)), "--out", str(t / "releases")]
    if case == "model average: checkpoints of two models":
        from clara.config import preset
        from clara.model import ClaraModel
        from clara.model.checkpoint import save_checkpoint

        other = save_checkpoint(ClaraModel.build(preset("tiny", compression_rate=4)), t / "rate4")
        return ["model", "average", str(_tiny_checkpoint(t)), str(other), "--out", str(t / "avg")]
    if case == "model paraphrase: --device gpu":
        return ["model", "paraphrase", str(_tiny_checkpoint(t)), "--text", "Alpha.", "--device", "gpu"]
    if case == "train scp: --device cuda where torch sees no GPU":
        return ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--preset", "tiny", "--device",
                "cuda:7"]
    if case == "train scp: a --config dtype bf16":
        (t / "c.json").write_text(json.dumps({"model": {"dtype": "bf16"}}))
        return ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--preset", "tiny", "--config",
                str(t / "c.json")]
    if case == "train scp: --checkpoint-every 0":
        return ["train", "scp", "--data", str(_scp(t)), "--out", str(t / "o"), "--preset", "tiny",
                "--checkpoint-every", "0"]
    if case == "train scp: --out is a file":
        return ["train", "scp", "--data", str(_scp(t)), "--out", str(good), "--preset", "tiny"]
    if case == "compress: --batch-size 0":
        return ["compress", "--model", str(t), "--corpus", str(good), "--batch-size", "0"]
    if case == "evaluate: --qa missing (said before any model loads)":
        return ["evaluate", "--qa", str(t / "absent.jsonl"), "--corpus", str(good), "--model", str(t / "no-model"),
                "--out", str(t / "ev")]
    if case == "evaluate: --rerank with a typo":
        return ["evaluate", "--qa", str(good), "--corpus", str(good), "--model", str(t), "--out", str(t / "ev"),
                "--rerank", "alwyas"]
    if case == "evaluate: --mode without --use-store":
        return ["evaluate", "--qa", str(_qa(t)), "--corpus", str(good), "--model", str(t), "--out", str(t / "ev"),
                "--mode", "dense"]
    if case == "evaluate: --rates not numbers":
        return ["evaluate", "--qa", str(_qa(t)), "--corpus", str(good), "--model", str(t), "--out", str(t / "ev"),
                "--rates", "16,abc"]
    if case == "evaluate: OUT/partial is a file of the user's":
        (t / "ev").mkdir()
        (t / "ev" / "partial").write_text("mine")
        return ["evaluate", "--qa", str(_qa(t)), "--corpus", str(good), "--model", str(_tiny_checkpoint(t)), "--out",
                str(t / "ev"), "--baselines", ""]
    if case == "synthesize: --dev-fraction 10":
        return ["synthesize", "--corpus", str(good), "--out", str(t / "syn"), "--teacher", "extractive",
                "--dev-fraction", "10"]
    if case == "synthesize: resuming another corpus's work":
        from clara.cli import app
        from typer.testing import CliRunner

        other = _jsonl(t / "other.jsonl", [{"id": "b", "title": "B", "text": "Beta is second."}])
        first = ["synthesize", "--corpus", str(other), "--out", str(t / "syn"), "--teacher", "extractive"]
        assert CliRunner().invoke(app, first).exit_code == 0
        return ["synthesize", "--corpus", str(good), "--out", str(t / "syn"), "--teacher", "extractive"]
    if case == "data mix: --kinds with a typo":
        return ["data", "mix", "--corpus", str(good), "--out", str(t / "mix"), "--kinds", "Simple"]
    if case == "store start: --datadir is a file":
        return ["store", "start", "--datadir", str(good)]
    if case == "store start: --datadir holds other files":
        return ["store", "start", "--datadir", str(t)]
    if case == "store builds: --database-url not a URL":
        return ["store", "builds", "--database-url", "localhost:5432/clara"]
    if case == "store builds: --database-url not PostgreSQL":
        return ["store", "builds", "--database-url", "sqlite:///clara.db"]
    raise KeyError(case)


def _qa(t: Path) -> Path:
    return _jsonl(t / "qa.jsonl", [{"id": "q", "question": "What?", "answers": ["Alpha"], "gold_doc_ids": ["a"]}])


def _scp(t: Path) -> Path:
    return _jsonl(t / "scp.jsonl", [{"data_type": "qa", "question": ["What is first?"], "answers": ["Alpha"],
                                     "docs": ["Alpha is first."]}])


# case -> (exit code, what the one line says)
CASES = {
    "ingest: a row takes a split passage's id": (2, "c.jsonl:2: id clash: 'a#p1' is already the id of a passage"),
    "ingest: NaN in an extra field": (2, "c.jsonl:1: bad field: 'score' holds NaN or Infinity"),
    "ingest: --out is a directory": (2, "is a directory; give a file path"),
    "ingest: --out under a file": (2, "is not a directory, so it cannot be created"),
    "ingest: --max-doc-tokens -1": (2, "Invalid value for '--max-doc-tokens': Input should be greater than or equal to 1"),
    "ingest: --preset bogus": (2, "unknown base model 'bogus'"),
    "model info: clara.json with a wrong type": (2, "bad model config: ModelConfig.compression_rate must be int"),
    "model info: clara.json not JSON": (2, "clara.json: not valid JSON"),
    "model paraphrase: truncated adapter": (2, "adapter_model.safetensors: unreadable safetensors file"),
    "import ml-clara: config.json not JSON": (2, "config.json: not valid JSON"),
    "import ml-clara: config.json with a wrong type": (2, "'compr_rate' must be a positive integer, got '16'"),
    "import ml-clara: truncated adapters.pth": (2, "adapters.pth: unreadable (truncated or not a torch file)"),
    "evaluate: gold_doc_ids is a string": (2, "qa.jsonl:1: field 'gold_doc_ids' must be a list of document ids"),
    "evaluate: --out is a file": (2, "exists and is not a directory"),
    "compress: --rate other than the checkpoint's": (2, "an index of it cannot change compression_rate"),
    "train scp: a --config table that is a number": (2, "expected a table/object of settings, got 5"),
    "train scp: a --config lora that is a number": (2, "ModelConfig.lora must be a table/object of LoraSettings fields"),
    "train scp: --init with a clashing --length-mode": (2, "a run continuing it cannot change length_mode"),
    "train scp: --no-resume into an earlier run's checkpoints": (2, "holds step checkpoints of an earlier run"),
    "train scp: another --lr into a finished run's folder": (2, "was trained with other settings or data than this "
                                                                "run's (train.optim.lr 0.01 -> 0.02)"),
    "data mix: a synthesized row without answers": (2, "train.jsonl:1: field 'answers' must be a list of strings"),
    "data mix: --limit 0": (2, "Invalid value for '--limit': Input should be greater than or equal to 1"),
    "data version: data.dvc not YAML": (2, "data.dvc: not valid YAML"),
    "ask: --k 0": (2, "Invalid value for '--k': Input should be greater than or equal to 1"),
    "ask: --model a folder, not a model URI": (2, "is not an MLflow model URI (models:/NAME@ALIAS"),
    "model release: --out a folder that is not a checkpoint": (2, "is a folder that is not a checkpoint (no clara.json "
                                                               "in it); writing the checkpoint there would replace it"),
    "model average: checkpoints of two models": (2, "rate4 is not a checkpoint of the same model as"),
    "model paraphrase: --device gpu": (2, "device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu', got 'gpu'"),
    "train scp: --device cuda where torch sees no GPU": (2, "device 'cuda:7': torch sees"),
    "train scp: a --config dtype bf16": (2, "dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got 'bf16'"),
    "train scp: --checkpoint-every 0": (2, "train settings out of range: checkpoint_every=0 (at least 1)"),
    "train scp: --out is a file": (2, "good.jsonl exists and is not a directory"),
    "compress: --batch-size 0": (2, "Invalid value for '--batch-size': Input should be greater than or equal to 1"),
    "evaluate: --qa missing (said before any model loads)": (2, "No such file or directory"),
    "evaluate: --rerank with a typo": (2, "evaluation settings: rerank 'alwyas' (known: auto, always, never)"),
    "evaluate: --mode without --use-store": (2, "--mode and --rerank choose how CLaRa searches a store build: add "
                                                "--use-store"),
    "evaluate: --rates not numbers": (2, "--rates '16,abc': expected compression rates separated by commas"),
    "evaluate: OUT/partial is a file of the user's": (2, "partial is a file; a partial evaluation is a folder: "
                                                        "give a new path"),
    "synthesize: --dev-fraction 10": (2, "dev_fraction=10.0 (a fraction in [0, 1): 1 would leave nothing to train on)"),
    "synthesize: resuming another corpus's work": (2, "holds 1 done document(s) this corpus does not have (e.g. 'b')"),
    "data mix: --kinds with a typo": (2, "kinds 'Simple': each must be one of simple, complex"),
    "store start: --datadir is a file": (2, "is a file, not a data folder; give a new or empty folder"),
    "store start: --datadir holds other files": (2, "is not a PostgreSQL data folder (no PG_VERSION) and is not empty"),
    "store builds: --database-url not a URL": (2, "the database URL is not a URL (expected postgresql://"),
    "store builds: --database-url not PostgreSQL": (2, "is not PostgreSQL; the store needs PostgreSQL with pgvector"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_mistake_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    from clara_flows.cli import main

    argv = setup(case, tmp_path)
    monkeypatch.setattr(sys, "argv", ["clara", *argv])
    monkeypatch.delenv("CLARA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    code, says = CASES[case]
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    if "│" not in err:  # typer's usage errors come in a box; ours are one line (after any progress bar of a load)
        assert err.count("error: ") == 1 and err[err.index("error: "):].strip().count("\n") == 0, err
    words = " ".join(re.sub(r"[│╭╮╰╯─]", " ", err).split())  # typer's usage errors come in a box
    assert says in words, err


def test_clara_debug_raises_the_users_mistake_with_its_traceback(tmp_path, monkeypatch):
    """Caught by a command (``fail``), the mistake is raised as itself under CLARA_DEBUG."""
    from clara.data.versioning import DataVersionError
    from clara_flows.cli import main

    monkeypatch.setattr(sys, "argv", ["clara", *setup("data version: data.dvc not YAML", tmp_path)])
    monkeypatch.setenv("CLARA_DEBUG", "1")
    with pytest.raises(DataVersionError, match="not valid YAML"):
        main()


def test_a_mistake_no_command_caught_is_reported_the_same_way(monkeypatch, capsys):
    """What reaches the entry point (a registry's refusal, a file error deep in a library call) is said as
    ``fail`` says it: one line, the message's lines joined, exit 2; CLARA_DEBUG raises it instead."""
    import clara_flows.cli as cli

    def app(**kwargs):
        raise ValueError("model 'x' has no version 9\n  (the registry has 1-3)")

    monkeypatch.setattr(cli, "build_app", lambda: app)
    monkeypatch.delenv("CLARA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: model 'x' has no version 9 (the registry has 1-3) "
                                       "(CLARA_DEBUG=1 shows the traceback)\n")
    monkeypatch.setenv("CLARA_DEBUG", "1")
    with pytest.raises(ValueError, match="no version 9"):
        cli.main()


def test_the_torchrun_entry_point_says_a_mistake_the_same_way(monkeypatch, capsys):
    """``python -m clara.cli`` (one process per GPU under torchrun) reports what no command caught as ``clara``
    does: one line and exit 2, not a traceback from every process."""
    import runpy

    import clara.cli

    def app():
        raise FileNotFoundError("no such checkpoint: /x\n(give a folder with clara.json)")

    monkeypatch.setattr(clara.cli, "app", app)
    monkeypatch.delenv("CLARA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("clara.cli", run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: no such checkpoint: /x (give a folder with clara.json) "
                                       "(CLARA_DEBUG=1 shows the traceback)\n")


def test_a_registry_command_says_a_server_that_does_not_answer(monkeypatch, capsys):
    """``clara promote`` against a tracking server that is down: the outage is said (and how to start it), not
    the registry's refusal of the version."""
    import requests
    from mlflow.exceptions import MlflowException

    import clara_flows.cli as cli
    from clara_flows import tracking

    def down(*a, **k):
        try:
            raise requests.ConnectionError("Failed to establish a new connection: [Errno 111] Connection refused")
        except requests.ConnectionError as exc:
            raise MlflowException("API request to http://127.0.0.1:5000/... failed") from exc

    monkeypatch.setattr(tracking, "client", lambda *a, **k: type("C", (), {"get_model_version": down})())
    monkeypatch.delenv("CLARA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.promote_cmd(version="3", reason="r", name="clara")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not answer; start it with" in err and "no version" not in err


def test_a_programming_error_keeps_its_traceback():
    from mlflow.exceptions import MlflowException

    from clara.cli import user_error
    from clara.store.builds import StoreUnavailable

    assert user_error(ValueError("x")) and user_error(IsADirectoryError("d")) and user_error(MlflowException("no"))
    assert user_error(StoreUnavailable("the database at 127.0.0.1:1 does not answer"))
    assert not user_error(TypeError("bug")) and not user_error(KeyError("bug"))


def test_the_docs_table_is_this_list():
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\| (.+?) \| (\d) \| `(.+)` \|", line.strip())
        if m:
            rows[m.group(1)] = (int(m.group(2)), m.group(3))
    assert rows == CASES
