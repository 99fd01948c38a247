"""Quality probe: does a checkpoint's compression carry what the generator needs? Run it after every change.

    python benchmarks/quality_probe.py CHECKPOINT [--dev benchmarks/dev/natural_dev.jsonl] [--out probe.json]

Three parts, each beside its references, on the corpus the questions are about (the passages of the first
``--articles`` bundled articles, split as the pipeline splits them):

(a) **Reconstruction** — mean cross-entropy (nats/token) of held-out passages (``clara.data.mixes.heldout``:
    articles no training mix contains) read back from their memory tokens, beside the base model with no
    document and with the raw passage in the prompt. A useful compressor sits much nearer the raw reference.
    Two controls say how much of that is the memory itself rather than the trained generator's knowledge of
    the domain: the same generator given *another* held-out passage's memory (``memory_other``), and given no
    document (``generator_no_document``). ``memory_use`` = memory_other − memory: what a passage's own memory
    tokens are worth, in nats per token.
    The same on passages the training mixes do reconstruct (``reconstruction_trained``: the dev questions' gold
    passages), so that trained-on and never-seen passages are reported apart.
    The same on the tokens questions ask for (``answer_spans``): each dev answer's first occurrence in its gold
    passage, scored inside that passage's reconstruction. These passages are in the training mixes'
    reconstruction rows (every served passage is), so this asks what the memory of a trained-on passage keeps
    of its names, dates and numbers, not whether it generalises.
(b) **Generator alone** — each dev question answered with its gold passage forced into the k documents (the
    other k-1 are BM25's best from other articles, in a seeded order): CLaRa from the compressed passages vs the
    base model from the same k passages as raw text, and closed book. Beside the answers, their likelihood:
    the mean NLL per token of each question's first gold answer (teacher-forced, no EOS), for CLaRa with the gold
    passage forced and with the gold's memory swapped for the next hard negative's, and for the base model with
    the raw passages and closed book. ``answer_use`` (without gold − forced) is what the gold passage is worth to
    the answer, in nats per answer token; unlike CEM on 150 questions it moves with small changes, so it is the
    number to compare checkpoints by. Compare it within a model: the base model answers in sentences, so its
    NLL of a bare short answer is high either way.
(c) **Own retrieval** — the query reasoner searches the compressed corpus (exact flattened cosine) and the
    generator answers from its top k. ``--retrieval full`` searches every passage of the corpus; ``pool`` (for
    slow machines) searches the union of the questions' (b) passage sets: each question's gold passage among
    everyone's BM25 hard negatives. A checkpoint that has not been through E2E uses its compressor as the
    query reasoner (the paper's initialisation of E2E), and the output says so.

Closed-book and raw-text answers depend only on the base model and the questions, so they are cached (under
``$CLARA_CACHE_DIR/probe``) and shared by every checkpoint probed with the same settings.
Prints one table and writes JSON (``--out``). Answers are greedy, at most ``--max-new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEV = ROOT / "benchmarks" / "dev" / "natural_dev.jsonl"


def first_articles(docs: Sequence[Any], articles: int | None) -> list[Any]:
    """The passages of the first ``articles`` articles (by parent id, in corpus order)."""
    if articles is None:
        return list(docs)
    seen: set[str] = set()
    out = []
    for d in docs:
        parent = d.parent_id or d.id
        if parent not in seen:
            if len(seen) == articles:
                break
            seen.add(parent)
        out.append(d)
    return out


def reconstruction(model, passages: Sequence[Any], batch_size: int = 4) -> dict[str, float]:
    """(a): mean CE per target token of each passage given its memory / nothing / its raw text."""
    from clara.model import prompts

    sums = {"memory": 0.0, "memory_other": 0.0, "generator_no_document": 0.0, "no_document": 0.0,
            "raw_document": 0.0}
    tokens = 0
    model.peft.eval()

    def rows_for(mems):
        return [model.prompter.paraphrase_prompt(m.shape[0]) for m in mems]

    if len(passages) < 2:
        raise ValueError(f"reconstruction needs at least 2 held-out passages (the control reads another "
                         f"passage's memory); got {len(passages)}")
    starts = list(range(0, len(passages), batch_size))
    if len(passages) - starts[-1] == 1 and len(starts) > 1:
        starts.pop()  # a last batch of one has no neighbour: it joins the batch before
    with torch.no_grad():
        for s, e in zip(starts, starts[1:] + [len(passages)]):
            chunk = [p.full_text for p in passages[s:e]]
            targets = [model.prompter.target_ids(t, 1024) for t in chunk]
            n = sum(len(t) for t in targets)
            mems = model.compress(chunk)
            other = mems[1:] + mems[:1]  # each passage read from its neighbour's memory
            empty = [model.prompter.prompt_ids(prompts.PARAPHRASE_USER[0].format(documents="")) for _ in chunk]
            with model.adapter("generator"):
                sums["memory"] += model.response_loss(rows_for(mems), targets, [[m] for m in mems]).item() * n
                sums["memory_other"] += model.response_loss(rows_for(other), targets,
                                                            [[m] for m in other]).item() * n
                sums["generator_no_document"] += model.response_loss(empty, targets,
                                                                     [[] for _ in chunk]).item() * n
            raw = [model.prompter.prompt_ids(prompts.PARAPHRASE_USER[0].format(documents=t)) for t in chunk]
            with model.adapter(None):
                sums["no_document"] += model.response_loss(empty, targets, [[] for _ in chunk]).item() * n
                sums["raw_document"] += model.response_loss(raw, targets, [[] for _ in chunk]).item() * n
            tokens += n
    out = {k: v / tokens for k, v in sums.items()}
    out["memory_use"] = out["memory_other"] - out["memory"]
    # 0 = no better than no document, 1 = as good as reading the raw passage.
    out["gap_closed"] = (out["no_document"] - out["memory"]) / (out["no_document"] - out["raw_document"])
    out["passages"] = len(passages)
    return out


def slot_diversity(memories: Sequence[torch.Tensor]) -> dict[str, float]:
    """How many distinct vectors a passage's memory is (the first number to look at after a change): over
    passages with the same number of slots, the mean pairwise cosine of one passage's slots (raw, and with each
    slot's mean over the passages removed, so a direction every passage shares does not count), the same slot's
    cosine across passages, and each passage's effective rank (exp of the entropy of its normalised singular
    values: 1 = one vector written n times, n = n orthogonal ones)."""
    n = max(m.shape[0] for m in memories)
    mems = torch.stack([m.float() for m in memories if m.shape[0] == n])  # [P, n, H]
    if mems.shape[0] < 2 or n < 2:
        raise ValueError(f"slot diversity needs 2+ passages with 2+ slots; got {mems.shape[0]} with {n}")

    def within(x: torch.Tensor) -> float:
        u = torch.nn.functional.normalize(x, dim=-1)
        cos = u @ u.transpose(1, 2)  # [P, n, n]
        off = ~torch.eye(n, dtype=torch.bool)
        return float(cos[:, off].mean())

    u = torch.nn.functional.normalize(mems, dim=-1).transpose(0, 1)  # [n, P, H]
    across = u @ u.transpose(1, 2)  # [n, P, P]
    off_p = ~torch.eye(mems.shape[0], dtype=torch.bool)
    sv = torch.linalg.svdvals(mems)  # [P, n]
    p = sv / sv.sum(-1, keepdim=True)
    erank = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum(-1))
    return {"within_passage_cosine": within(mems), "within_passage_cosine_centred": within(mems - mems.mean(0)),
            "same_slot_across_passages_cosine": float(across[:, off_p].mean()),
            "effective_rank": float(erank.mean()), "slots": n, "passages": int(mems.shape[0])}


def text_chunk_means(model, texts: Sequence[str], adapter: str | None, batch_size: int = 8) -> list[torch.Tensor]:
    """Each passage's own last-layer states averaged over the chunks its slots stand for (``chunk_bounds``), under
    ``adapter`` (``None``: the base weights, reading the same rows, memory tokens included): the reference for
    ``slot_diversity``. Under the compressor they are what ``align=chunks`` pulls each slot toward; a memory cannot
    be asked to be more distinct than the text it holds. Empty chunks (a text shorter than its slots) are left out,
    so such a passage has fewer rows and ``slot_diversity`` skips it as it would a short memory. The probe's model
    is loaded in eval mode, so dropout is off here as in ``compress``."""
    out: list[torch.Tensor] = []
    with torch.no_grad(), model.adapter(adapter):
        for s in range(0, len(texts), batch_size):
            enc = model.encode_texts(list(texts[s:s + batch_size]), max_len=model.cfg.doc_max_len)
            out += [enc.chunk_mean[i][enc.chunk_used[i]].float() for i in range(len(enc.n_mem))]
    return out


def answer_spans(model, items: Sequence[tuple[str, str]], batch_size: int = 4) -> dict[str, float]:
    """(a) on the tokens that matter: each (passage, answer) pair's passage read back as in ``reconstruction``,
    scoring only the tokens of the answer's first occurrence in it. Says whether the memory carries the names,
    dates and numbers questions ask for, apart from the passage's easy words."""
    from clara.model import prompts

    spans: list[tuple[str, list[int], list[int]]] = []
    for text, answer in items:
        at = text.find(answer)
        if at < 0:
            continue
        enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(answer) and b > at and i < 1024]
        if idx:
            spans.append((text, model.prompter.target_ids(text, 1024), idx))
    if len(spans) < 2:
        raise ValueError(f"answer spans need at least 2 answers found in their passages; got {len(spans)}")
    sums = {"memory": 0.0, "memory_other": 0.0, "no_document": 0.0, "raw_document": 0.0}
    tokens = 0

    def picked(losses: torch.Tensor, chunk) -> float:
        out, start = 0.0, 0
        for _, target, idx in chunk:
            out += float(losses[start: start + len(target)][idx].sum())
            start += len(target)
        return out

    model.peft.eval()
    starts = list(range(0, len(spans), batch_size))
    if len(spans) - starts[-1] == 1 and len(starts) > 1:
        starts.pop()
    with torch.no_grad():
        for s, e in zip(starts, starts[1:] + [len(spans)]):
            chunk = spans[s:e]
            targets = [t for _, t, _ in chunk]
            mems = model.compress([text for text, _, _ in chunk])
            other = mems[1:] + mems[:1]
            empty = [model.prompter.prompt_ids(prompts.PARAPHRASE_USER[0].format(documents="")) for _ in chunk]
            with model.adapter("generator"):
                for key, m in (("memory", mems), ("memory_other", other)):
                    rows = [model.prompter.paraphrase_prompt(x.shape[0]) for x in m]
                    sums[key] += picked(model.response_loss(rows, targets, [[x] for x in m], reduction="none"),
                                        chunk)
            raw = [model.prompter.prompt_ids(prompts.PARAPHRASE_USER[0].format(documents=text))
                   for text, _, _ in chunk]
            with model.adapter(None):
                sums["no_document"] += picked(model.response_loss(empty, targets, [[] for _ in chunk],
                                                                  reduction="none"), chunk)
                sums["raw_document"] += picked(model.response_loss(raw, targets, [[] for _ in chunk],
                                                                   reduction="none"), chunk)
            tokens += sum(len(idx) for _, _, idx in chunk)
    out = {k: v / tokens for k, v in sums.items()}
    out["memory_use"] = out["memory_other"] - out["memory"]
    out["gap_closed"] = (out["no_document"] - out["memory"]) / (out["no_document"] - out["raw_document"])
    out["answers"], out["tokens"] = len(spans), tokens
    return out


def _score(preds: Sequence[str], qa: Sequence[Any]) -> dict[str, float]:
    from clara.eval.metrics import answer_scores, mean

    scores = [answer_scores(p, r.answers) for p, r in zip(preds, qa)]
    return {k: 100 * mean(s[k] for s in scores) for k in ("cem", "em", "f1")}


def _batched(fn, items: Sequence[Any], batch_size: int) -> list[str]:
    out: list[str] = []
    for s in range(0, len(items), batch_size):
        out.extend(fn(items[s: s + batch_size]))
    return out


def paired_bootstrap(new: Sequence[float], old: Sequence[float], samples: int = 10_000, seed: int = 0
                     ) -> dict[str, float]:
    """Mean of ``old - new`` over paired items and its 95 % percentile interval by resampling the items."""
    if len(new) != len(old) or not new:
        raise ValueError(f"paired bootstrap needs equal, non-empty lists; got {len(new)} and {len(old)}")
    d = torch.tensor([o - n for n, o in zip(new, old)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (samples, len(d)), generator=gen)
    means = d[idx].mean(1)
    return {"mean": float(d.mean()), "low": float(means.quantile(0.025)), "high": float(means.quantile(0.975)),
            "items": len(d)}


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Does probe result ``new`` beat ``old`` on the same questions? The release rule (docs/memory.md): the gold
    answer's NLL with the gold passage forced is lower (paired bootstrap, 95 % lower end > 0) and F1 is no lower.
    Where either probe generated no answers (``--parts n``), the F1 gain is None and so is ``better``: the NLL half
    of the rule alone does not decide it."""
    if new.get("question_ids") != old.get("question_ids"):
        raise ValueError("the two probe results are not over the same dev questions")
    nll = paired_bootstrap(new["per_question"]["nll_clara_forced"], old["per_question"]["nll_clara_forced"])
    if not all("f1_clara_forced" in r["per_question"] for r in (new, old)):
        return {"gold_answer_nll_gain": nll, "f1_gain": None, "better": None}
    f1 = paired_bootstrap([-x for x in new["per_question"]["f1_clara_forced"]],
                          [-x for x in old["per_question"]["f1_clara_forced"]])  # mean = F1 gain of new
    return {"gold_answer_nll_gain": nll, "f1_gain": f1,
            "better": nll["low"] > 0 and f1["mean"] >= 0}


def corpus_and_dev(model, corpus: str, articles: int | None, dev: Path) -> tuple[list[Any], list[Any], list[Any]]:
    """The corpus's passages, those of its first ``articles`` articles, and the dev questions, whose gold passages
    must be among the latter (SystemExit naming them otherwise)."""
    from clara.data.corpus import ingest_corpus
    from clara.data.records import load_qa_records

    docs_all, _ = ingest_corpus(corpus, model.cfg)
    docs = first_articles(docs_all, articles)
    ids = {d.id for d in docs}
    qa = load_qa_records(dev)
    missing = [r.id for r in qa if not set(r.gold_doc_ids) <= ids]
    if missing:
        raise SystemExit(f"{dev}: gold passages of {len(missing)} question(s) are not in the probe corpus "
                         f"(first {articles} articles), e.g. {missing[:3]}")
    return docs_all, docs, qa


def gold_forced_sets(qa: Sequence[Any], docs: Sequence[Any], k: int, seed: int = 0
                     ) -> tuple[list[list[str]], list[list[str]]]:
    """Each question's k passages with its gold passage forced in at a seeded place among the BM25 top of other
    articles, and the same set with the gold swapped for the next of those hard negatives."""
    from clara.retrieval.first_stage import BM25Retriever

    by_id = {d.id: d for d in docs}
    ranked = BM25Retriever(docs).retrieve([r.question for r in qa], 20)
    rng = random.Random(seed)
    forced: list[list[str]] = []
    without_gold: list[list[str]] = []
    for r, hits in zip(qa, ranked):
        gold = r.gold_doc_ids[0]
        parent = by_id[gold].parent_id or gold
        others = [d for d, _ in hits if (by_id[d].parent_id or d) != parent][:k]
        chosen = others[: k - 1]
        slot = rng.randrange(len(chosen) + 1)
        forced.append(chosen[:slot] + [gold] + chosen[slot:])
        without_gold.append(chosen[:slot] + others[k - 1:k] + chosen[slot:])
    return forced, without_gold


def probe(checkpoint: str, dev: Path, *, articles: int = 2000, k: int = 5, limit: int | None = None,
          heldout_passages: int = 40, max_new_tokens: int = 32, batch_size: int = 8, parts: str = "abc",
          seed: int = 0, amp: str | None = None, retrieval: str = "full", corpus: str = "bundled"
          ) -> dict[str, Any]:
    from clara.data.mixes import heldout
    from clara.eval.likelihood import answer_nll
    from clara.model.topk import flat_cosine, pad_memories
    from clara.eval.metrics import recall_at
    from clara.model.base import cache_dir
    from clara.model.checkpoint import load_checkpoint, read_checkpoint_config

    t_start = time.perf_counter()
    model = load_checkpoint(checkpoint)
    if amp is not None:
        model.cfg.amp = amp
        model.uses_amp = amp == "bf16"
    meta = read_checkpoint_config(checkpoint)
    stage = meta.get("extra", {}).get("stage", "?")
    docs_all, docs, qa = corpus_and_dev(model, corpus, articles, dev)
    by_id = {d.id: d for d in docs}
    if limit:
        qa = random.Random(seed).sample(qa, min(limit, len(qa)))
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "stage": stage, "rate": model.cfg.compression_rate,
                              "amp": model.uses_amp, "dev": str(dev), "questions": len(qa), "k": k,
                              "corpus_passages": len(docs)}

    if "a" in parts:
        held = [d for d in docs_all if heldout(d)][:heldout_passages]
        if len(held) >= 2:
            texts = [d.full_text for d in held]
            result["slot_diversity"] = {**slot_diversity(model.compress(texts)),
                                        "text_chunks": slot_diversity(text_chunk_means(model, texts, "compressor")),
                                        "text_chunks_base": slot_diversity(text_chunk_means(model, texts, None))}
            result["reconstruction"] = reconstruction(model, held)
        else:
            result["reconstruction_skipped"] = (f"the corpus has {len(held)} held-out passage(s) "
                                                f"(clara.data.mixes.heldout); (a) needs 2")
        # Trained on vs never seen: the same measure on passages the training mixes reconstruct (the dev questions'
        # gold passages: their QA rows are excluded, their reconstruction rows are not), so that memorisation shows
        # as the difference instead of passing for generalisation.
        trained = list({r.gold_doc_ids[0]: by_id[r.gold_doc_ids[0]] for r in qa}.values())[:heldout_passages]
        if len(trained) >= 2:
            result["reconstruction_trained"] = reconstruction(model, trained)
        result["answer_spans"] = answer_spans(model, [(by_id[r.gold_doc_ids[0]].full_text, a) for r in qa
                                                      for a in r.answers[:1]])

    if "b" in parts or "n" in parts:  # "n": part (b)'s likelihoods only, no generation (a quick stop measure)
        generate = "b" in parts
        forced, without_gold = gold_forced_sets(qa, docs, k, seed)
        questions = [r.question for r in qa]
        key = hashlib.sha256(json.dumps([model.cfg.base, questions, forced, max_new_tokens]).encode()).hexdigest()
        cached = cache_dir() / "probe" / f"baselines-{key[:16]}.json"
        if not generate:
            closed = raw = []
        elif cached.is_file():
            closed, raw = json.loads(cached.read_text(encoding="utf-8"))
        else:
            closed = _batched(lambda b: model.generate_from_text(b, [[] for _ in b], max_new_tokens), questions,
                              batch_size)
            raw = _batched(lambda idx: model.generate_from_text(
                [questions[i] for i in idx], [[by_id[d].full_text for d in forced[i]] for i in idx],
                max_new_tokens), list(range(len(qa))), batch_size)
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps([closed, raw]), encoding="utf-8")
        gold_answers = [r.answers[0] for r in qa]
        nll_key = hashlib.sha256(json.dumps([model.cfg.base, questions, forced, gold_answers]).encode()).hexdigest()
        nll_cached = cache_dir() / "probe" / f"answer-nll-{nll_key[:16]}.json"
        if nll_cached.is_file():
            base_nll = json.loads(nll_cached.read_text(encoding="utf-8"))
        else:
            text_prompt = model.prompter.text_qa_prompt
            base_nll = {
                "closed_book": answer_nll(model, [text_prompt(q, []) for q in questions], gold_answers,
                                          None, None, batch_size)[0],
                "raw_text_forced": answer_nll(model, [text_prompt(q, [by_id[d].full_text for d in ids])
                                                      for q, ids in zip(questions, forced)],
                                              gold_answers, None, None, batch_size)[0]}
            nll_cached.parent.mkdir(parents=True, exist_ok=True)
            nll_cached.write_text(json.dumps(base_nll), encoding="utf-8")
        needed = sorted({d for ids in forced + without_gold for d in ids})
        mem = dict(zip(needed, model.compress([by_id[d].full_text for d in needed])))
        clara = _batched(lambda idx: model.generate([questions[i] for i in idx],
                                                    [[mem[d] for d in forced[i]] for i in idx], max_new_tokens),
                         list(range(len(qa))), batch_size) if generate else []
        # CLaRa's own generator with no documents: the memory's worth is measured against the same generator
        clara_closed = _batched(lambda b: model.generate(b, [[] for _ in b], max_new_tokens), questions,
                                batch_size) if generate else []
        if generate:
            result["generator"] = {"closed_book": _score(closed, qa), "raw_text_forced": _score(raw, qa),
                                   "clara_closed_book": _score(clara_closed, qa), "clara_forced": _score(clara, qa)}

        def clara_nll(sets: list[list[str]]) -> tuple[float, list[float]]:
            rows = [model.prompter.qa_prompt(q, [mem[d].shape[0] for d in ids]) for q, ids in zip(questions, sets)]
            return answer_nll(model, rows, gold_answers, [[mem[d] for d in ids] for ids in sets], "generator",
                              batch_size)

        (forced_nll, forced_each), (without_nll, without_each) = clara_nll(forced), clara_nll(without_gold)
        nll = {**base_nll, "clara_forced": forced_nll, "clara_without_gold": without_nll,
               "clara_closed_book": clara_nll([[] for _ in questions])[0]}
        from clara.eval.metrics import answer_scores

        result["question_ids"] = [r.id for r in qa]
        result["per_question"] = {"nll_clara_forced": forced_each, "nll_clara_without_gold": without_each}
        if generate:
            result["per_question"]["f1_clara_forced"] = [answer_scores(p, r.answers)["f1"] for p, r in zip(clara, qa)]
            # every answer, not only the examples: whether a CEM miss is a wrong fact or a near-miss is read here
            result["per_question"]["clara_forced"] = clara
            result["per_question"]["clara_closed_book"] = clara_closed
        nll["answer_use"] = nll["clara_without_gold"] - nll["clara_forced"]
        nll["raw_answer_use"] = nll["closed_book"] - nll["raw_text_forced"]
        result["answer_nll"] = nll
        if generate:
            result["examples"] = [{"question": r.question, "answers": r.answers, "closed_book": c, "raw_text": w,
                                   "clara": x} for r, c, w, x in list(zip(qa, closed, raw, clara))[:12]]

    if "c" in parts:
        if "b" not in parts:
            raise SystemExit("part (c) needs part (b) (it reuses its passage sets and compressed passages)")
        trained_qr = not model.ensure_query_reasoner()
        pool = [d.id for d in docs] if retrieval == "full" else sorted({d for ids in forced for d in ids})
        todo = [d for d in pool if d not in mem]
        mem.update(zip(todo, model.compress([by_id[d].full_text for d in todo])))
        queries = torch.stack(model.encode_queries([r.question for r in qa]))
        scores = flat_cosine(queries, pad_memories([mem[d] for d in pool], model.cfg.n_mem_max))
        ids = [[pool[int(j)] for j in row] for row in scores.topk(min(k, len(pool)), dim=-1).indices]
        own = _batched(lambda idx: model.generate([qa[i].question for i in idx],
                                                  [[mem[d] for d in ids[i]] for i in idx], max_new_tokens),
                       list(range(len(qa))), batch_size)
        result["own_retrieval"] = {
            **_score(own, qa),
            "recall@1": 100 * sum(recall_at(i, r.gold_doc_ids, 1) for i, r in zip(ids, qa)) / len(qa),
            "recall@5": 100 * sum(recall_at(i, r.gold_doc_ids, 5) for i, r in zip(ids, qa)) / len(qa),
            "query_reasoner": "trained (e2e)" if trained_qr else "compressor copy (no e2e)",
            "searched_passages": len(pool), "retrieval": retrieval}
        result["examples_own_retrieval"] = [{"question": r.question, "answers": r.answers, "clara": x,
                                             "found_gold": r.gold_doc_ids[0] in i}
                                            for r, x, i in list(zip(qa, own, ids))[:8]]
    result["seconds"] = time.perf_counter() - t_start
    return result


def table(r: dict[str, Any]) -> str:
    lines = [f"quality probe: {r['checkpoint']} (stage {r['stage']}, rho={r['rate']}, k={r['k']}, "
             f"{r['questions']} dev questions, {r['corpus_passages']} passages, {r['seconds']:.0f} s)"]
    if "slot_diversity" in r:
        d = r["slot_diversity"]
        lines += ["", f"slot diversity, {d['passages']} held-out passages x {d['slots']} slots: within-passage cosine "
                      f"{d['within_passage_cosine']:.3f} (slot means removed {d['within_passage_cosine_centred']:.3f})"
                      f" | same slot across passages {d['same_slot_across_passages_cosine']:.3f} | effective rank "
                      f"{d['effective_rank']:.2f} of {d['slots']}"]
        for key, name in (("text_chunks", "compressor"), ("text_chunks_base", "base weights, same rows")):
            if key in d:  # a probe written before the references were measured has none
                t = d[key]
                lines.append(f"    reference, the passages' own chunk-mean states ({name}): within-passage cosine "
                             f"{t['within_passage_cosine']:.3f} (slot means removed "
                             f"{t['within_passage_cosine_centred']:.3f}) | effective rank {t['effective_rank']:.2f}")
    if "reconstruction" in r:
        a = r["reconstruction"]
        lines += ["", f"(a) reconstruction CE, {a['passages']} held-out passages (nats/token)",
                  f"    no document {a['no_document']:.3f} | memory tokens {a['memory']:.3f} | "
                  f"raw document {a['raw_document']:.3f} | gap closed {100 * a['gap_closed']:.0f}%",
                  f"    controls: another passage's memory {a['memory_other']:.3f} | trained generator, no "
                  f"document {a['generator_no_document']:.3f} | memory use {a['memory_use']:.3f} nats/token"]
    if "reconstruction_trained" in r:
        a = r["reconstruction_trained"]
        lines += [f"    {a['passages']} trained-on passages (the dev questions' gold, in the mixes' reconstruction "
                  f"rows): no document {a['no_document']:.3f} | memory {a['memory']:.3f} | raw "
                  f"{a['raw_document']:.3f} | gap closed {100 * a['gap_closed']:.0f}% | memory use "
                  f"{a['memory_use']:.3f}"]
    if "answer_spans" in r:
        a = r["answer_spans"]
        lines += [f"    answer spans only ({a['answers']} dev answers in their gold passages, {a['tokens']} tokens): "
                  f"no document {a['no_document']:.3f} | memory {a['memory']:.3f} | raw {a['raw_document']:.3f} | "
                  f"gap closed {100 * a['gap_closed']:.0f}% | memory use {a['memory_use']:.3f}"]
    if "generator" in r:
        g = r["generator"]
        lines += ["", "(b) system                          CEM    EM    F1"]
        for name, key in (("closed book", "closed_book"), ("raw text, gold forced into k", "raw_text_forced"),
                          ("CLaRa's generator, no documents", "clara_closed_book"),
                          ("CLaRa, gold forced into k", "clara_forced")):
            if key not in g:  # a probe written before CLaRa's own closed book was measured
                continue
            s = g[key]
            lines.append(f"    {name:<31} {s['cem']:5.1f} {s['em']:5.1f} {s['f1']:5.1f}")
    if "answer_nll" in r:
        n = r["answer_nll"]
        lines += [f"    gold-answer NLL (nats/token): CLaRa gold forced {n['clara_forced']:.3f} | gold swapped for a "
                  f"negative {n['clara_without_gold']:.3f} | answer use {n['answer_use']:.3f}"
                  + (f" | no documents {n['clara_closed_book']:.3f}" if "clara_closed_book" in n else ""),
                  f"    base model: raw text {n['raw_text_forced']:.3f} | closed book {n['closed_book']:.3f} | "
                  f"answer use {n['raw_answer_use']:.3f}"]
    if "own_retrieval" in r:
        c = r["own_retrieval"]
        lines += ["", f"(c) CLaRa, own retrieval over {c['searched_passages']} passages ({c['retrieval']}; "
                      f"query reasoner: {c['query_reasoner']})",
                  f"    CEM {c['cem']:.1f}  EM {c['em']:.1f}  F1 {c['f1']:.1f}  R@1 {c['recall@1']:.1f}  "
                  f"R@5 {c['recall@5']:.1f}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="Checkpoint folder (or run folder with model/).")
    ap.add_argument("--dev", type=Path, default=DEFAULT_DEV, help="QA JSONL {id, question, answers, gold_doc_ids}.")
    ap.add_argument("--corpus", default="bundled", help="'bundled' or a corpus JSONL {id, title, text}.")
    ap.add_argument("--articles", type=int, default=2000, help="Corpus: passages of the first N bundled articles.")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="A seeded sample of N dev questions.")
    ap.add_argument("--heldout", type=int, default=40, help="Held-out passages for (a).")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--parts", default="abc",
                    help="Which parts to run: any of a, b, c; n = (b)'s gold-answer likelihoods without generating.")
    ap.add_argument("--amp", choices=("bf16", "off"), default=None, help="Override the checkpoint's precision.")
    ap.add_argument("--retrieval", choices=("full", "pool"), default="full",
                    help="(c) searches the whole corpus, or only the pooled (b) passage sets (slow machines).")
    ap.add_argument("--out", type=Path, default=None, help="Write the result as JSON here.")
    ap.add_argument("--compare", type=Path, default=None,
                    help="An earlier probe's JSON (same questions): paired bootstrap of the gold answer's NLL and F1.")
    args = ap.parse_args(argv)
    result = probe(args.checkpoint, args.dev, articles=args.articles, k=args.k, limit=args.limit,
                   heldout_passages=args.heldout, max_new_tokens=args.max_new_tokens, parts=args.parts,
                   amp=args.amp, retrieval=args.retrieval, corpus=args.corpus)
    print(table(result))

    def write() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    write()  # before the comparison, which can refuse (other questions): the probe's minutes are kept either way
    if args.compare:
        result["compare"] = {"against": str(args.compare),
                             **compare(result, json.loads(args.compare.read_text(encoding="utf-8")))}
        c = result["compare"]
        g, f = c["gold_answer_nll_gain"], c["f1_gain"]
        f1 = (f"{100 * f['mean']:.1f} [{100 * f['low']:.1f}, {100 * f['high']:.1f}]" if f is not None
              else "not measured (no generated answers)")
        print(f"\nagainst {args.compare}: gold-answer NLL gain {g['mean']:.3f} [{g['low']:.3f}, {g['high']:.3f}] | "
              f"F1 gain {f1} | better: {c['better']}")
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
