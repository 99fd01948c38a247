"""The promotion rule: a challenger replaces production only on evidence, not on a difference of two means.

Both versions answer the same questions; the gain is the mean of the per-question differences, and its 95%
interval comes from a paired bootstrap (questions resampled with replacement, the same draw for both versions, so
what the two share cancels out). The challenger is promoted when the interval's lower end clears ``margin``, the
mean gain is positive, and its p95 latency over those questions is at most ``1 + max_latency_regression`` times
production's. Over 30 questions a real gain of a few F1 points usually does not clear the bar: that is the point.

Latency is compared as a ratio to a reference measured in the same evaluation run when both runs have one (the
raw-text system answering the same questions on the same machine): two evaluations hours apart on a shared CPU
differ by 20-35 % in absolute p95 for the *same* system, which would decide the gate by machine load alone. The
reference enters as its median, not its p95: over ~30 questions a p95 is one or two answers, and one answer
stalled by a neighbour's burst (measured: the reference's p95 at 92 s beside a median of 6 s while a training
run shared the cores) would make every later challenger look slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class GateRule:
    margin: float = 0.0
    """The interval's lower end must be at least this (in the metric's units) for a promotion."""
    max_latency_regression: float = 0.10
    """The challenger's p95 latency may be at most this much worse (0.10: 10 %)."""
    confidence: float = 0.95
    resamples: int = 10_000
    seed: int = 0
    """Seeds the bootstrap: the same evidence always gives the same decision."""

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be at least 100, got {self.resamples}")
        if self.max_latency_regression < 0:
            raise ValueError(f"max_latency_regression must be >= 0, got {self.max_latency_regression}")


@dataclass(frozen=True)
class PairedGain:
    n: int
    gain: float
    """Mean of challenger - production (production - challenger for a lower-is-better metric)."""
    low: float
    high: float
    confidence: float


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    gain: PairedGain
    latency_p95: float | None
    """The challenger's p95 latency over the paired questions, ms (None when latencies are missing)."""
    production_latency_p95: float | None
    latency_ok: bool
    latency_change: float | None = None
    """The compared change: challenger / production - 1, of p95 relative to the same-run reference's median when
    runs have one, else of absolute p95."""


class NotComparable(ValueError):
    """The two versions did not answer the same questions: there is nothing to pair."""


def paired_bootstrap(challenger: np.ndarray, production: np.ndarray, rule: GateRule = GateRule()) -> PairedGain:
    """Interval of the mean paired difference ``challenger - production``."""
    a, b = np.asarray(challenger, dtype=np.float64), np.asarray(production, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two equal-length lists, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no paired questions")
    diff = a - b
    rng = np.random.default_rng(rule.seed)
    means = diff[rng.integers(0, diff.size, size=(rule.resamples, diff.size))].mean(axis=1)
    tail = 100 * (1 - rule.confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedGain(int(diff.size), float(diff.mean()), float(low), float(high), rule.confidence)


def judge(metric: str, challenger: Mapping[str, float], production: Mapping[str, float], *,
          challenger_latency: Mapping[str, float] | None = None,
          production_latency: Mapping[str, float] | None = None,
          challenger_reference: Mapping[str, float] | None = None,
          production_reference: Mapping[str, float] | None = None,
          higher_is_better: bool = True, rule: GateRule = GateRule()) -> Verdict:
    """Decide on per-question scores keyed by question id (and per-question latencies in ms, when known).

    ``*_reference`` are per-question latencies of a reference system from the same evaluation run as each
    version's own; with both, latency is judged relative to them (see the module's note).

    Raises:
        NotComparable: the challenger answered questions production did not (or none at all).
    """
    missing = sorted(set(challenger) - set(production))
    if not challenger or missing:
        raise NotComparable(f"production answered {len(set(challenger) & set(production))} of the challenger's "
                            f"{len(challenger)} questions (e.g. missing {missing[:3]})")
    ids = sorted(challenger)
    a = np.array([challenger[q] for q in ids])
    b = np.array([production[q] for q in ids])
    gain = paired_bootstrap(a, b, rule) if higher_is_better else paired_bootstrap(b, a, rule)

    def over_ids(values: Mapping[str, float] | None, q: float) -> float | None:
        """The q-th percentile over the paired questions (None when any is missing)."""
        if not values or not all(i in values for i in ids):
            return None
        return float(np.percentile([values[i] for i in ids], q))

    lat_c, lat_p = over_ids(challenger_latency, 95), over_ids(production_latency, 95)
    ref_c, ref_p = over_ids(challenger_reference, 50), over_ids(production_reference, 50)
    latency_ok, change = True, None
    if lat_c is None or lat_p is None:
        lat_c = lat_p = None
        latency = "p95 latency not compared (no per-question latencies)"
    elif ref_c and ref_p:
        rel_c, rel_p = lat_c / ref_c, lat_p / ref_p
        change = rel_c / rel_p - 1
        latency_ok = rel_c <= (1 + rule.max_latency_regression) * rel_p
        latency = (f"p95 latency {lat_c:.0f} ms vs {lat_p:.0f} ms, {rel_c:.3f} vs {rel_p:.3f} of the same run's "
                   f"reference median ({change:+.0%}, limit +{rule.max_latency_regression:.0%})")
    else:
        change = lat_c / lat_p - 1 if lat_p else None
        latency_ok = lat_c <= (1 + rule.max_latency_regression) * lat_p
        latency = (f"p95 latency {lat_c:.0f} ms vs {lat_p:.0f} ms ("
                   f"{'n/a' if change is None else format(change, '+.0%')}, limit +{rule.max_latency_regression:.0%})")
    evidence = gain.low >= rule.margin and gain.gain > 0
    interval = (f"{metric} gain {gain.gain:+.4f}, {100 * gain.confidence:.0f}% CI [{gain.low:+.4f}, "
                f"{gain.high:+.4f}] over {gain.n} paired questions")
    if evidence and latency_ok:
        return Verdict(True, f"{interval}: lower end >= {rule.margin:g}; {latency}", gain, lat_c, lat_p, True,
                       change)
    why = []
    if not evidence:
        why.append(f"lower end {gain.low:+.4f} < margin {rule.margin:g}" if gain.low < rule.margin
                   else "no positive mean gain")
    if not latency_ok:
        why.append("latency regression")
    return Verdict(False, f"{interval}; {latency}: not promoted ({', '.join(why)})", gain, lat_c, lat_p, latency_ok,
                   change)
