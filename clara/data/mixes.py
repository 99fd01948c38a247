"""Training sets assembled from the corpus and the synthesized QA, with no teacher in the loop.

- **Reconstruction** (stage 1): every passage of the corpus is its own target under the paraphrase instructions
  ("Background: <memory> means the same as …"). The paper's ablation finds paraphrase data alone gives most of
  SCP's gain, and it needs no teacher, so it can cover the whole corpus: every passage the store will ever
  serve has been through the compressor in training.
- **Instruct** (stage 2): each synthesized question over k passages, the gold passage plus k-1 hard negatives
  (the first-stage retriever's best passages from other articles) in a seeded random order, so the generator
  learns to find the answer among distractors exactly as it will at serving time.

Rows use the authors' record format (``clara.data.records``) plus provenance fields (``kind``, ``doc_id``,
``parent_id``); the record readers ignore the extras.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Iterable, Sequence

from clara.data.corpus import Document
from clara.text import normalize_answer

Ranker = Callable[[Sequence[str], int], list[list[str]]]
"""``rank(questions, n)`` -> for each question the ids of its ``n`` best passages, best first."""


def check_share(share: float) -> float:
    """A reconstruction share is a fraction of the passages in (0, 1]; callers check it before reading a corpus."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"reconstruction share must be in (0, 1], got {share}")
    return share


def reconstruction_rows(docs: Iterable[Document], share: float = 1.0) -> list[dict[str, Any]]:
    """One stage-1 row per passage whose target is the passage itself (title line included: a question
    often names the subject only through the title).

    ``share``: the fraction of passages that get a row, chosen by a hash of the passage id (the same passages on
    any machine, and a smaller share keeps a subset of a larger one). Below 1 it weights a mix toward its QA rows.
    """
    cut = round(check_share(share) * 10_000)
    return [{"data_type": "paraphrase", "kind": "reconstruction", "question": [], "answers": [d.full_text],
             "docs": [d.full_text], "doc_id": d.id, "parent_id": d.parent_id or d.id} for d in docs
            if cut == 10_000 or _bucket(f"reconstruction:{d.id}", 10_000) < cut]


def qa_pairs(rows: Iterable[dict[str, Any]], kinds: Sequence[str] = ("simple",)) -> list[dict[str, Any]]:
    """Single (question, answer, doc_id) pairs out of synthesized ``qa`` rows of the given kinds."""
    out = []
    for r in rows:
        if r.get("data_type") != "qa" or r.get("kind", "simple") not in kinds:
            continue
        answers = r["answers"] if len(r["answers"]) == len(r["question"]) else r["answers"][:1] * len(r["question"])
        for q, a in zip(r["question"], answers):
            out.append({"question": q, "answer": a, "doc_id": r["doc_id"],
                        "parent_id": r.get("parent_id", r["doc_id"])})
    return out


def instruct_rows(pairs: Sequence[dict[str, Any]], docs: Sequence[Document], rank: Ranker, *, k: int = 5,
                  pool: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Stage-2 rows: each question over its gold passage and ``k - 1`` negatives from ``rank``.

    Negatives are the best-ranked passages of *other* articles (a passage of the gold's own article may hold
    the answer too, and would teach the generator to ignore evidence). Where the ranker finds too few, random
    passages fill in. The gold's slot is drawn per question: a fixed slot would be a shortcut.

    Args:
        pairs: ``{"question", "answer", "doc_id", "parent_id"}`` dicts (see ``qa_pairs``).
        docs: the corpus the gold ids refer to.
        rank: the first-stage retriever.
        pool: how many ranked passages to draw the negatives from (the top ``k - 1`` of them that qualify).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    by_id = {d.id: d for d in docs}
    missing = sorted({p["doc_id"] for p in pairs} - set(by_id))
    if missing:
        raise ValueError(f"{len(missing)} gold passage id(s) are not in the corpus, e.g. {missing[:3]}")
    rng = random.Random(seed)
    ranked = rank([p["question"] for p in pairs], min(pool, len(docs))) if k > 1 else [[] for _ in pairs]
    ids = list(by_id)
    out = []
    for p, hits in zip(pairs, ranked, strict=True):
        parent = p.get("parent_id") or p["doc_id"]
        negatives = [i for i in hits if (by_id[i].parent_id or i) != parent][: k - 1]
        while len(negatives) < min(k - 1, len(ids) - 1):
            i = rng.choice(ids)
            if (by_id[i].parent_id or i) != parent and i not in negatives:
                negatives.append(i)
        chosen = negatives[:]
        chosen.insert(rng.randrange(len(chosen) + 1), p["doc_id"])
        out.append({"data_type": "qa", "kind": "instruct", "question": [p["question"]], "answers": [p["answer"]],
                    "docs": [by_id[i].full_text for i in chosen], "doc_ids": chosen, "doc_id": p["doc_id"],
                    "parent_id": parent})
    return out


def drop_excluded(rows: Iterable[dict[str, Any]], questions: Iterable[str], doc_ids: Iterable[str]
                  ) -> tuple[list[dict[str, Any]], int]:
    """Synthesized QA rows minus those about an evaluation set: a row goes if it is about one of ``doc_ids`` (an
    evaluation question's gold passage: any question about it may paraphrase the held-out one) or if one of its
    questions equals an excluded question up to case, punctuation and articles (``normalize_answer``, as synthesis
    dedupes questions; the natural teacher writes the obvious question, and a hand-written dev set asks it too).
    Returns the kept rows and how many went.
    """
    qs = {normalize_answer(q) for q in questions}
    ids = set(doc_ids)
    rows = list(rows)
    kept = [r for r in rows
            if r.get("doc_id") not in ids and not any(normalize_answer(q) in qs for q in r.get("question") or [])]
    return kept, len(rows) - len(kept)


def heldout(doc: Document, per_mille: int = 10) -> bool:
    """Whether ``doc``'s article is in the fixed held-out share (``per_mille`` of 1000 articles, chosen by a hash
    of the article id, so every passage of an article falls on the same side on any machine). Training mixes
    leave these out; the quality probe measures reconstruction on them."""
    return _bucket(doc.parent_id or doc.id, 1000) < per_mille


def _bucket(key: str, buckets: int) -> int:
    """A stable bucket of ``key`` in ``range(buckets)`` (SHA-1, not ``hash()``: the same on any machine and run)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % buckets
