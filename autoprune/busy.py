"""Busy-machine guard: latency measurements other work on the machine spread out, and the
budget verdicts they could have flipped.

A measurement is *busy* when its p90 is more than 1.5x its median
(:attr:`~autoprune.latency.LatencyStats.busy`): over a tenth of its runs were slowed down,
enough to move the median. Other work only ever slows a run down, so the latency the plan has
on a quiet machine lies between its fastest run and the measured value, and a latency budget
in between could go either way. The summary, ``autoprune plan`` and the report list such
measurements with their numbers; the progress line flags them as they happen.

Example:
    >>> from autoprune.busy import busy_measurements
    >>> [m.flips for m in busy_measurements(results, config)]  # doctest: +SKIP
    [['latency<2ms'], []]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autoprune.metrics import BUSY, CV, FASTEST, latency_key
from autoprune.trial import TrialResult

if TYPE_CHECKING:
    from autoprune.run.config import RunConfig

__all__ = ["BusyMeasurement", "busy_measurements", "busy_lines", "busy_note"]

_SHOWN = 10  # busy measurements listed one by one (the rest are counted)


@dataclass
class BusyMeasurement:
    """One trial's latency on one target, measured while the machine was busy."""

    trial: TrialResult  # the trial
    target: str  # target name
    p50: float  # measured median (ms)
    p90: float  # measured 90th percentile (ms)
    cv: float  # coefficient of variation of the timed runs
    fastest: float  # fastest timed run (ms): about what a quiet machine would measure
    flips: list[str] = field(default_factory=list)  # budgets whose verdict could flip

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial.number, "target": self.target, "p50_ms": self.p50,
                "p90_ms": self.p90, "cv": self.cv, "fastest_ms": self.fastest,
                "could_flip": self.flips}

    def describe(self) -> str:
        return (f"trial {self.trial.number} on {self.target}: p50 {self.p50:.3f} ms, p90 "
                f"{self.p90:.3f} ms ({self.p90 / self.p50:.2f}x p50), CV {self.cv:.0%}, "
                f"fastest run {self.fastest:.3f} ms")


def busy_note(result: TrialResult, targets: list[str]) -> str:
    """A short flag for the progress line, e.g. ``BUSY@cpu-1t p90/p50 2.98 CV 61%``."""
    notes = []
    for t in targets:
        m = result.metrics
        if m.get(BUSY + t) and m.get(latency_key(t)):
            ratio = m.get(latency_key(t, "p90"), math.nan) / m[latency_key(t)]
            notes.append(f"BUSY@{t} p90/p50 {ratio:.2f} CV {m.get(f'latency_cv@{t}', 0):.0%}")
    return " ".join(notes)


def busy_measurements(results: list[TrialResult], config: RunConfig) -> list[BusyMeasurement]:
    """Every busy measurement of a run, with the latency budgets whose verdict it could flip
    (the budget lies between the fastest run and the measured statistic)."""
    budgets = [b for b in config.parsed_budgets() if b.metric == "latency"
               and not math.isnan(b.value)]
    found = []
    for r in results:
        for t in config.target_names:
            m = r.metrics
            if not m.get(BUSY + t) or latency_key(t) not in m:
                continue
            fastest = m.get(FASTEST + t, math.nan)
            flips = [b.describe() for b in budgets if b.limits_latency_on(t, config.primary)
                     and fastest <= b.value <= m.get(latency_key(t, b.statistic), -math.inf)]
            found.append(BusyMeasurement(r, t, m[latency_key(t)], m[latency_key(t, "p90")],
                                         m.get(CV + t, math.nan), fastest, flips))
    return found


def busy_lines(results: list[TrialResult], config: RunConfig) -> list[str]:
    """Markdown lines on the run's busy measurements (none when the machine was quiet)."""
    busy = busy_measurements(results, config)
    if not busy:
        return []
    measured = sum(latency_key(t) in r.metrics for r in results for t in config.target_names)
    lines = ["## Busy machine", "",
             f"{len(busy)} of {measured} latency measurements were taken while the machine was "
             f"busy (p90 above 1.5x the median): other work slowed their runs down, so their "
             f"medians may be too high. Measure again on a quiet machine, e.g. `autoprune "
             f"bench --plan PLAN`.", ""]
    flips = [b for b in busy if b.flips]
    shown = flips + [b for b in busy if not b.flips]
    lines += [f"- {b.describe()}" + (f"; its verdict on {', '.join(b.flips)} could flip "
                                     f"({b.trial.status})" if b.flips else "")
              for b in shown[:_SHOWN]]
    if len(shown) > _SHOWN:
        lines.append(f"- ... {len(shown) - _SHOWN} more in trials.jsonl ({BUSY}TARGET)")
    if flips:
        lines += ["", "Budget verdicts that could flip (the budget lies between the fastest "
                      "run and the measured value): "
                  + ", ".join(f"trial {b.trial.number} ({', '.join(b.flips)} on {b.target})"
                              for b in flips) + "."]
    return lines
