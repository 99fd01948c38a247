import pytest

from clara.eval.metrics import answer_scores, cover_exact_match, exact_match, recall_at, token_f1
from clara.text import normalize_answer


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a   cat, an owl; the END. ", "cat owl end"),
    ("Théâtre “Royal”", "théâtre royal"),
    ("", ""),
])
def test_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("the Paris.", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0


def test_cover_exact_match():
    assert cover_exact_match("It is Paris, the capital of France.", "Paris") == 1.0
    assert cover_exact_match("Paris", "Paris France") == 0.0  # every gold token must appear
    assert cover_exact_match("", "Paris") == 0.0
    assert cover_exact_match("anything", "the") == 0.0  # a gold answer that normalises to nothing never matches


def test_token_f1():
    assert token_f1("Albert Einstein", "Einstein") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "Paris") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("dog", "cat") == 0.0


def test_multiple_gold_answers_max_and_first():
    s = answer_scores("Mediterranean", ["the Mediterranean Sea", "Mediterranean"])
    assert s["em"] == 1.0 and s["em_first"] == 0.0
    assert s["cem"] == 1.0 and s["cem_first"] == 0.0
    assert s["f1"] == 1.0 and s["f1_first"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    empty = answer_scores("", ["Paris"])
    assert empty == {"em": 0.0, "em_first": 0.0, "f1": 0.0, "f1_first": 0.0, "cem": 0.0, "cem_first": 0.0}
    with pytest.raises(ValueError):
        answer_scores("x", [])


def test_recall_at_k():
    assert recall_at(["a", "b", "c"], ["b"], 1) == 0.0
    assert recall_at(["a", "b", "c"], ["b"], 3) == 1.0
    assert recall_at(["a", "b", "c"], ["b", "z"], 5) == 0.5
    with pytest.raises(ValueError):
        recall_at(["a"], [], 1)
