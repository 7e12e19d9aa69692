"""The keys of a trial's metrics: the one module that spells them.

A trial's metrics are one flat dict of floats (what ``trials.jsonl``, the plan files and the
summary carry). Per-target values are ``PREFIX + target``: ``latency_p50_ms@cpu-1t``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["TrialStatus", "Direction", "STATISTICS", "latency_key", "latency_metrics", "LATENCY",
           "CV", "CI", "SCREENED", "BUSY", "FASTEST", "SPEEDUP", "DENSE_END", "SIDE_BY_SIDE",
           "PREDICTED", "DENSE"]



class TrialStatus(str, Enum):
    """How a trial ended. A member equals its value and prints as it (``complete``), so
    trials.jsonl, trials.csv and the summary hold the plain word."""

    COMPLETE = "complete"  # fine-tuned and evaluated
    INFEASIBLE = "infeasible"  # broke a cost budget: stopped before fine-tuning
    PRUNED = "pruned"  # stopped early by the search's pruner
    FAILED = "failed"  # an error; the trial's reason says which

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # a dict keyed by the word finds the member, and back


class Direction(str, Enum):
    """Which way an objective or a task's metric is better; equals and prints as its value."""

    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # a dict keyed by the word finds the member, and back

    @property
    def sign(self) -> float:
        """+1 for maximize, -1 for minimize: ``sign * value`` is larger when better."""
        return 1.0 if self is Direction.MAXIMIZE else -1.0


STATISTICS = ("p50", "p90", "mean")  # latency statistics a budget may name
LATENCY = "latency_"  # every latency-derived key starts with this
CV = "latency_cv@"  # coefficient of variation of the timed runs
CI = "latency_ci@"  # 95 % CI half-width of the median, relative to the median
# A latency from the quick screening protocol; the search re-measures its fronts with the full
# protocol and drops the mark.
SCREENED = "latency_screened@"
# 1.0 when the measurement's p90 was more than BUSY_P90_P50 x its median (LatencyStats.busy)
BUSY = "latency_busy@"
FASTEST = "latency_min_ms@"  # the fastest timed run (ms)
# Set at the end of a search (search/_confirm.py): dense / plan latency timed side by side, and
# the dense model's latency (the target's statistic) in that same run.
SPEEDUP = "speedup@"
DENSE_END = "dense_end_ms@"
# A plan's latency as a fraction of the dense model's, the two timed side by side at the end
# of a search ("side_by_side_latency_p50_ms@cpu-1t")
SIDE_BY_SIDE = "side_by_side_"
PREDICTED = "predicted_"  # the cost model's prediction of a cost metric ("predicted_macs")
DENSE = "dense_"  # the dense model's value timed beside a shipped plan (apply's metrics.json)


def latency_key(target: str, statistic: str = "p50") -> str:
    """Metrics key of a latency value, e.g. ``latency_p50_ms@cpu-1t``."""
    return f"{LATENCY}{statistic}_ms@{target}"


def latency_metrics(target: str, stats: Any) -> dict[str, float]:
    """Metrics of one latency measurement (``LatencyStats``): every statistic a budget names."""
    return {latency_key(target, s): stats.value(s) for s in STATISTICS}
