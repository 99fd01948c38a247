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
    trained = result["reconstruction_trained"]  # the dev questions' gold passages, apart from the held-out ones
    assert trained["passages"] == 4 and trained["memory"] > 0 and trained["raw_document"] > 0
    spans = result["answer_spans"]
    assert spans["answers"] == 4 and spans["tokens"] >= 4 and spans["memory"] > 0 and spans["raw_document"] > 0
    assert abs(spans["memory_use"] - (spans["memory_other"] - spans["memory"])) < 1e-9
    g = result["generator"]
    assert set(g) == {"closed_book", "raw_text_forced", "clara_closed_book", "clara_forced"}
    assert all(0 <= v <= 100 for s in g.values() for v in s.values())
    n = result["answer_nll"]
    assert all(n[key] > 0 for key in ("closed_book", "raw_text_forced", "clara_forced", "clara_without_gold",
                                      "clara_closed_book"))
    assert abs(n["answer_use"] - (n["clara_without_gold"] - n["clara_forced"])) < 1e-9
    c = result["own_retrieval"]
    assert c["query_reasoner"] == "compressor copy (no e2e)" and 0 <= c["recall@5"] <= 100
    assert c["searched_passages"] <= 8
    assert any((tmp_path / "cache" / "probe").iterdir())  # baselines cached for the next checkpoint
    again = quality_probe.probe(str(ckpt), dev, articles=None, k=3, max_new_tokens=4, parts="b",
                                corpus=str(corpus))
    assert again["generator"]["raw_text_forced"] == g["raw_text_forced"]
    assert again["answer_nll"] == n  # the base model's NLLs come from the cache; CLaRa's are recomputed alike
    assert "quality probe" in quality_probe.table(result)
    d = result["slot_diversity"]
    assert d["passages"] == 2 and d["slots"] == tiny_model.cfg.n_mem_max
    assert -1 <= d["within_passage_cosine"] <= 1 and 1 <= d["effective_rank"] <= d["slots"]
    for ref in (d["text_chunks"], d["text_chunks_base"]):  # the passages' own chunk means, as the reference
        assert ref["passages"] == 2 and ref["slots"] == d["slots"]
    assert d["text_chunks"] != d["text_chunks_base"]  # the compressor's adapter changes the states it reads
    assert "own chunk-mean states (base weights, same rows)" in quality_probe.table(result)
    pq = result["per_question"]
    assert len(pq["nll_clara_forced"]) == len(pq["f1_clara_forced"]) == 4 == len(result["question_ids"])
    assert len(pq["clara_forced"]) == len(pq["clara_closed_book"]) == 4
    assert [e["clara"] for e in result["examples"]] == pq["clara_forced"][:len(result["examples"])]
    # the likelihood-only part gives the same likelihoods without generating anything
    quick = quality_probe.probe(str(ckpt), dev, articles=None, k=3, parts="n", corpus=str(corpus))
    assert quick["answer_nll"] == n and "generator" not in quick
    undecided = quality_probe.compare(quick, result)  # no answers generated: the F1 half of the rule is open
    assert undecided["f1_gain"] is None and undecided["better"] is None
    assert undecided["gold_answer_nll_gain"]["mean"] == 0
    same = quality_probe.compare(result, result)
    assert same["gold_answer_nll_gain"]["mean"] == 0 and not same["better"]


def test_the_text_reference_is_what_a_pooled_memory_is():
    """A pooled memory is, by construction, the compressor's chunk-mean states: the reference must give exactly
    its numbers (and the base weights' other ones), so it reads the chunks the slots stand for, under the adapter
    asked for."""
    import torch

    import quality_probe
    from clara.config import preset
    from clara.model import ClaraModel
    from conftest import perturb

    model = ClaraModel.build(preset("tiny", compression_rate=16, memory_slots="pooled"))
    perturb(model)
    texts = [f"Passage {i} tells of the river {chr(65 + i)} and the town beside it, founded in 18{i}0. " * 4
             for i in range(3)]
    refs, memory = quality_probe.text_chunk_means(model, texts, "compressor"), model.compress(texts)
    for got, want in zip(refs, memory):
        assert torch.allclose(got, want.float(), atol=1e-5)
    assert quality_probe.slot_diversity(refs) == quality_probe.slot_diversity(memory)
    base = quality_probe.text_chunk_means(model, texts, None)
    assert not torch.allclose(base[0], refs[0], atol=1e-5)


def test_answer_nll_scores_exactly_the_answer_tokens(tiny_model):
    """Checked against the causal LM's own forward: the NLL is over the answer's tokens, each predicted from the
    position before it, token-weighted across a batch of unequal lengths (padding never scored)."""
    import torch
    import torch.nn.functional as F

    from clara.eval.likelihood import answer_nll

    questions = ["Where is the tower?", "Who wrote the long book about the river and the sea?"]
    answers = ["Paris", "a writer of many books"]
    rows = [tiny_model.prompter.text_qa_prompt(q, []) for q in questions]
    got, each = answer_nll(tiny_model, rows, answers, None, None, batch_size=2)
    total, tokens, means = 0.0, 0, []
    with torch.no_grad(), tiny_model.adapter(None):
        for row, a in zip(rows, answers):
            target = tiny_model.tokenizer(a, add_special_tokens=False)["input_ids"]
            logits = tiny_model.base_model(input_ids=torch.tensor([row + target])).logits[0].float()
            nll = F.cross_entropy(logits[len(row) - 1: len(row) - 1 + len(target)], torch.tensor(target),
                                  reduction="sum").item()
            total += nll
            tokens += len(target)
            means.append(nll / len(target))
    assert abs(got - total / tokens) < 1e-4
    assert len(each) == 2 and all(abs(x - y) < 1e-4 for x, y in zip(each, means))
    one_by_one, each1 = answer_nll(tiny_model, rows, answers, None, None, batch_size=1)
    assert abs(got - one_by_one) < 1e-4 and all(abs(x - y) < 1e-4 for x, y in zip(each, each1))


def test_answer_spans_score_only_the_answers_tokens(tiny_model):
    """The span CE equals the passage's per-token reconstruction losses picked at the answer's tokens."""
    import torch

    import quality_probe
    from clara.model import prompts

    text, answer = "The Nile flows north into the Mediterranean Sea near Alexandria.", "Mediterranean Sea"
    got = quality_probe.answer_spans(tiny_model, [(text, answer), (text.replace("Nile", "Seine"), "Nile"),
                                                  ("Rome lies on the Tiber.", "Tiber")], batch_size=4)
    assert got["answers"] == 2  # "Nile" is not in the second passage: skipped
    enc = tiny_model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    at = text.index(answer)
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(answer) and b > at]
    target = tiny_model.prompter.target_ids(text, 1024)
    empty = [tiny_model.prompter.prompt_ids(prompts.PARAPHRASE_USER[0].format(documents=""))]
    with torch.no_grad(), tiny_model.adapter(None):
        losses = tiny_model.response_loss(empty, [target], [[]], reduction="none")
        assert abs(float(losses.mean()) - float(tiny_model.response_loss(empty, [target], [[]]))) < 1e-5
    third = tiny_model.prompter.target_ids("Rome lies on the Tiber.", 1024)
    enc3 = tiny_model.tokenizer("Rome lies on the Tiber.", add_special_tokens=False, return_offsets_mapping=True)
    idx3 = [i for i, (a, b) in enumerate(enc3["offset_mapping"]) if a < 22 and b > 17]
    with torch.no_grad(), tiny_model.adapter(None):
        l3 = tiny_model.response_loss(empty, [third], [[]], reduction="none")
    want = (float(losses[idx].sum()) + float(l3[idx3].sum())) / (len(idx) + len(idx3))
    assert got["tokens"] == len(idx) + len(idx3)
    assert abs(got["no_document"] - want) < 1e-4


def test_slot_diversity_tells_one_vector_written_n_times_from_distinct_ones():
    import torch

    import quality_probe

    gen = torch.Generator().manual_seed(0)
    collapsed = [torch.randn(1, 32, generator=gen).expand(8, 32) + 0.01 * torch.randn(8, 32, generator=gen)
                 for _ in range(6)]
    distinct = [torch.randn(8, 32, generator=gen) for _ in range(6)]
    c, d = quality_probe.slot_diversity(collapsed), quality_probe.slot_diversity(distinct)
    assert c["within_passage_cosine"] > 0.99 and c["effective_rank"] < 1.5
    assert abs(d["within_passage_cosine"]) < 0.2 and d["effective_rank"] > 6


def test_paired_bootstrap_and_the_release_rule():
    import quality_probe

    old = [2.0 + 0.1 * (i % 7) for i in range(150)]
    better = [x - 0.3 for x in old]
    b = quality_probe.paired_bootstrap(better, old)
    assert abs(b["mean"] - 0.3) < 1e-9 and b["low"] > 0.29 and b["items"] == 150
    noisy = [x + (0.5 if i % 2 else -0.5) for i, x in enumerate(old)]
    assert quality_probe.paired_bootstrap(noisy, old)["low"] < 0
    f1 = [0.5] * 150
    mk = lambda nll, f: {"question_ids": list(range(150)),
                         "per_question": {"nll_clara_forced": nll, "f1_clara_forced": f}}
    assert quality_probe.compare(mk(better, f1), mk(old, f1))["better"]
    assert not quality_probe.compare(mk(better, [0.4] * 150), mk(old, f1))["better"]  # F1 may not drop
