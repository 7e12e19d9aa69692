"""The trainable on the workers: a Ray actor runs one trial after another through run_trial.

What a worker gets (``_Job``, shipped once through Ray's object store), and what a trial reports
to Tune (the ``TrialResult`` as JSON under ``RESULT_KEY``, with the node that ran it; the new
latency measurements under ``LATENCY_KEY``; the objectives Tune searches). Workers write no
files but their scratch files and lock, in their own temp directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoprune.errors import MeasurementWarning
from autoprune.fingerprint import architecture_signature
from autoprune.search._base import SearchContext
from autoprune.search._ray._isolation import NodeIsolation, _isolation_mode
from autoprune.search._ray._shipping import (
    Weights,
    load_worker_task,
    put_weights,
    ships_task,
    with_weights,
    worker_spec,
)
from autoprune.trial import TrialResult, run_trial

CONFIG_KEY = "autoprune"  # the trial config entry holding number, baseline and parameters
RESULT_KEY = "autoprune_result"  # the reported result entry holding the TrialResult (JSON)
LATENCY_KEY = "autoprune_latency"  # the latency cache entries the trial measured (JSON)


@dataclasses.dataclass
class _Job:
    """Everything a worker needs to run trials; shipped once through Ray's object store."""

    task_spec: str  # loaded by each worker process (see _shipping.worker_spec)
    shipped: bool  # the task file travels in the job's working_dir (a cluster)
    task: Any  # the Task object itself when it cannot be loaded from a spec, else None
    weights: Weights  # the driver's base model weights, in the object store
    space: Any  # BoundSpace: build(params) -> plan
    fingerprint: list[str]  # architecture signature stamped on every plan
    settings: Any  # TrialSettings without the latency cache (workers open their own)
    latency: dict[str, dict]  # the driver's latency cache entries when the job was made
    measure_lock: str | None  # lock file path; None = <node temp dir>/autoprune-measure.lock
    isolation: str  # "node": neighbours' compute pauses while a trial measures; "measurements"
    objectives: list[Any]  # Objective list: keys reported to Tune
    stopper: str | None  # name of the EarlyStopper actor (None: no early stopping)
    threads: int  # torch threads per trial (= CPUs per trial)
    finished: dict[int, dict[str, Any]]  # on resume: results of trials that already finished


def _job(ray: Any, ctx: SearchContext, stopper: str | None, finished: dict[int, dict]) -> _Job:
    opts = ctx.backend_options
    spec = worker_spec(ctx)
    base = ctx.task.build_model()  # once: its signature and, in the object store, its weights
    cache = ctx.settings.latency_cache
    return _Job(
        task_spec=spec, shipped=ships_task(ctx), task=None if _loadable(spec) else ctx.task,
        weights=put_weights(ray, base), space=ctx.space,
        fingerprint=architecture_signature(base),
        settings=dataclasses.replace(ctx.settings, latency_cache=None, teacher_cache=None),
        latency=cache.entries() if cache is not None else {},
        measure_lock=opts.get("measure_lock"), isolation=_isolation_mode(ctx),
        objectives=list(ctx.objectives), stopper=stopper,
        threads=max(1, int(float(opts.get("cpus_per_trial") or 1.0))), finished=finished)


_WORKER_STATE: dict[tuple, tuple[Any, Any, Any]] = {}  # per process: (task, settings, node)


def _worker_state(job: _Job) -> tuple[Any, Any, Any]:
    """The task and trial settings of this worker process (loaded once, reused by trials)."""
    key = (job.task_spec, job.weights.ref.hex(), job.measure_lock, job.isolation, job.threads)
    if key not in _WORKER_STATE:
        import ray
        import torch

        from autoprune.latency import LatencyCache
        from autoprune.recover import TeacherCache

        torch.set_num_threads(max(1, job.threads))
        task = job.task if job.task is not None else load_worker_task(job.task_spec,
                                                                      job.shipped)
        task = with_weights(task, ray.get(job.weights.ref), job.weights.training)
        lock = job.measure_lock or str(Path(tempfile.gettempdir()) / "autoprune-measure.lock")
        node = NodeIsolation(lock) if job.isolation == "node" else None
        if node is not None:
            task = node.wrap(task)
        cache = LatencyCache()  # in memory: new entries go back to the driver (LATENCY_KEY)
        cache.merge(job.latency)
        settings = dataclasses.replace(job.settings, measure_lock=lock, latency_cache=cache,
                                       teacher_cache=TeacherCache(
                                           task.build_model, device=job.settings.device))
        _WORKER_STATE.clear()  # one search at a time per worker process
        _WORKER_STATE[key] = (task, settings, node)
    return _WORKER_STATE[key]


def _loadable(spec: str) -> bool:
    from autoprune.tasks import list_tasks

    return spec in list_tasks() or ":" in spec or spec.endswith(".py")


def _payload(result: TrialResult, curve: list, objectives: list,
             latency: dict[str, dict] | None = None) -> dict[str, Any]:
    """What a trial reports to Tune: the TrialResult (JSON), its curve, the latency cache
    entries it measured, and the objectives (Tune checks that every searched metric is
    reported; NaN when not measured)."""
    values = {o.key: float(result.metrics.get(o.key, math.nan)) for o in objectives}
    return {RESULT_KEY: json.dumps(result.to_dict()), "curve": [list(c) for c in curve],
            LATENCY_KEY: json.dumps(latency or {}), **values}


def _early_stopping(ray: Any, stopper_name: str | None, curve: list[tuple[int, float]]
                    ) -> tuple[Callable[[int, float], bool], str | None]:
    """The trial's ``on_intermediate`` (records the curve, asks the stopper actor) and, if the
    actor is gone before the trial starts, the warning the trial records. A stopper that stops
    answering mid-trial never fails the trial: it runs on, with a MeasurementWarning."""
    stopper, lost = None, None
    if stopper_name:
        try:
            stopper = ray.get_actor(stopper_name)
        except ValueError:
            lost = "early stopping lost: the stopper actor is gone; the trial ran to the end"

    def on_intermediate(step: int, value: float) -> bool:
        curve.append((step, value))
        if stopper is None:
            return False
        try:
            return bool(ray.get(stopper.should_stop.remote(step, value), timeout=30))
        except Exception as e:
            warnings.warn(MeasurementWarning(
                f"early stopping lost: the stopper actor did not answer ({type(e).__name__}); "
                f"the trial went on without it"), stacklevel=2)
            return False

    return on_intermediate, lost


def _trainable(config: dict[str, Any], job: _Job) -> None:
    """One trial on a Ray worker: the plan for the sampled parameters, through run_trial."""
    import ray
    from ray import tune

    meta = config[CONFIG_KEY]
    number, params = meta["number"], meta["params"]
    done = job.finished.get(number)
    if done is not None and done["params"] == params:  # finished before the driver died
        tune.report(done["payload"])
        return
    if "reused" in meta:  # the driver found the plan's result among finished trials
        tune.report(meta["reused"])
        return
    task, settings, node = _worker_state(job)
    plan = job.space.build(meta.get("steered", params)).with_fingerprint(job.fingerprint)
    curve: list[tuple[int, float]] = []
    on_intermediate, lost = _early_stopping(ray, job.stopper, curve)
    with node.trial() if node is not None else contextlib.nullcontext():
        result = run_trial(task, plan, settings, on_intermediate=on_intermediate)
    if lost:
        result.warnings.append(lost)
    result.number, result.params, result.baseline = number, params, meta.get("baseline")
    result.node = ray.get_runtime_context().get_node_id()
    result.metrics.update(meta.get("predicted", {}))
    tune.report(_payload(result, curve, job.objectives, settings.latency_cache.take_new()))


def _measure_on_worker(job: _Job, plans: list[dict], screen: bool
                       ) -> tuple[list[dict[str, float]], dict[str, dict]]:
    """``measure_plan`` on a worker: the cost metrics of each plan, in order, and the latency
    cache entries measured."""
    from autoprune.plan import PruningPlan
    from autoprune.trial import measure_plan

    task, settings, _ = _worker_state(job)
    metrics = [measure_plan(task, PruningPlan.from_dict(d), settings, settings.targets,
                            screen=screen) for d in plans]
    return metrics, settings.latency_cache.take_new()


def _confirm_on_worker(job: _Job, results: list[dict], config: Any
                       ) -> tuple[dict[int, dict], dict[str, dict]]:
    """``confirm_fronts`` on a worker: the trials' metrics by number, fronts re-measured, and
    the latency cache entries measured."""
    from autoprune.search._confirm import confirm_fronts

    task, settings, _ = _worker_state(job)
    trials = [TrialResult.from_dict(d) for d in results]
    confirm_fronts(task, trials, config, settings, say=lambda _: None)
    return {r.number: r.metrics for r in trials}, settings.latency_cache.take_new()


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _parse(payload: dict[str, Any]) -> TrialResult:
    return TrialResult.from_dict(json.loads(payload[RESULT_KEY]))
