"""Evaluation inputs: QA files, the built-in sets, the corpus, and model references."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

from clara.data.corpus import Document
from clara.data.records import QARecord, load_qa_records, read_synth_rows


def synth_qa(synth_dir: str | Path, split: str = "dev", kinds: Sequence[str] = ("simple", "complex")
             ) -> list[QARecord]:
    """A synthesized split as QA with gold documents, one question per QA pair. ``dev`` is held out by document
    from SCP training (evaluation); ``train`` is what end-to-end training learns from."""
    path = Path(synth_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `clara synthesize` first")
    out = []
    for row in read_synth_rows(path):
        if row["data_type"] != "qa" or row.get("kind") not in kinds:
            continue
        for i, (q, a) in enumerate(zip(row["question"], row["answers"])):
            out.append(QARecord(f"{row['doc_id']}:{row['kind']}:{i}", q, [a], [row["doc_id"]]))
    if not out:
        raise ValueError(f"{path}: no QA pairs of kinds {list(kinds)}")
    return out


def description_retrieval(docs: Sequence[Document]) -> list[QARecord]:
    """Retrieval only: each article's human-written Wikipedia description as the query, the article as gold
    (an article split into passages is found when any of its passages is: evaluation matches ``parent_id``)."""
    seen: set[str] = set()
    out = []
    for d in docs:
        article = d.parent_id or d.id
        if article not in seen and d.meta.get("description"):
            seen.add(article)
            out.append(QARecord(f"desc:{article}", d.meta["description"], [], [article]))
    if not out:
        raise ValueError("no documents with a 'description' field (the bundled corpus has them)")
    return out


def load_qa(spec: str, docs: Sequence[Document]) -> list[QARecord]:
    """``descriptions``, ``synth:DIR`` or a QA JSONL file."""
    if spec == "descriptions":
        return description_retrieval(docs)
    if spec.startswith("synth:"):
        return synth_qa(spec[len("synth:"):], split="dev")
    return load_qa_records(spec)


def subsample(qa: Sequence[QARecord], docs: Sequence[Document], limit: int | None, corpus_limit: int | None,
              seed: int = 0) -> tuple[list[QARecord], list[Document]]:
    """A seeded sample of ``limit`` questions, and a corpus cut to ``corpus_limit`` documents that always keeps
    every gold document (so CPU runs stay short without making retrieval trivially easy or impossible)."""
    qa = list(qa)
    if limit is not None and limit < len(qa):
        qa = random.Random(seed).sample(qa, limit)
    if corpus_limit is None or corpus_limit >= len(docs):
        return qa, list(docs)
    gold = {g for r in qa for g in r.gold_doc_ids}

    def is_gold(d: Document) -> bool:  # a passage of a gold document is kept with it
        return d.id in gold or d.parent_id in gold

    keep = [d for d in docs if is_gold(d)]
    others = [d for d in docs if not is_gold(d)]
    random.Random(seed + 1).shuffle(others)
    keep += others[: max(0, corpus_limit - len(keep))]
    order = {d.id: i for i, d in enumerate(docs)}
    return qa, sorted(keep, key=lambda d: order[d.id])


UriResolver = Callable[[str], Path]
"""Downloads what a model URI (``models:/name@alias``, ``runs:/…``) points at and returns the local folder."""


def resolve_model(ref: str, resolve_uri: UriResolver | None = None) -> Path:
    """A checkpoint folder, or a model URI fetched by ``resolve_uri`` (the library knows no tracking server:
    the ``clara`` command line and the flows pass MLflow's, ``clara_flows.tracking.download_model``)."""
    if ref.startswith(("models:/", "runs:/")):
        if resolve_uri is None:
            raise ValueError(f"{ref}: a model URI needs a resolver; give a checkpoint folder, or run this through "
                             "the `clara` command, which resolves MLflow URIs")
        local = Path(resolve_uri(ref))
        found = sorted(local.rglob("clara.json"))
        if not found:
            raise FileNotFoundError(f"{ref}: no clara checkpoint (clara.json) inside the downloaded artifacts")
        return found[0].parent
    path = Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"model {ref!r} not found")
    return path
