"""Stage 1 (SCP) and stage 2 (instruction tuning): compressor + generator on compressed documents.

Loss = CE(response tokens only) + lambda * MSE(mean memory state, mean document state), both means over the
compressor's last layer (docs/design.md §5). Stage 1 targets are a document's QA lines or its paraphrase; stage 2
targets are a question's answer over k documents (gold among them).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from clara.config import SCPConfig, to_dict
from clara.data.records import SCPRecord
from clara.model import prompts
from clara.model.checkpoint import load_adapter_weights
from clara.model.clara_model import ClaraModel
from clara.model.memory import Encoded
from clara.model.special import dropout_id
from clara.text import salient_spans
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


@dataclass
class Example:
    """One training example: documents to compress, the user turn(s) to pick from, and the response."""

    docs: list[str]
    users: tuple[str, ...]
    """User-turn templates holding ``{documents}``; one is drawn per use (paraphrase instructions vary)."""
    target: str
    system: str | None = None


def build_examples(records: Sequence[SCPRecord], stage: str = "scp", layout: str = "clara") -> list[Example]:
    """Turn records into examples.

    SCP (stage 1): a ``qa`` record's target is all its "Question/Answer" lines; a ``paraphrase`` record's target
    is ``answers[0]`` under one of several rewording instructions.
    Instruct (stage 2): each question of a ``qa`` record over its documents, with the paper's QA prompt and the
    answer as target.
    """
    if stage not in ("scp", "instruct"):
        raise ValueError(f"stage must be 'scp' or 'instruct', got {stage!r}")
    p = prompts.PROMPTS[layout]  # an imported checkpoint keeps training on the prompts it was trained on
    out = []
    for r in records:
        if r.data_type == "paraphrase":
            if stage == "scp":
                out.append(Example(r.docs, p.paraphrase_users, r.answers[0], p.paraphrase_system))
        elif stage == "scp":
            # One question with several acceptable answers pairs with the first of them.
            answers = r.answers if len(r.answers) == len(r.questions) else r.answers[:1]
            out.append(Example(r.docs, (p.scp_qa_user,), prompts.qa_lines(r.questions, answers), p.scp_qa_system))
        else:
            answers = r.answers if len(r.questions) > 1 else r.answers[:1]
            for q, a in zip(r.questions, answers):
                user = prompts.QA_USER.replace("{question}", q)
                out.append(Example(r.docs, (user,), a, prompts.QA_SYSTEM))
    return out


def salient_weights(model: ClaraModel, text: str, target: Sequence[int], weight: float) -> list[float]:
    """Per-token CE weights of ``target`` (``model.prompter.target_ids(text, …)``): ``weight`` for a token that
    overlaps a ``clara.text.salient_spans`` word, 1 otherwise (EOS included)."""
    spans = salient_spans(text)
    offsets = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out, j = [], 0
    for a, b in offsets[: len(target)]:
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        out.append(weight if j < len(spans) and spans[j][0] < b else 1.0)
    return out + [1.0] * (len(target) - len(out))


def alignment_mse(enc: Encoded, align: str) -> torch.Tensor:
    """The MSE alignment term (``SCPConfig.align``): mean memory state vs mean text state, or each slot's state
    vs the mean state of its chunk (slots whose chunk is empty are not scored)."""
    if align == "mean":
        return torch.nn.functional.mse_loss(enc.mem_mean.float(), enc.text_mean.float())
    if align != "chunks":
        raise ValueError(f"align must be 'mean' or 'chunks', got {align!r}")
    used = enc.chunk_used.unsqueeze(-1).float()
    sq = (enc.states.float() - enc.chunk_mean.float()).pow(2) * used
    return sq.sum() / (used.sum() * enc.states.shape[-1]).clamp(min=1.0)


def compressed_lm_loss(model: ClaraModel, batch: Sequence[Example], mse_weight: float, max_target_len: int,
                       rng: random.Random, target_dropout: float = 0.0, salient_weight: float = 1.0,
                       align: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """CE on the response given only compressed documents, plus the MSE alignment term.

    Gradients reach the generator, the compressor (through the memory vectors) and the special-token rows.
    ``target_dropout``: the fraction of response tokens fed back as the mask (``SCPConfig.target_dropout``).
    ``salient_weight``: the CE weight of name and number tokens (``SCPConfig.salient_weight``); the CE is then
    the weighted mean, and the plain mean is reported beside it as ``ce_plain``.
    ``align``: what the MSE term compares (``SCPConfig.align``).
    """
    docs = [d for ex in batch for d in ex.docs]
    with model.adapter("compressor"):
        enc = model.encode_texts(docs, max_len=model.cfg.doc_max_len)
    memories = enc.unpad()
    prompt_rows, targets, mems, at = [], [], [], 0
    for ex in batch:
        ex_mems = memories[at : at + len(ex.docs)]
        at += len(ex.docs)
        placeholder = "".join(model.prompter.placeholders(m.shape[0]) for m in ex_mems)
        user = rng.choice(ex.users).replace("{documents}", placeholder)
        prompt_rows.append(model.prompter.prompt_ids(user, ex.system))
        targets.append(model.prompter.target_ids(ex.target, max_target_len))
        mems.append(ex_mems)
    fed = None
    if target_dropout > 0:  # drawn only when asked, so the template choices above stay as they were
        mask = dropout_id(model)
        fed = [[mask if rng.random() < target_dropout else tok for tok in t] for t in targets]
    extra = {}
    with model.adapter("generator"):
        if salient_weight == 1.0:
            ce = model.response_loss(prompt_rows, targets, mems, fed=fed)
        else:
            per_token = model.response_loss(prompt_rows, targets, mems, fed=fed, reduction="none")
            w = torch.tensor([x for ex, t in zip(batch, targets) for x in salient_weights(model, ex.target, t,
                                                                                          salient_weight)],
                             device=per_token.device)
            ce = (per_token * w).sum() / w.sum()
            extra["ce_plain"] = per_token.mean().item()
    mse = alignment_mse(enc, align)
    loss = ce + mse_weight * mse
    return loss, {"ce": ce.item(), "mse": mse.item(), "doc_tokens": float(enc.n_tokens.sum()),
                  "mem_tokens": float(enc.n_mem.sum()), **extra}


def _select_trainable(model: ClaraModel, stage: str, cfg: SCPConfig) -> None:
    """Stage 1 trains the compressor, the generator and the memory-token rows; stage 2 the same, or the generator
    alone with ``freeze_compressor`` (and from a fresh generator adapter with ``fresh_generator``); either stage the
    compressor and the rows alone with ``freeze_generator``."""
    if stage == "instruct" and cfg.fresh_generator:
        model.reset_adapter("generator")
    if stage == "instruct" and cfg.freeze_compressor:
        model.set_trainable(["generator"], special=False)
    elif cfg.freeze_generator:
        model.set_trainable(["compressor"], special=True)
    else:
        model.set_trainable(["compressor", "generator"], special=True)


def _param_groups(model: ClaraModel, cfg: SCPConfig) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """The trainable parameters, in one group at the full rate, or, with ``compressor_lr_scale`` < 1, the generator
    at the full rate and the rest (compressor adapter, special rows) at the fraction. One group when the scale is 1
    keeps the optimizer state of earlier checkpoints loadable."""
    params = model.trainable_parameters()
    if cfg.compressor_lr_scale == 1.0:
        return params
    generator = {id(p) for p in model.adapter_parameters("generator")}
    return [{"params": [p for p in params if id(p) in generator]},
            {"params": [p for p in params if id(p) not in generator],
             "lr": cfg.train.optim.lr * cfg.compressor_lr_scale}]


def _accumulate_gradients(model: ClaraModel, examples: Sequence[Example], step: int, cfg: SCPConfig,
                          dist) -> tuple[dict[str, float], int]:
    """One optimizer step's micro-batches, forward and backward (this process's slice of each): the summed
    metrics (loss, ce, mse averaged over micro-batches; token counts summed) and the documents the step read."""
    train = cfg.train
    sums = {"loss": 0.0, "ce": 0.0, "mse": 0.0, "doc_tokens": 0.0, "mem_tokens": 0.0}
    n_docs = 0
    for micro in range(train.grad_accum):
        idx = dist.shard(batch_indices(step, micro, train, len(examples)))
        batch = [examples[i] for i in idx]
        n_docs += sum(len(ex.docs) for ex in batch) * dist.world
        # the dropout draw depends on the step, the micro-batch and the rank only: a resumed run draws the same
        rng = random.Random(train.seed * 1_000_003 + (step * train.grad_accum + micro) * dist.world + dist.rank)
        loss, parts = compressed_lm_loss(model, batch, cfg.mse_weight, cfg.max_target_len, rng,
                                         cfg.target_dropout, cfg.salient_weight, cfg.align)
        (loss / train.grad_accum).backward()
        sums["loss"] += loss.item() / train.grad_accum
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + (v / train.grad_accum if k in ("ce", "mse", "ce_plain") else v)
    return sums, n_docs


def train_scp(model: ClaraModel, records: Sequence[SCPRecord], cfg: SCPConfig, out_dir: str | Path, *,
              stage: str = "scp", callback: MetricsCallback | None = None, resume: bool = True,
              progress: bool = True, start: str | None = None) -> Path:
    """Train compressor + generator (+ special rows) and write the final checkpoint to ``out_dir/model``.

    Args:
        stage: ``scp`` (stage 1) or ``instruct`` (stage 2: QA over k documents; the generator adapter is
            re-initialised first only with ``cfg.fresh_generator``).
        callback: receives ``(step, metrics)``: loss, ce, mse, lr, grad_norm, steps_per_s, docs_per_s.
        resume: continue from the latest step checkpoint in ``out_dir`` if there is one; a finished run
            returns at once. Checkpoints of other settings, data or ``start`` are refused (``run_identity``).
        start: ``checkpoint_digest`` of the checkpoint ``model`` was loaded from (None: built from scratch).

    Returns:
        The final checkpoint folder.
    """
    out_dir = Path(out_dir)
    final = out_dir / "model"
    examples = build_examples(records, stage, model.cfg.layout)
    if not examples:
        raise ValueError("no training examples")
    train = cfg.train
    steps = total_steps(train, len(examples))
    extra = {"stage": stage, "total_steps": steps, **run_identity(cfg, records, start=start)}
    identity = {**extra, "defaults": to_dict(type(cfg)())}  # not saved: what an unrecorded setting was trained as
    if resume and run_finished(final, stage, steps, identity):
        load_adapter_weights(model, final)
        return final
    torch.manual_seed(train.seed)
    _select_trainable(model, stage, cfg)
    optimizer, scheduler = build_optimization(_param_groups(model, cfg), train.optim, steps)
    ckpt = Checkpointer(out_dir, train.keep_checkpoints)
    start = ckpt.restore(model, optimizer, scheduler, stage=stage, resume=resume, identity=identity)
    dist = setup()  # several processes under torchrun: each takes a slice of every batch
    log = MetricsLog(out_dir, callback, start) if dist.main else None

    model.peft.train()
    bar = tqdm(total=steps, initial=start, desc=stage, unit="step", disable=not (progress and dist.main),
               dynamic_ncols=True)
    for step in range(start, steps):
        t0 = time.perf_counter()
        sums, n_docs = _accumulate_gradients(model, examples, step, cfg, dist)
        grad_norm = optimizer_step(model, optimizer, scheduler, train, dist)

        dt = time.perf_counter() - t0
        done = step + 1
        if done % train.log_every == 0 or done == steps:
            sums = dist.mean(sums)  # a collective: every rank takes part, rank 0 alone logs
            if log is not None:
                log(done, {"loss": sums["loss"], "ce": sums["ce"], "mse": sums["mse"],
                           "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "real_ratio": sums["doc_tokens"] / max(1.0, sums["mem_tokens"]),
                           "steps_per_s": 1.0 / dt, "docs_per_s": n_docs / dt,
                           **({"ce_plain": sums["ce_plain"]} if "ce_plain" in sums else {})})
        bar.set_postfix(loss=f"{sums['loss']:.3f}", ce=f"{sums['ce']:.3f}", mse=f"{sums['mse']:.4f}")
        bar.update(1)
        if dist.main and (done % train.checkpoint_every == 0 or done == steps):
            ckpt.save(model, optimizer, scheduler, done, extra)
    bar.close()
    model.peft.eval()
    return save_final(model, final, extra, steps, dist)

