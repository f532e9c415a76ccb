"""Paired comparisons of two candidates answering the same questions: the difference of their mean
per-question scores with a 95 % paired bootstrap interval (a fixed seed: the same answers give the
same interval, byte for byte) and, for right/wrong scores, the exact McNemar p-value on the
questions where they disagree. A difference counts only when its interval excludes 0."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

SEED = 20260601
RESAMPLES = 10_000
CONFIDENCE = 0.95
# A category gets its own comparison only with at least this many questions: below it an interval
# spans most of the scale and says nothing.
MIN_CATEGORY_QUESTIONS = 30


@dataclass(frozen=True)
class Paired:
    """``a`` against ``b`` on the same ``n`` questions."""

    delta: float  # mean(a) - mean(b)
    low: float  # the 95 % interval of delta
    high: float
    p_value: float  # exact McNemar, two-sided (1.0 when no question is scored right/wrong by both)
    n: int
    a_only: int  # questions a gets right and b wrong (right/wrong scores)
    b_only: int

    @property
    def better(self) -> bool:
        """``a`` significantly better than ``b``."""
        return self.low > 0

    @property
    def worse(self) -> bool:
        """``a`` significantly worse than ``b``."""
        return self.high < 0

    def text(self, what: str = "accuracy") -> str:
        """``Δ accuracy +0.015, 95 % CI −0.031…+0.061, McNemar p=0.64``."""
        return (f"Δ {what} {self.delta:+.3f}, 95 % CI {self.low:+.3f}…{self.high:+.3f}, "
                f"McNemar p={self.p_value:.3g} ({self.a_only} vs {self.b_only} questions)")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_delta": self.delta, f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high,
                f"{prefix}_p_value": self.p_value}  # fmt: skip


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar test: under no difference each discordant question is a fair coin."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: Sequence[float], b: Sequence[float], seed: int = SEED, resamples: int = RESAMPLES) -> Paired:
    """``a`` minus ``b``, per-question scores of the same questions in the same order."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or not len(x):
        raise ValueError(f"paired scores need two equal, non-empty lists, got {x.shape} and {y.shape}")
    diff = x - y
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    binary = np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()
    a_only, b_only = (int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())) if binary else (0, 0)
    return Paired(_r(diff.mean()), _r(low), _r(high), _r(mcnemar_exact(a_only, b_only) if binary else 1.0),
                  len(diff), a_only, b_only)  # fmt: skip


def by_category(a: Sequence[float], b: Sequence[float], categories: Sequence[str]) -> dict[str, Paired]:
    """``paired`` within each category of at least MIN_CATEGORY_QUESTIONS questions."""
    out = {}
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        if len(idx) >= MIN_CATEGORY_QUESTIONS:
            out[cat] = paired([a[i] for i in idx], [b[i] for i in idx])
    return out


def interval(scores: Sequence[float], seed: int = SEED, resamples: int = RESAMPLES) -> tuple[float, float]:
    """The 95 % bootstrap interval of one candidate's mean score (the plot's error bars)."""
    x = np.asarray(scores, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return _r(low), _r(high)


def _r(value) -> float:
    """Rounded so that a value survives JSON, metrics and tags unchanged."""
    return round(float(value), 6)
