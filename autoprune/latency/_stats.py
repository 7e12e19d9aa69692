"""Latency statistics of timed runs: the record every measurement returns, and the median's
confidence interval the stopping rule and the cache read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from autoprune.errors import TargetError

__all__ = ["LatencyStats", "BUSY_P90_P50", "summarize", "median_ci", "median_ci_rel"]

_Z95 = 1.959964  # two-sided 95 % normal quantile
# A measurement whose p90 exceeds its median by this factor was taken on a busy machine: more
# than a tenth of its runs were slowed down, enough to shift the median (on this 2-core VM, a
# quiet machine gave p90/p50 of 1.02-1.30; one busy-loop process beside a 1 ms model, 8-24).
BUSY_P90_P50 = 1.5


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model on one target, in milliseconds per inference (one batch).

    Example:
        >>> stats = summarize([1.0, 1.1, 1.2, 1.0, 1.05])
        >>> stats.p50_ms, stats.runs, stats.value("p50") == stats.p50_ms
        (1.05, 5, True)
    """

    p50_ms: float  # median
    p90_ms: float  # 90th percentile
    mean_ms: float  # mean of the timed runs
    std_ms: float  # standard deviation of the timed runs
    cv: float  # coefficient of variation: std / mean
    runs: int  # number of timed runs
    ci_rel: float  # 95 % CI half-width of the median, relative to the median
    min_ms: float  # fastest run
    cached: bool = field(default=False, compare=False)  # True when served from a LatencyCache
    screened: bool = field(default=False, compare=False)  # quick screening protocol, not full

    @property
    def busy(self) -> bool:
        """Taken on a busy machine: the p90 is more than ``BUSY_P90_P50`` times the median."""
        return self.p90_ms > BUSY_P90_P50 * self.p50_ms

    def value(self, statistic: str = "p50") -> float:
        """The statistic a budget compares against: ``"p50"``, ``"p90"`` or ``"mean"`` (ms)."""
        values = {"p50": self.p50_ms, "p90": self.p90_ms, "mean": self.mean_ms}
        if statistic not in values:
            raise TargetError(f"unknown latency statistic {statistic!r}; use p50, p90 or mean")
        return values[statistic]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cached")
        data.pop("screened")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyStats:
        known = {f.name for f in fields(cls)} - {"cached", "screened"}
        missing = known - set(data)
        if missing:
            raise ValueError(f"latency stats miss field(s) {', '.join(sorted(missing))}")
        return cls(
            **{k: (int(data[k]) if k == "runs" else float(data[k])) for k in known}
        )


def median_ci(samples: Sequence[float]) -> tuple[float, float]:
    """Distribution-free 95 % CI of the median (order statistics): (low, high)."""
    n = len(samples)
    if n < 3:
        return -math.inf, math.inf
    xs = sorted(samples)
    half = _Z95 * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half))
    return xs[lo], xs[hi]


def median_ci_rel(samples: Sequence[float]) -> float:
    """Half-width of the median's 95 % CI (:func:`median_ci`), relative to the median."""
    low, high = median_ci(samples)
    median = float(np.median(samples)) if len(samples) else 0.0
    return (high - low) / 2 / median if median > 0 and math.isfinite(high) else math.inf


def summarize(samples_ms: Sequence[float]) -> LatencyStats:
    """Statistics of timed runs (milliseconds)."""
    if not samples_ms:
        raise ValueError("no timed runs")
    xs = np.asarray(samples_ms, dtype=np.float64)
    mean = float(xs.mean())
    std = float(xs.std(ddof=1)) if xs.size > 1 else 0.0
    return LatencyStats(
        p50_ms=float(np.percentile(xs, 50)),
        p90_ms=float(np.percentile(xs, 90)),
        mean_ms=mean,
        std_ms=std,
        cv=std / mean if mean > 0 else 0.0,
        runs=int(xs.size),
        ci_rel=median_ci_rel(samples_ms),
        min_ms=float(xs.min()),
    )
