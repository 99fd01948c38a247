"""Teacher-free training sets (clara.data.mixes), the SCP target cap, mixed precision and pipeline profiles."""

from __future__ import annotations

import pytest
import torch

from clara.data.corpus import Document
from clara.data.mixes import drop_excluded, heldout, instruct_rows, qa_pairs, reconstruction_rows


def _corpus() -> list[Document]:
    docs = [Document(f"a{i}", f"Article {i}", f"Text of article {i}.") for i in range(6)]
    docs += [Document("long#p0", "Long", "First part.", parent_id="long"),
             Document("long#p1", "Long", "Second part.", parent_id="long")]
    return docs


def test_every_passage_reconstructs_itself_with_its_title():
    rows = reconstruction_rows(_corpus())
    assert len(rows) == 8
    assert all(r["data_type"] == "paraphrase" and r["answers"] == r["docs"] for r in rows)
    assert rows[-1]["answers"] == ["Long\nSecond part."] and rows[-1]["parent_id"] == "long"


def test_instruct_rows_put_gold_among_hard_negatives_from_other_articles():
    docs = _corpus()
    # The ranker puts the gold's sibling passage first: it must not become a "negative".
    rank = lambda qs, n: [["long#p1", "long#p0", "a3", "a4", "a5", "a1"][:n] for _ in qs]  # noqa: E731
    pairs = [{"question": f"Q{i}?", "answer": "part", "doc_id": "long#p0", "parent_id": "long"} for i in range(20)]
    rows = instruct_rows(pairs, docs, rank, k=4, seed=1)
    for r in rows:
        assert len(r["docs"]) == 4 and r["doc_ids"].count("long#p0") == 1 and "long#p1" not in r["doc_ids"]
        assert [d for d in r["doc_ids"] if d != "long#p0"] == ["a3", "a4", "a5"]  # the ranker's order, siblings out
        assert r["docs"][r["doc_ids"].index("long#p0")] == "Long\nFirst part."
    assert len({r["doc_ids"].index("long#p0") for r in rows}) > 1  # the gold's slot varies
    assert rows == instruct_rows(pairs, docs, rank, k=4, seed=1)  # seeded


def test_instruct_rows_fill_from_random_passages_and_check_gold_ids():
    docs = _corpus()
    pairs = [{"question": "Q?", "answer": "x", "doc_id": "a0", "parent_id": "a0"}]
    rows = instruct_rows(pairs, docs, lambda qs, n: [[] for _ in qs], k=5)
    assert len(rows[0]["doc_ids"]) == 5 and len(set(rows[0]["doc_ids"])) == 5
    with pytest.raises(ValueError, match="not in the corpus"):
        instruct_rows([{**pairs[0], "doc_id": "nope"}], docs, lambda qs, n: [[] for _ in qs])


def test_qa_pairs_take_the_chosen_kinds():
    rows = [{"data_type": "qa", "kind": "simple", "question": ["A?", "B?"], "answers": ["a", "b"], "doc_id": "d"},
            {"data_type": "qa", "kind": "complex", "question": ["C?"], "answers": ["c"], "doc_id": "d"},
            {"data_type": "paraphrase", "question": [], "answers": ["p"], "doc_id": "d"}]
    assert [p["answer"] for p in qa_pairs(rows)] == ["a", "b"]
    assert [p["answer"] for p in qa_pairs(rows, ("simple", "complex"))] == ["a", "b", "c"]


def test_qa_about_an_evaluation_set_is_left_out():
    rows = [{"data_type": "qa", "question": ["When was Paris founded?"], "answers": ["x"], "doc_id": "gold"},
            {"data_type": "qa", "question": ["Who built it?", "When did the Eiffel Tower open?"], "answers": ["y", "z"],
             "doc_id": "other"},
            {"data_type": "qa", "question": ["Who wrote Faust?"], "answers": ["Goethe"], "doc_id": "third"}]
    # the gold passage's row goes whatever it asks; another row goes for one question equal up to case/punctuation
    kept, dropped = drop_excluded(rows, ["when did the eiffel tower open"], ["gold"])
    assert [r["doc_id"] for r in kept] == ["third"] and dropped == 2
    assert drop_excluded(rows, [], []) == (rows, 0)


def test_training_mixes_leave_out_the_dev_set(tmp_path):
    import json

    from clara.data.corpus import atomic_write_lines, dumps
    from clara.stages import training_mixes

    docs = _corpus()
    corpus = tmp_path / "corpus.jsonl"
    atomic_write_lines(corpus, (dumps({"id": d.id, "title": d.title, "text": d.text,
                                       **({"parent_id": d.parent_id} if d.parent_id else {})}) for d in docs))
    synth = tmp_path / "synth"
    synth.mkdir()
    qa = [{"data_type": "qa", "kind": "simple", "question": [f"What is in article {i}?"], "answers": [f"article {i}"],
           "docs": [d.full_text], "doc_id": d.id} for i, d in enumerate(docs[:6])]
    (synth / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa), encoding="utf-8")
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"id": "q1", "question": "WHAT is in article 2", "answers": ["article 2"],
                               "gold_doc_ids": ["a4"]}) + "\n", encoding="utf-8")
    res = training_mixes(corpus, tmp_path / "mix", synth, k=2, exclude=dev)
    assert res["excluded_rows"] == 2  # a2 by its question, a4 by its gold passage
    asked = [json.loads(line)["question"][0] for line in (tmp_path / "mix" / "instruct.jsonl").open()]
    assert sorted(asked) == [f"What is in article {i}?" for i in (0, 1, 3, 5)]
    assert res["scp_rows"] == 8 + 4  # every passage still reconstructs itself
    # a rerun into the same folder that makes no stage-2 rows leaves no stage-2 file of the earlier mix behind
    again = training_mixes(corpus, tmp_path / "mix")
    assert again["instruct"] is None and not (tmp_path / "mix" / "instruct.jsonl").exists()


@pytest.mark.parametrize("row, message", [
    ({"data_type": "qa", "kind": "simple", "question": ["Q?"], "answer": "A", "docs": ["d"]}, "'doc_id'"),
    ({"data_type": "qa", "kind": "simple", "question": ["Q?"], "answers": [3], "docs": ["d"], "doc_id": "a0"},
     "'answers' must be a list of strings"),
    ({"data_type": "qa", "kind": "simple", "question": ["Q?"], "docs": ["d"], "doc_id": "a0"}, "'answers'"),
])
def test_a_bad_synthesized_row_is_named_by_file_and_line(tmp_path, row, message):
    """Synthesized rows are read as checked records: a bad one is an error at its line, not a KeyError (or a
    string answer split into characters) deep inside the mix or the evaluation."""
    import json

    from clara.data.records import RecordError
    from clara.eval.datasets import synth_qa
    from clara.stages import training_mixes

    docs = _corpus()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    synth = tmp_path / "synth"
    synth.mkdir()
    good = {"data_type": "qa", "kind": "simple", "question": ["Q?"], "answers": ["A"], "docs": ["d"], "doc_id": "a0"}
    for split in ("train", "dev"):
        (synth / f"{split}.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=f"train.jsonl:2: .*{message}"):
        training_mixes(corpus, tmp_path / "mix", synth, k=2)
    assert not (tmp_path / "mix").exists()
    with pytest.raises(RecordError, match=f"dev.jsonl:2: .*{message}"):
        synth_qa(synth, "dev")


def test_synthesized_rows_in_the_authors_spelling_are_read_whole(tmp_path):
    import json

    from clara.data.records import read_synth_rows

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"data_type": "qa", "question": "Where?", "answer": "Paris", "docs": ["d"],
                                "doc_id": "a0"}) + "\n", encoding="utf-8")
    (row,) = read_synth_rows(path)
    assert row["question"] == ["Where?"] and row["answers"] == ["Paris"]  # not ['W', 'h', ...]


def test_heldout_is_per_article_and_stable():
    docs = [Document(f"{i}#p{j}", "t", "x", parent_id=str(i)) for i in range(3000) for j in range(2)]
    held = [d for d in docs if heldout(d)]
    assert 20 < len(held) / 2 < 40  # ~1% of 3,000 articles
    assert all(heldout(Document(d.id.replace("#p0", "#p1"), "t", "x", parent_id=d.parent_id)) for d in held)


def test_long_targets_are_cut_without_eos(tiny_model):
    eos = tiny_model.tokenizer.eos_token_id
    short = tiny_model.prompter.target_ids("Paris.", 64)
    assert short[-1] == eos
    cut = tiny_model.prompter.target_ids("Paris is the capital of France. " * 20, 16)
    assert len(cut) == 16 and eos not in cut


def test_bf16_autocast_agrees_with_fp32(docs):
    from clara.config import preset
    from clara.model import ClaraModel
    from conftest import perturb

    losses = {}
    for amp in ("off", "bf16"):
        model = ClaraModel.build(preset("tiny", compression_rate=16, amp=amp))
        perturb(model)
        assert model.uses_amp == (amp == "bf16")
        mems = model.compress(docs)
        assert all(m.dtype == torch.float32 for m in mems)
        rows = [model.prompter.qa_prompt("Where is Paris?", [m.shape[0]]) for m in mems]
        with model.adapter("generator"):
            target = model.prompter.target_ids("France", 8)
            losses[amp] = model.response_loss(rows, [target] * 3, [[m] for m in mems]).item()
    assert losses["bf16"] == pytest.approx(losses["off"], rel=0.05)


def test_amp_setting_is_checked():
    from clara.config import preset

    with pytest.raises(ValueError, match="amp"):
        preset("tiny", amp="fp8")


def test_bf16_release_loads_and_answers_like_the_original(tiny_model, docs, tmp_path):
    from clara.model.checkpoint import export_release, load_checkpoint, read_checkpoint_config, save_checkpoint

    src = save_checkpoint(tiny_model, tmp_path / "ckpt")
    rel = export_release(src, tmp_path / "release", extra={"data_version": "abc"})
    meta = read_checkpoint_config(rel)
    assert meta["extra"]["adapter_dtype"] == "bfloat16" and meta["extra"]["data_version"] == "abc"
    size = lambda p: sum(f.stat().st_size for f in p.rglob("adapter_model.safetensors"))  # noqa: E731
    assert size(rel) < 0.6 * size(src)
    loaded = load_checkpoint(rel)
    a, b = tiny_model.compress(docs), loaded.compress(docs)
    assert all(torch.allclose(x, y, atol=0.05, rtol=0.05) for x, y in zip(a, b))


def test_a_reconstruction_share_keeps_a_stable_nested_subset():
    docs = [Document(f"d{i}", "t", f"text {i}") for i in range(4000)]
    quarter = {r["doc_id"] for r in reconstruction_rows(docs, 0.25)}
    half = {r["doc_id"] for r in reconstruction_rows(docs, 0.5)}
    assert 900 < len(quarter) < 1100 and 1850 < len(half) < 2150
    assert quarter < half  # a smaller share is a subset of a larger one
    assert quarter == {r["doc_id"] for r in reconstruction_rows(list(reversed(docs)), 0.25)}  # order-free
    assert len(reconstruction_rows(docs, 1.0)) == 4000
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="reconstruction share"):
            reconstruction_rows(docs, bad)


def test_a_bad_reconstruction_share_fails_before_the_corpus_is_read(tmp_path):
    from clara.stages import training_mixes

    with pytest.raises(ValueError, match="reconstruction share"):  # not the missing file's error
        training_mixes(tmp_path / "not-there.jsonl", tmp_path / "mix", reconstruction_share=1.5)
    assert not (tmp_path / "mix").exists()
