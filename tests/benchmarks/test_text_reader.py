"""The text-reader experiment on the tiny model: it tunes the generator alone on raw-text QA, evaluates on the
probe's own gold-forced sets, and pairs the result with a probe of the memory with the signs it states."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "experiments"))


def _adapter(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.peft.named_parameters() if f".{name}." in k}


def test_the_text_reader_trains_the_generator_alone_and_is_paired_with_the_memory(tiny_model, tmp_path,
                                                                                  monkeypatch):
    import quality_probe
    import text_reader

    from clara.data.records import load_scp_records
    from clara.model.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setenv("CLARA_CACHE_DIR", str(tmp_path / "cache"))
    rows = [{"id": f"d{i}", "title": f"Town {i}", "text": f"Town {i} lies on river R{i} and has {i} bridges."}
            for i in range(8)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": f"q{i}", "question": f"How many bridges does Town {i} have?",
                                       "answers": [str(i)], "gold_doc_ids": [f"d{i}"]}) + "\n" for i in range(4)))
    data = tmp_path / "instruct.jsonl"  # three questions over passages read as text; a paraphrase row is no question
    three = [r["text"] for r in rows[4:7]]
    data.write_text(json.dumps({"data_type": "qa", "question": ["Which river is Town 5 on?", "How many bridges?"],
                                "answers": ["R5", "5"], "docs": three}) + "\n"
                    + json.dumps({"data_type": "paraphrase", "question": [], "answers": ["x"],
                                  "docs": [rows[0]["text"]]}) + "\n"
                    + json.dumps({"data_type": "qa", "question": ["Where is Town 1?"],  # one question: first answer
                                  "answers": ["on R1", "R1"], "docs": [rows[1]["text"]]}) + "\n")
    assert text_reader.qa_pairs(load_scp_records(data)) == [("Which river is Town 5 on?", three, "R5"),
                                                            ("How many bridges?", three, "5"),
                                                            ("Where is Town 1?", [rows[1]["text"]], "on R1")]
    tiny_model.reset_adapter("query_reasoner")
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    probe = quality_probe.probe(str(ckpt), dev, articles=None, k=3, max_new_tokens=4, parts="b", corpus=str(corpus))
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps(probe))

    out, saved = tmp_path / "reader.json", tmp_path / "reader"
    assert text_reader.main([str(ckpt), "--data", str(data), "--steps", "20", "--batch-size", "2", "--lr", "1e-2",
                             "--dev", str(dev), "--corpus", str(corpus), "--k", "3", "--max-new-tokens", "4",
                             "--amp", "off", "--save", str(saved), "--out", str(out),
                             "--against", str(probe_file)]) == 0
    result = json.loads(out.read_text())
    log = result["train"]
    assert result["train_pairs"] == 3 and result["generator"] == "fresh" and log[-1]["step"] == 20
    assert [x["step"] for x in log] == [10, 20] and all(0 < x["ce"] < 20 for x in log)
    before, after = load_checkpoint(ckpt), load_checkpoint(saved)
    for name, moved in (("generator", True), ("compressor", False)):
        a, b = _adapter(before, name), _adapter(after, name)
        assert a and a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a) == moved, name
    for part in ("text_forced", "closed_book"):
        assert all(0 <= result[part][m] <= 100 for m in ("cem", "em", "f1")) and result[part]["gold_answer_nll"] > 0
    assert result["question_ids"] == probe["question_ids"] and result["corpus_passages"] == 8
    gap = result["against"]["nll_memory_minus_text"]
    memory, text = probe["per_question"]["nll_clara_forced"], result["per_question"]["nll_text_forced"]
    assert gap["items"] == 4
    assert abs(gap["mean"] - sum(m - t for m, t in zip(memory, text)) / 4) < 1e-9
    f1 = result["against"]["f1_memory_minus_text"]
    assert abs(f1["mean"] - sum(m - t for m, t in zip(probe["per_question"]["f1_clara_forced"],
                                                        result["per_question"]["f1_text_forced"])) / 4) < 1e-9
    with pytest.raises(SystemExit, match="another k"):  # the same questions over other passage sets: not paired
        text_reader.main([str(saved), "--steps", "0", "--dev", str(dev), "--corpus", str(corpus), "--k", "2",
                          "--max-new-tokens", "2", "--out", str(tmp_path / "k2.json"), "--against", str(probe_file)])
