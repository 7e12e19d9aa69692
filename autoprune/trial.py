"""run_trial: THE trial function. Every backend calls it; nothing else prunes or measures.

Order of work (cheap first): prune -> params/FLOPs/size -> latency on every target -> stop if a
cost budget is broken -> fine-tune (intermediate reports for early stopping) -> evaluate.
A quantizing plan is timed and evaluated as the quantized ONNX model it ships.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from autoprune._filelock import file_lock
from autoprune.budget import Budget, Objective
from autoprune.criteria import get_criterion
from autoprune.errors import AutopruneError, MeasurementWarning, TrialFailure
from autoprune.metrics import (
    BUSY,
    CI,
    CV,
    FASTEST,
    SCREENED,
    TrialStatus,
    latency_metrics,
)
from autoprune.plan import LayerRule, PruningPlan

__all__ = ["TrialSettings", "TrialResult", "run_trial", "measure_plan", "prune_for_task"]


@dataclass
class TrialSettings:
    """Everything a trial needs besides the task and the plan."""

    targets: list  # latency Targets; the first one is the primary (objective) target
    budgets: list[Budget] = field(default_factory=list)  # hard constraints
    finetune: Any = None  # FinetuneSettings; None = the task's own
    calibration_batches: int = 4  # batches for data-aware criteria (taylor, activation, fisher)
    latency_cache: Any = None  # LatencyCache shared by trials (same shapes measured once)
    measure_lock: str | None = None  # lock file serializing measurements on one machine
    screen_latency: bool = True  # time with the targets' quick screening protocol
    # Evaluate (without fine-tuning) every plan that broke a budget; by default only one that
    # prunes nothing (the dense reference): a pruned model's metric before fine-tuning says
    # little and costs an evaluation.
    evaluate_infeasible: bool = False
    seed: int = 0  # seeds pruning (random criterion) and fine-tuning
    # The dense teacher's outputs on training batches (a recover.TeacherCache shared by the
    # search's trials); None: each trial's fresh dense model is the teacher
    teacher_cache: Any = None
    # Where calibration of reconstruction, fine-tuning and the fp32 evaluation run (a torch
    # device from device.resolve_device); pruning and latency stay on the CPU
    device: str = "cpu"

    @property
    def primary(self) -> str:
        return self.targets[0].name


@dataclass
class TrialResult:
    """What one trial measured. Plain data: backends store it, reports read it."""

    plan: PruningPlan  # the plan that was tried
    status: TrialStatus  # a plain string is taken as its TrialStatus
    metrics: dict[str, float] = field(default_factory=dict)  # measured values by key
    reason: str = ""  # why the trial is infeasible / pruned / failed
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    number: int | None = None  # trial number in the search
    params: dict[str, Any] = field(default_factory=dict)  # sampled search parameters
    baseline: str | None = None  # "dense" / "uniform-structured-0.5" for reference trials
    reused_from: int | None = None  # the earlier trial of the same plan whose result this is
    node: str | None = None  # the Ray node that ran the trial (its node id); None: in-process
    # groups the plan's criterion could not rank, and what ranked them ("bn_scale -> l1")
    fallbacks: dict[str, str] = field(default_factory=dict)
    # what did not run as configured (a MeasurementWarning: timing unpinned, stopper lost)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.status = TrialStatus(self.status)

    def feasible(self, budgets: list[Budget], primary: str) -> bool:
        return self.status == TrialStatus.COMPLETE and all(
            b.met_by(self.metrics, primary) for b in budgets)

    def values(self, objectives: list[Objective]) -> list[float] | None:
        vals = [self.metrics.get(o.key) for o in objectives]
        if any(v is None or not math.isfinite(v) for v in vals):
            return None
        return vals

    def constraints(self, budgets: list[Budget], primary: str) -> list[float]:
        return [b.violation(self.metrics.get(b.metric_key(primary))) for b in budgets]

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number, "status": self.status, "reason": self.reason,
            "baseline": self.baseline, "metrics": self.metrics, "timings": self.timings,
            "params": self.params, "plan": self.plan.to_dict(),
            **({"reused_from": self.reused_from} if self.reused_from is not None else {}),
            **({"node": self.node} if self.node is not None else {}),
            **({"fallbacks": self.fallbacks} if self.fallbacks else {}),
            **({"warnings": self.warnings} if self.warnings else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialResult:
        return cls(plan=PruningPlan.from_dict(d["plan"]), status=d["status"],
                   metrics=d.get("metrics", {}), reason=d.get("reason", ""),
                   timings=d.get("timings", {}), number=d.get("number"),
                   params=d.get("params", {}), baseline=d.get("baseline"),
                   reused_from=d.get("reused_from"), node=d.get("node"),
                   fallbacks=d.get("fallbacks", {}), warnings=d.get("warnings", []))


def _release_memory() -> None:
    """Free what the trial allocated and hand it back to the OS.

    Models of a different shape every trial fragment glibc's heap: without ``malloc_trim``
    the process grew from 0.9 to 1.7 GB over 30 digits trials; with it, it stays flat. The
    collection scans only objects made since the trial began (``gc.freeze`` at its start):
    a full collection over torch's and Optuna's objects took 0.1-0.2 s per trial.
    """
    gc.collect()
    gc.unfreeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start


def prune_for_task(task: Any, plan: PruningPlan, settings: TrialSettings) -> tuple[Any, Any, Any]:
    """Prune a fresh copy of the task's model as a trial does (calibration batches for the
    data-aware criteria): (the fresh model, the pruned copy, the PruneReport)."""
    from autoprune.prune import prune_model_

    model = task.build_model()
    needs_data = any(get_criterion(r.criterion).calibration != "none"
                     for r in [plan.default, *plan.rules.values()] if r.active)
    calibration = task.calibration_batches(settings.calibration_batches) if needs_data else None
    pruned = copy.deepcopy(model)
    report = prune_model_(pruned, plan, task.example_inputs, calibration=calibration,
                          loss_fn=task.loss_fn, seed=settings.seed, augment=task.augment_fn)
    return model, pruned, report


def _p50_limit(settings: TrialSettings, target: Any) -> float | None:
    """The tightest upper p50 latency budget on ``target`` (ms), or None."""
    return min((b.value for b in settings.budgets
                if b.limits_latency_on(target.name, settings.primary) and b.statistic == "p50"
                and b.op in ("<", "<=")), default=None)


def _near_other_budget(settings: TrialSettings, target: Any, stats: Any) -> bool:
    """A p90 / mean budget on ``target`` that a screened value is too close to call (within
    5 %): the stopping rule decides p50 budgets only, so these are measured in full."""
    from autoprune.latency._measure import SCREENING_TOLERANCE

    return any(abs(stats.value(b.statistic) / b.value - 1) < SCREENING_TOLERANCE
               for b in settings.budgets
               if b.limits_latency_on(target.name, settings.primary) and b.statistic != "p50"
               and b.value > 0)


def _shipped(task: Any, model: Any, plan: PruningPlan) -> bytes | None:
    """The quantized ONNX model a quantizing plan ships (None for an fp32 plan)."""
    from autoprune.quantize import quantize_model

    return None if plan.quantize == "none" else quantize_model(task, model, plan.quantize)


def _measure(task, model, plan: PruningPlan, settings: TrialSettings, targets: list,
             screen: bool, shipped: bytes | None = None) -> dict[str, float]:
    """Latency (and the quantized size) of a pruned model on ``targets``, as metrics.

    A quantizing plan is timed as its quantized ONNX model: ``shipped`` if given, else
    quantized here.

    Screening times a plan briefly, stops as soon as it surely breaks the target's p50 budget,
    and times on to full precision while the budget is inside the median's CI; a value within
    5 % of a p90 or mean budget is measured again in full.
    """
    from autoprune.latency import measure_latency

    metrics: dict[str, float] = {}
    subject: Any = model
    if plan.quantize != "none":
        subject = shipped if shipped is not None else _shipped(task, model, plan)
        metrics["size_bytes"] = float(len(subject))
    # Only one process on this machine times a model at a time (timings would interfere).
    lock = file_lock(settings.measure_lock) if settings.measure_lock else contextlib.nullcontext()
    with lock:
        for target in targets:
            stats = measure_latency(subject, task.example_inputs, target,
                                    cache=settings.latency_cache, screen=screen,
                                    limit_ms=_p50_limit(settings, target) if screen else None)
            if stats.screened and _near_other_budget(settings, target, stats):
                stats = measure_latency(subject, task.example_inputs, target,
                                        cache=settings.latency_cache)
            metrics.update(latency_metrics(target.name, stats))
            metrics[CV + target.name] = stats.cv
            metrics[CI + target.name] = stats.ci_rel
            metrics[FASTEST + target.name] = stats.min_ms
            metrics[BUSY + target.name] = float(stats.busy)
            if stats.screened:
                metrics[SCREENED + target.name] = 1.0
    return metrics


def measure_plan(task: Any, plan: PruningPlan, settings: TrialSettings, targets: list,
                 screen: bool = False) -> dict[str, float]:
    """Cost metrics of ``plan``: size and MACs, and latency on ``targets`` (full protocol
    unless ``screen``). No fine-tuning: cost depends on the pruned shapes only. The search
    measures the dense model, its cost profile and its fronts' re-measurements with it."""
    _, pruned, _ = prune_for_task(task, _shapes_only(plan), settings)
    return {**_cost_metrics(pruned, task.example_inputs),
            **_measure(task, pruned, plan, settings, targets, screen=screen)}


def _shapes_only(plan: PruningPlan) -> PruningPlan:
    """``plan`` with criteria that read calibration data replaced by l1: the pruned shapes,
    all that cost depends on, are the same, without the calibration passes."""
    def cheap(rule: LayerRule) -> LayerRule:
        data = get_criterion(rule.criterion).calibration != "none"
        return dataclasses.replace(rule, criterion="l1") if data else rule

    return dataclasses.replace(plan, default=cheap(plan.default),
                               rules={k: cheap(r) for k, r in plan.rules.items()})


def _cost_metrics(model: Any, example_inputs: tuple) -> dict[str, float]:
    from autoprune.stats import model_stats

    stats = model_stats(model, example_inputs)
    return {"params": float(stats.params), "nonzero_params": float(stats.nonzero_params),
            "macs": float(stats.macs), "flops": float(stats.flops),
            "size_bytes": float(stats.size_bytes)}


def _hopeless(settings: TrialSettings, metrics: dict[str, float]) -> list[Budget]:
    """Cost budgets that rule a plan out before fine-tuning, or [] if it may still ship.

    Every target keeps its own front, so a plan is stopped only if it breaks a budget that
    holds everywhere (params, FLOPs, size) or breaks a latency budget on every target.
    """
    broken = [b for b in settings.budgets
              if b.is_cost and not b.satisfied(metrics.get(b.metric_key(settings.primary)))]
    everywhere = [b for b in broken if b.metric != "latency"]
    if everywhere:
        return everywhere
    latency_broken_on = {b.target or settings.primary for b in broken}
    if all(t.name in latency_broken_on for t in settings.targets):
        return broken
    return []


def run_trial(
    task: Any,
    plan: PruningPlan,
    settings: TrialSettings,
    *,
    on_intermediate: Callable[[int, float], bool] | None = None,
) -> TrialResult:
    """Prune, measure, fine-tune and evaluate one plan. Never raises for a bad trial.

    Args:
        task: the :class:`~autoprune.task.Task`.
        plan: the plan to try.
        settings: targets, budgets, fine-tuning and caching.
        on_intermediate: called with (step, metric) during fine-tuning; returning True stops
            the trial as ``pruned`` (the backend's early-stopping rule).
    """
    clock = _Clock()
    metrics: dict[str, float] = {}
    fallbacks: dict[str, str] = {}
    gc.collect(1)  # young garbage from between trials, before it is frozen with the rest
    gc.freeze()  # what exists now outlives the trial: the end-of-trial collection skips it
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", MeasurementWarning)
            status, reason = _run(task, plan, settings, clock, metrics, fallbacks,
                                  on_intermediate)
    except TrialFailure as e:
        status, reason = TrialStatus.FAILED, e.reason
    except AutopruneError as e:
        status, reason = TrialStatus.FAILED, f"{type(e).__name__}: {e}"
    except Exception as e:  # user code, torch, ORT: record it, the search goes on
        first = (str(e).splitlines() or [""])[0][:300]
        status, reason = TrialStatus.FAILED, f"{type(e).__name__} in trial: {first}"
    finally:  # also on Ctrl-C: never leave the heap frozen
        _release_memory()  # the trial's models are unreachable now: _run has returned
    ours = [w for w in seen if issubclass(w.category, MeasurementWarning)]
    for w in seen:  # everyone else's warnings are shown as usual
        if w not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = list(dict.fromkeys(str(w.message) for w in ours))
    return TrialResult(plan, status, metrics, reason, clock.timings, fallbacks=fallbacks,
                       warnings=notes)


def _run(task: Any, plan: PruningPlan, settings: TrialSettings, clock: _Clock,
         metrics: dict[str, float], fallbacks: dict[str, str],
         on_intermediate: Callable | None) -> tuple[str, str]:
    """The trial's work; fills ``metrics`` and ``fallbacks`` and returns (status, reason)."""
    from autoprune.finetune import finetune_
    from autoprune.quantize import evaluate_shipped
    from autoprune.recover import reconstruct_plan_

    with clock("prune"):
        model, pruned, report = prune_for_task(task, plan, settings)
        fallbacks.update(report.fallbacks)
        metrics.update(_cost_metrics(pruned, task.example_inputs))
    with clock("quantize"):
        shipped = _shipped(task, pruned, plan)
    with clock("latency"):
        metrics.update(_measure(task, pruned, plan, settings, settings.targets,
                                settings.screen_latency, shipped))
    broken = _hopeless(settings, metrics)
    if broken:
        prunes = any(r.active for r in [plan.default, *plan.rules.values()])
        if settings.evaluate_infeasible or not prunes:
            with clock("evaluate"):  # not fine-tuned: the quantized model timed is the one
                metrics.update(evaluate_shipped(task, pruned, shipped))
        shown = ", ".join(f"{b} (measured {metrics.get(b.metric_key(settings.primary)):.4g})"
                          for b in broken)
        return TrialStatus.INFEASIBLE, f"breaks {shown}; not fine-tuned"

    model.to(settings.device), pruned.to(settings.device)
    with clock("reconstruct"):
        fitted = reconstruct_plan_(task, model, pruned, report, plan.recovery, settings.seed)
    if fitted is not None and fitted.fits:
        metrics["reconstruction_error_before"] = fmean(f.error_before for f in fitted.fits)
        metrics["reconstruction_error"] = fmean(f.error_after for f in fitted.fits)
    ft = settings.finetune or task.finetune
    ft = ft.with_overrides(plan.finetune).replace(seed=settings.seed)
    with clock("finetune"):
        outcome = finetune_(pruned, task, ft, teacher=settings.teacher_cache or model,
                            on_eval=on_intermediate, hidden_distill=plan.recovery.hidden_distill)
    metrics["finetune_steps"] = float(getattr(outcome, "steps_done", ft.steps))
    if getattr(outcome, "stopped_early", False):
        last = outcome.history[-1] if outcome.history else (0, float("nan"))
        metrics[task.metric.name] = float(last[1])
        return TrialStatus.PRUNED, (f"stopped early at step {last[0]} "
                                    f"({task.metric.name} {last[1]:.4g})")
    with clock("quantize"):  # the fine-tuned weights, quantized as they ship
        shipped = None if plan.quantize == "none" else _shipped(task, pruned.cpu(), plan)
    with clock("evaluate"):
        values = evaluate_shipped(task, pruned, shipped)
    value = values[task.metric.name]
    if not math.isfinite(value):
        return TrialStatus.FAILED, f"{task.metric.name} is {value} after fine-tuning"
    metrics.update(values)
    return TrialStatus.COMPLETE, ""
