"""The gold answer's likelihood: what a system's prompt (documents as text, memory vectors, or nothing) makes
of the right answer, teacher-forced. Unlike CEM or F1 it does not depend on how long the system answers, so it
compares systems that answer in a word with systems that answer in a sentence."""

from __future__ import annotations

from typing import Sequence

import torch


def answer_nll(model, rows: Sequence[list[int]], answers: Sequence[str],
               memories: Sequence[list[torch.Tensor]] | None, adapter: str | None, batch_size: int = 8
               ) -> tuple[float, list[float]]:
    """Mean NLL per answer token of ``answers`` after the prompt ``rows`` (memory vectors spliced in when given),
    under ``adapter``; teacher-forced, without EOS (a base model that answers in sentences would pay for it).
    Returns the mean over all answer tokens and each answer's own mean (for paired comparisons)."""
    targets = [model.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    per_answer: list[float] = []
    total, tokens = 0.0, 0
    model.peft.eval()
    with torch.no_grad(), model.adapter(adapter):
        for s in range(0, len(rows), batch_size):
            t = targets[s: s + batch_size]
            mems = [list(m) for m in memories[s: s + batch_size]] if memories is not None else [[] for _ in t]
            losses = model.response_loss(list(rows[s: s + batch_size]), t, mems, reduction="none")
            at = 0
            for x in t:
                per_answer.append(float(losses[at: at + len(x)].mean()))
                at += len(x)
            total += float(losses.sum())
            tokens += sum(len(x) for x in t)
    return total / tokens, per_answer
