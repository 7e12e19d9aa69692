"""Checks a search runs before its first trial: input that can only fail fails here, as a usage
error (exit code 2) naming the problem and the fix, before any trial runs or any run directory
is written.

- ``--trials`` is at least 1;
- budgets fit their metric (a fraction such as accuracy is within [0, 1]) and do not contradict
  each other (``latency<1ms`` with ``latency>2ms``);
- every target's ONNX Runtime execution providers exist where it measures;
- every remote target answers ``GET /info`` within a few seconds and accepts the token;
- a criterion the space offers that cannot rank some of the model's groups (``bn_scale``
  where no BatchNorm follows) is a warning naming them (``check_criteria``).

One check needs measurements, so it runs after the dense model and the steering's cost profile
are measured, still before the first trial and before ``run.json`` is written: the space can
reach every upper cost budget (``check_reach``; not with ``--no-steer``, which measures no
profile, nor on ``--resume``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from autoprune.budget import Budget
from autoprune.errors import BudgetError, TargetError, UsageError

__all__ = ["check_trials", "check_budgets", "check_targets", "check_reach", "check_criteria",
           "REMOTE_TIMEOUT"]

REMOTE_TIMEOUT = 4.0  # seconds to connect to and hear from a latency server's /info


def check_criteria(space: Any, groups: list) -> list[str]:
    """Warnings for the space's structured criteria that cannot rank some of ``groups`` (the
    inspection's): trials rank those by l1 and record it as a fallback."""
    from autoprune.criteria import get_criterion

    if "structured" not in space.modes:
        return []
    warnings = []
    for name in space.criteria:
        criterion = get_criterion(name)
        if criterion.calibration != "none":  # data-aware criteria rank every group
            continue
        cannot = [g.name for g in groups if criterion.group_importance(None)(g.tp_group) is None]
        if cannot:
            warnings.append(
                f"criterion {name!r} of search space {space.name!r} cannot rank {len(cannot)} "
                f"of {len(groups)} groups (e.g. {cannot[0]}): trials rank them by l1 and record "
                f"it (fallbacks in trials.jsonl and the summary); drop {name!r} from the space's "
                f"criteria to search only what applies")
    return warnings


def check_trials(trials: int) -> None:
    """``trials`` is a whole number >= 1."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UsageError(f"--trials must be at least 1, got {trials!r}: pass the number of "
                         f"trials to run, e.g. --trials 40")


def check_budgets(budgets: list[Budget], metric: Any, primary: str) -> None:
    """Budgets within their metric's bounds, and no two that exclude each other."""
    bounds = getattr(metric, "bounds", None)
    for b in budgets:
        if bounds is not None and b.metric == metric.name:
            _check_bounds(b, bounds)
    lower: dict[tuple, Budget] = {}
    upper: dict[tuple, Budget] = {}
    for b in budgets:
        key = (b.metric_key(primary), b.fraction is not None)
        side = lower if b.op in (">", ">=") else upper
        if key not in side or _tighter(b, side[key]):
            side[key] = b
    for key, low in lower.items():
        high = upper.get(key)
        if high is not None and not _overlap(low, high):
            kind = "share of the dense model's " if key[1] else ""
            raise BudgetError(
                f"budgets {low.text!r} and {high.text!r} contradict each other: no "
                f"{kind}{_label(low)} is both {low.op} {_shown(low)} and {high.op} "
                f"{_shown(high)}; drop or fix one of them")


def check_reach(steering: Any, space: Any, reference: dict[str, float], primary: str,
                measure_full: Callable[[Any], dict[str, float]]) -> list[str]:
    """Upper cost budgets that even the space's most pruned plan (the cost profile's fastest
    at the highest sparsity: uniform, with every block it may drop dropped, or with whole conv
    groups; a latency timed again with the full protocol) breaks: a BudgetError naming the
    fix, before any trial. Where INT8 in the space may still reach a latency or size budget,
    a warning is returned instead."""
    if steering is None or steering.most_pruned is None:
        return []
    plan, metrics = steering.most_pruned
    warnings, full = [], None
    for b in steering.budgets:
        key = b.metric_key(primary)
        value = metrics.get(key)
        if value is None or b.satisfied(value):
            continue
        if b.metric == "latency":  # a screened value: decided by the full protocol
            full = full or measure_full(plan)
            value = full.get(key, value)
            if b.satisfied(value):
                continue
        dense = reference.get(key)
        unit = {"latency": " ms", "size": " B"}.get(b.metric, "")
        share = f" ({value / dense:.0%} of the dense model)" if dense else ""
        whole = ", whole conv groups" if plan.removes_whole_groups else ""
        text = (f"budget {b.describe()} is out of reach of search space {space.name!r}: its "
                f"most pruned plan (every searched group at sparsity {space.sparsity.high:g}, "
                f"{'structured' if 'structured' in space.modes else 'unstructured'}"
                f"{f', {len(plan.drop_blocks)} blocks dropped' if plan.drop_blocks else ''}"
                f"{whole}) "
                f"measures "
                f"{value:.4g}{unit}{share}")
        if b.metric in ("latency", "size") and any(q != "none" for q in space.quantize):
            warnings.append(f"{text}; only INT8 plans can meet it")
            continue
        suffix = b.text[b.text.index("@"):] if "@" in b.text else ""  # statistic, target
        looser = (f"{b.metric}<{math.ceil(100 * value / dense) + 2}%" if b.fraction and dense
                  else f"{b.metric}<{1.1 * value:.3g}{unit.strip()}") + suffix
        more = ("a space file with a higher sparsity `high`, or with `quantize: [none, int8]`"
                if "structured" in space.modes else
                "a space with structured modes (e.g. per_layer_structured): zeroed weights "
                "neither run faster nor count as fewer params")
        raise BudgetError(f"{text}. Raise the budget (e.g. {looser}), or let the space prune "
                          f"more: {more} (docs/plans-and-spaces.md)")
    return warnings


def _label(b: Budget) -> str:
    return f"{b.metric} ({b.statistic})" if b.metric == "latency" else b.metric


def _threshold(b: Budget) -> float:
    """The number a budget compares with: its share of the dense model's, or its value."""
    return b.fraction if b.fraction is not None else b.value


def _shown(b: Budget) -> str:
    return f"{100 * b.fraction:g}%" if b.fraction is not None else f"{b.value:g}"


def _tighter(b: Budget, other: Budget) -> bool:
    """``b`` excludes more than ``other`` (same side, same metric)."""
    x, y = _threshold(b), _threshold(other)
    if b.op in (">", ">="):
        return x > y or (x == y and b.op == ">")
    return x < y or (x == y and b.op == "<")


def _overlap(low: Budget, high: Budget) -> bool:
    lo, hi = _threshold(low), _threshold(high)
    return lo < hi or (lo == hi and low.op == ">=" and high.op == "<=")


def _check_bounds(b: Budget, bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    ok = {">=": b.value <= hi, ">": b.value < hi, "<=": b.value >= lo, "<": b.value > lo}[b.op]
    if ok and lo <= b.value <= hi:
        return
    hint = ""
    if hi == 1 and 1 < b.value <= 100:
        hint = (f"; for {b.value:g} percent write {b.metric}{b.op}{b.value:g}% or "
                f"{b.metric}{b.op}{b.value / 100:g}")
    raise BudgetError(f"budget {b.text!r} can never be met: {b.metric} lies between {lo:g} and "
                      f"{hi:g}{hint}")


def check_targets(targets: list) -> None:
    """Providers available where each target measures; remote servers up, token accepted."""
    import onnxruntime as ort

    local = ort.get_available_providers()
    for target in targets:
        if target.is_remote:
            available = _remote_info(target).get("providers") or []
            where = f"the latency server at {target.remote}"
        else:
            available, where = local, "this machine"
        missing = [p for p in target.providers if p not in available]
        if missing:
            raise TargetError(
                f"target {target.name!r} needs ONNX Runtime execution provider(s) "
                f"{', '.join(missing)}, which {where} does not have (available: "
                f"{', '.join(available) or 'none'}); install the onnxruntime build that has "
                f"them there, or list only available providers in the target profile")


def _remote_info(target: Any) -> dict[str, Any]:
    """``GET /info`` of a remote target's server, with a short timeout."""
    from autoprune.latency import RemoteTarget
    from autoprune.latency._protocol import PROTOCOL_VERSION

    remote = dataclasses.replace(RemoteTarget.from_target(target), timeout=REMOTE_TIMEOUT)
    try:
        info = remote.info()
    except TargetError as e:
        raise TargetError(f"target {target.name!r}: {e}") from None
    if info.get("protocol") != PROTOCOL_VERSION:
        raise TargetError(
            f"target {target.name!r}: the latency server at {target.remote} speaks protocol "
            f"{info.get('protocol')!r}, this autoprune speaks {PROTOCOL_VERSION}; install the "
            f"same autoprune version on both machines")
    return info
