"""Where a retrieval's time goes: milliseconds per named stage, one entry per call, for the served path's
benchmark and the evaluation table. Timing is opt-in (``None`` times nothing), so the served path pays nothing."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import numpy as np

STAGES = ("query reasoner", "question embedding", "first stage", "candidate fetch", "re-rank")
"""The served path's stages, in the order they run: the query reasoner's forward and the sentence encoder's on
the question (both per batch of questions, counted per question), the first stage's SQL (lexical, dense and their
fusion are one statement), reading the candidates' memories and rows (one statement), and the flattened-cosine
re-rank."""


class StageTimes:
    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, stage: str, per: int = 1) -> Iterator[None]:
        """Time the enclosed block as ``stage``; ``per``: items it served (a batch), each charged its share."""
        t0 = time.perf_counter()
        yield
        share = (time.perf_counter() - t0) * 1000.0 / max(1, per)
        self.ms[stage].extend([share] * max(1, per))

    def p50(self) -> dict[str, float]:
        return {s: float(np.percentile(v, 50)) for s, v in self.ms.items() if v}


def timed(times: StageTimes | None, stage: str, per: int = 1) -> contextlib.AbstractContextManager:
    return times(stage, per) if times is not None else contextlib.nullcontext()
