"""Answer normalisation shared by data verification and evaluation (the SQuAD/CLaRa convention)."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”–—")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


_WORD = re.compile(r"[^\W_][\w'’.-]*[^\W_]|[^\W_]")
# capitalised only because they start a sentence: never salient
_STARTERS = frozenset(
    "a an the in on at as after before during for from by with when while although however but and or since "
    "today there here it its he she they we i you this these that those his her their our one some many most "
    "after also if then thus yet so such other each both all".split())


def salient_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words a question is likely to ask for: capitalised words (names, places, titles,
    months) other than common sentence starters, and words with a digit (years, dates, counts). A cheap,
    language-model-free stand-in for named entities, so training needs no parser."""
    out = []
    for m in _WORD.finditer(text):
        w = m.group()
        if any(c.isdigit() for c in w) or (w[0].isupper() and w.lower() not in _STARTERS):
            out.append((m.start(), m.end()))
    return out
