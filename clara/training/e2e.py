"""Stage 3 (end-to-end): the generator's answer loss trains the query reasoner through differentiable top-k.

The compressor is frozen and the document pool is compressed once, without gradients (which is what lets a
corpus live in a database later). The query reasoner starts as a copy of the compressor adapter (the paper's
initialisation). Per question the candidates are its positives plus hard negatives, N in all: by default the top
of a first stage (BM25 + MiniLM fused by reciprocal rank, as the paper re-ranks a dense retriever's top 20 and
as the store serves), computed once per question and cached; optionally the pool documents the current query
reasoner scores highest. k of them are selected with the straight-through top-k and handed to the generator. No
relevance labels enter the loss; Recall@k against the positives is only logged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from clara.atomic import publish
from clara.config import E2EConfig, to_dict
from clara.data.records import QARecord
from clara.model.checkpoint import load_adapter_weights
from clara.model.clara_model import ClaraModel
from clara.model.topk import differentiable_topk, flat_unit, pad_memories, unit_scores
from clara.training.common import (
    Checkpointer,
    MetricsCallback,
    MetricsLog,
    batch_indices,
    build_optimization,
    optimizer_step,
    run_finished,
    run_identity,
    save_final,
    total_steps,
)
from clara.training.distributed import setup


def compress_pool(model: ClaraModel, docs: Sequence[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress the pool once: (memory [D, n_max, H] zero-padded, n_mem [D])."""
    mems = model.compress(docs, batch_size=batch_size)
    n_mem = torch.tensor([m.shape[0] for m in mems], device=model.device)
    return pad_memories(mems, model.cfg.n_mem_max), n_mem


def pick_candidates(scores: torch.Tensor, positives: Sequence[Sequence[int]], n: int,
                    first: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Per row: the positives (at most n), then the first stage's documents (``first``, when given), then the
    highest-scoring other documents, n in all. [B, n] indices."""
    rows = []
    for b, pos in enumerate(positives):
        row = list(dict.fromkeys(pos))[:n]
        seen = set(row)
        for i in list(first[b] if first is not None else []) + scores[b].argsort(descending=True).tolist():
            if len(row) == n:
                break
            if i not in seen:
                row.append(i)
                seen.add(i)
        rows.append(row)
    return torch.tensor(rows, device=scores.device)


def first_stage_candidates(records: Sequence[QARecord], corpus: Mapping[str, str], n: int,
                           cache: str | Path | None = None) -> list[list[str]]:
    """The hybrid first stage's top ``n`` document ids per question (BM25 + MiniLM, reciprocal-rank fusion).

    Cached as JSON under ``cache`` keyed by a hash of the corpus, the questions and ``n``, so a resumed or repeated
    run with the same data reads them back instead of embedding the corpus again.
    """
    import hashlib
    import json

    from clara.data.corpus import Document
    from clara.retrieval.dense import MINILM
    from clara.retrieval.fusion import HybridRetriever

    h = hashlib.sha256(f"hybrid:bm25+{MINILM}:n={n}\n".encode())
    for d, t in corpus.items():
        h.update(f"{d}\x00{t}\x01".encode())
    for r in records:
        h.update(f"{r.question}\x02".encode())
    path = Path(cache) / f"first-stage-{h.hexdigest()[:24]}.json" if cache is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    retriever = HybridRetriever([Document(d, "", t) for d, t in corpus.items()])
    out: list[list[str]] = []
    for s in range(0, len(records), 64):
        out += [[d for d, _ in ranked] for ranked in retriever.retrieve([r.question for r in records[s: s + 64]], n)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one temporary file per process: under torchrun every rank computes the same list and writes it
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out), encoding="utf-8")
        publish(tmp, path)  # a file that exists is complete
    return out


def recall_at_k(selected: torch.Tensor, candidates: torch.Tensor, positives: Sequence[Sequence[int]]) -> float:
    """Mean over questions of |selected ∩ positives| / |positives| (questions without positives skipped)."""
    values = []
    for b, pos in enumerate(positives):
        if pos:
            chosen = set(candidates[b, selected[b]].tolist())
            values.append(len(chosen & set(pos)) / len(set(pos)))
    return sum(values) / len(values) if values else float("nan")


def e2e_loss(model: ClaraModel, batch: Sequence[QARecord], pool: torch.Tensor, pool_n: torch.Tensor,
             pool_flat: torch.Tensor, doc_index: Mapping[str, int], cfg: E2EConfig,
             first: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Answer CE through the differentiable top-k; also returns Recall@k of the selection.

    ``first``: per question of the batch, the first stage's pool indices (hard negatives come from there)."""
    with model.adapter("query_reasoner"):
        enc = model.encode_texts([r.question for r in batch], max_len=model.cfg.query_max_len, query=True)
    q = flat_unit(enc.memory)  # [B, n*H], grad -> query reasoner
    positives = [[doc_index[d] for d in r.gold_doc_ids if d in doc_index] for r in batch]
    n_cand = min(cfg.n_candidates, pool.shape[0])
    with torch.no_grad():
        candidates = pick_candidates(unit_scores(q, pool_flat), positives, n_cand, first)  # [B, N]
    scores = unit_scores(q, pool_flat[candidates])  # flattened cosine, differentiable
    k = min(cfg.top_k, n_cand)
    weights, picked = differentiable_topk(scores, k, cfg.tau)  # [B, k, N], [B, k]
    selected = torch.einsum("bkn,bnmh->bkmh", weights.to(pool.dtype), pool[candidates])  # == hard pick
    memories, prompts_ids, targets = [], [], []
    for b, r in enumerate(batch):
        ns = [int(pool_n[candidates[b, j]]) for j in picked[b].tolist()]
        memories.append([selected[b, j, :n] for j, n in enumerate(ns)])
        prompts_ids.append(model.prompter.qa_prompt(r.question, ns))
        targets.append(model.prompter.target_ids(r.answers[0], cfg.max_answer_len))
    with model.adapter("generator"):
        ce = model.response_loss(prompts_ids, targets, memories)
    return ce, {"ce": ce.item(), f"recall@{k}": recall_at_k(picked, candidates, positives),
                "score_margin": float((scores.max(-1).values - scores.mean(-1)).mean().detach())}


class _Pool(NamedTuple):
    """The whole corpus compressed once (the compressor is frozen in E2E), and each question's first-stage
    candidates as indices into it (None when negatives come from the query reasoner's own top)."""
    index: dict[str, int]
    memories: torch.Tensor
    n_mem: torch.Tensor
    flat: torch.Tensor
    first: list[list[int]] | None


def _document_pool(model: ClaraModel, records: Sequence[QARecord], corpus: Mapping[str, str], cfg: E2EConfig,
                   batch_size: int, cache: str | Path) -> _Pool:
    index = {d: i for i, d in enumerate(corpus)}
    memories, n_mem = compress_pool(model, list(corpus.values()), batch_size)
    first = None
    if cfg.negatives == "first_stage":
        first = [[index[d] for d in ids] for ids in first_stage_candidates(records, corpus, cfg.n_candidates, cache)]
    return _Pool(index, memories, n_mem, flat_unit(memories), first)


def _check_gold_in_corpus(records: Sequence[QARecord], corpus: Mapping[str, str]) -> None:
    missing = sorted({d for r in records for d in r.gold_doc_ids if d not in corpus})
    if missing:
        raise ValueError(f"{len(missing)} gold document id(s) are not in the corpus, e.g. {missing[:5]}")


def _accumulate_gradients(model: ClaraModel, records: Sequence[QARecord], pool, cfg: E2EConfig, step: int,
                          recall_key: str, dist) -> dict[str, float]:
    """One optimizer step's micro-batches, forward and backward (this process's slice of each): loss, recall and
    score margin averaged over the micro-batches."""
    train = cfg.train
    sums = {"loss": 0.0, recall_key: 0.0, "score_margin": 0.0}
    for micro in range(train.grad_accum):
        idx = dist.shard(batch_indices(step, micro, train, len(records)))
        loss, parts = e2e_loss(model, [records[i] for i in idx], pool.memories, pool.n_mem, pool.flat,
                               pool.index, cfg, [pool.first[i] for i in idx] if pool.first is not None else None)
        (loss / train.grad_accum).backward()
        for key, value in (("loss", loss.item()), (recall_key, parts[recall_key]),
                           ("score_margin", parts["score_margin"])):
            sums[key] += value / train.grad_accum
    return sums


def train_e2e(model: ClaraModel, records: Sequence[QARecord], corpus: Mapping[str, str], cfg: E2EConfig,
              out_dir: str | Path, *, callback: MetricsCallback | None = None, resume: bool = True,
              progress: bool = True, compress_batch_size: int = 16, candidates_cache: str | Path | None = None,
              start: str | None = None) -> Path:
    """Train query reasoner + generator end to end; write the final checkpoint to ``out_dir/model``.

    Args:
        model: a model whose compressor is trained (SCP checkpoint); it stays frozen here.
        records: questions with answers and ``gold_doc_ids`` (ids into ``corpus``).
        corpus: id -> text; the whole mapping is the document pool negatives are drawn from.
        candidates_cache: folder for the first stage's candidates (default: ``out_dir``).
        start: ``checkpoint_digest`` of the checkpoint ``model`` was loaded from (checkpoints of another start,
            or of other settings or data, in ``out_dir`` are refused: ``run_identity``).
    """
    out_dir = Path(out_dir)
    final = out_dir / "model"
    _check_gold_in_corpus(records, corpus)
    train = cfg.train
    steps = total_steps(train, len(records))
    extra = {"stage": "e2e", "total_steps": steps, **run_identity(cfg, records, sorted(corpus.items()), start=start)}
    identity = {**extra, "defaults": to_dict(type(cfg)())}  # not saved: what an unrecorded setting was trained as
    if resume and run_finished(final, "e2e", steps, identity):
        load_adapter_weights(model, final)
        return final
    torch.manual_seed(train.seed)
    ckpt = Checkpointer(out_dir, train.keep_checkpoints)
    ckpt.check(stage="e2e", resume=resume, identity=identity)  # before the pool: compressing it can take hours

    pool = _document_pool(model, records, corpus, cfg, compress_batch_size, candidates_cache or out_dir)

    model.copy_adapter("compressor", "query_reasoner")
    model.set_trainable(["query_reasoner", "generator"], special=False)
    optimizer, scheduler = build_optimization(model.trainable_parameters(), train.optim, steps)
    start = ckpt.restore(model, optimizer, scheduler, stage="e2e", resume=resume, identity=identity)
    dist = setup()  # several processes under torchrun: each takes a slice of every batch
    log = MetricsLog(out_dir, callback, start) if dist.main else None
    recall_key = f"recall@{min(cfg.top_k, cfg.n_candidates, len(pool.index))}"

    model.peft.train()
    bar = tqdm(total=steps, initial=start, desc="e2e", unit="step", disable=not (progress and dist.main),
               dynamic_ncols=True)
    for step in range(start, steps):
        t0 = time.perf_counter()
        sums = _accumulate_gradients(model, records, pool, cfg, step, recall_key, dist)
        grad_norm = optimizer_step(model, optimizer, scheduler, train, dist)

        done = step + 1
        dt = time.perf_counter() - t0
        if done % train.log_every == 0 or done == steps:
            sums = dist.mean(sums)  # a collective: every rank takes part, rank 0 alone logs
            if log is not None:
                log(done, {**sums, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "steps_per_s": 1.0 / dt})
        bar.set_postfix(loss=f"{sums['loss']:.3f}", recall=f"{sums[recall_key]:.2f}")
        bar.update(1)
        if dist.main and (done % train.checkpoint_every == 0 or done == steps):
            ckpt.save(model, optimizer, scheduler, done, extra)
    bar.close()
    model.peft.eval()
    return save_final(model, final, extra, steps, dist)
