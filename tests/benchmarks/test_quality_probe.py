"""The quality probe end to end on the tiny model: every part runs and reports sane numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_probe_runs_all_parts_on_a_tiny_checkpoint(tiny_model, tmp_path, monkeypatch):
    import quality_probe

    from clara.data.corpus import Document
    from clara.data.mixes import heldout
    from clara.model.checkpoint import save_checkpoint

    monkeypatch.setenv("CLARA_CACHE_DIR", str(tmp_path / "cache"))
    held = [f"h{i}" for i in range(10_000) if heldout(Document(f"h{i}", "t", "x"))][:2]
    rows = [{"id": f"d{i}", "title": f"Town {i}", "text": f"Town {i} lies on river R{i} and has {i} bridges."}
            for i in range(8)] + [{"id": h, "title": f"Held {h}", "text": f"A held-out passage about lake {h}."}
                                  for h in held]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": f"q{i}", "question": f"How many bridges does Town {i} have?",
                                       "answers": [str(i)], "gold_doc_ids": [f"d{i}"]}) + "\n" for i in range(4)))
    tiny_model.reset_adapter("query_reasoner")  # an SCP checkpoint: its query reasoner was never trained
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")

    result = quality_probe.probe(str(ckpt), dev, articles=None, k=3, max_new_tokens=4, retrieval="pool",
                                 corpus=str(corpus))
    a = result["reconstruction"]
    assert a["passages"] == 2 and a["no_document"] > 0 and a["raw_document"] > 0 and a["memory"] > 0
    assert a["memory_other"] > 0 and a["generator_no_document"] > 0
    assert abs(a["memory_use"] - (a["memory_other"] - a["memory"])) < 1e-9
    g = result["generator"]
    assert set(g) == {"closed_book", "raw_text_forced", "clara_forced"}
    assert all(0 <= v <= 100 for s in g.values() for v in s.values())
    c = result["own_retrieval"]
    assert c["query_reasoner"] == "compressor copy (no e2e)" and 0 <= c["recall@5"] <= 100
    assert c["searched_passages"] <= 8
    assert any((tmp_path / "cache" / "probe").iterdir())  # baselines cached for the next checkpoint
    again = quality_probe.probe(str(ckpt), dev, articles=None, k=3, max_new_tokens=4, parts="b",
                                corpus=str(corpus))
    assert again["generator"]["raw_text_forced"] == g["raw_text_forced"]
    assert "quality probe" in quality_probe.table(result)
