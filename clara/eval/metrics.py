"""Answer and retrieval metrics (docs/design.md §9). Pure functions.

Answers are normalised as the paper does (lower case, no punctuation, no articles, single spaces). Every answer
metric is reported twice: the max over all gold answers (ours) and against the first gold answer only (the
authors' code), so numbers stay comparable with theirs.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from clara.text import normalize_answer


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def cover_exact_match(prediction: str, gold: str) -> float:
    """CEM: every token of the normalised gold answer appears in the normalised prediction."""
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = set(normalize_answer(prediction).split())
    return float(bool(gold_tokens) and all(t in pred_tokens for t in gold_tokens))


def token_f1(prediction: str, gold: str) -> float:
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """em / f1 / cem as the max over all gold answers, and *_first against the first gold answer only."""
    if not golds:
        raise ValueError("at least one gold answer is needed")
    out = {}
    for name, fn in (("em", exact_match), ("f1", token_f1), ("cem", cover_exact_match)):
        out[name] = max(fn(prediction, g) for g in golds)
        out[f"{name}_first"] = fn(prediction, golds[0])
    return out


def recall_at(retrieved: Sequence[str], gold: Iterable[str], k: int) -> float:
    """Share of the gold documents among the first k retrieved (1.0 = all found)."""
    gold = set(gold)
    if not gold:
        raise ValueError("recall needs at least one gold document")
    return len(gold & set(retrieved[:k])) / len(gold)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
