"""Distributed backend: Ray Tune runs the trials, Optuna samples them (``OptunaSearch``).

The pieces, and where they run:

* driver (this process): ``_Searcher`` (an ``OptunaSearch`` over the space's define-by-run
  ``sample``, told results with the same constraints and states as the Optuna backend),
  ``_Session`` (collects results, prints progress, keeps the journal) and a small
  ``EarlyStopper`` actor (the same median rule as the Optuna backend, shared by all workers);
* workers (one Ray actor per concurrent trial): ``_trainable`` loads the task once per process
  and calls :func:`~autoprune.trial.run_trial` -- the same trial function as every backend.

Latency isolation: every worker measures under ``TrialSettings.measure_lock``, an fcntl lock
file in the node's temp directory, so two trials on one node never time a model at once. With
``isolation="node"`` (the default) workers also hold that lock *shared* while they fine-tune
and evaluate, so a measurement has the node to itself (``NodeIsolation``); a neighbour's
fine-tuning slowed measurements by several percent otherwise (``benchmarks/ray_overhead.py``).

Fault tolerance: ``FailureConfig(max_failures)`` retries a trial whose worker died; a trial that
keeps failing is recorded as ``failed`` and the search goes on. Ray's experiment lives in
``RUN/ray/tune`` and ``--resume`` continues it with ``Tuner.restore``. Ray snapshots its state
every few seconds, so the driver also appends every suggestion and every finished trial to
``RUN/ray/journal.jsonl`` (fsync'd): on resume, suggestions made after the last snapshot are
replayed with the same trial numbers, and trials that had finished are not run again.

Ray is imported lazily: ``import autoprune`` and the Optuna backend work without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoprune.errors import UsageError
from autoprune.fingerprint import architecture_signature
from autoprune.search._base import Backend, EarlyStopper, SearchContext, register_backend
from autoprune.search._optuna import tell_result
from autoprune.trial import TrialResult, run_trial

__all__ = ["RayBackend", "NodeIsolation", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'autoprune[ray]'"
CONFIG_KEY = "autoprune"  # the trial config entry holding number, baseline and parameters
RESULT_KEY = "autoprune_result"  # the reported result entry holding the TrialResult (JSON)
EXPERIMENT = "tune"  # Ray's experiment directory: RUN/ray/tune
DEFAULT_MAX_FAILURES = 2  # retries of a trial whose worker died
ISOLATION = ("node", "measurements")  # latency isolation modes (backend option "isolation")

logger = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
        from ray import tune  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--backend ray needs Ray Tune, which is not installed ({e}); "
                         f"install it with: {INSTALL_HINT}  (or use --backend optuna)") from None
    return ray


def _check_ray() -> None:
    """The install hint if Ray is missing, found without importing it (a local Ray is set up
    through environment variables that Ray reads when it is first imported)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["ray"] is None
        found = False
    if not found:
        raise UsageError(f"--backend ray needs Ray Tune, which is not installed; install it "
                         f"with: {INSTALL_HINT}  (or use --backend optuna)")


# -- what workers get ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """Everything a worker needs to run trials; shipped once through Ray's object store."""

    task_spec: str  # loaded by each worker process (absolute path for file specs)
    task: Any  # the Task object itself when it cannot be loaded from a spec, else None
    space: Any  # BoundSpace: build(params) -> plan
    fingerprint: list[str]  # architecture signature stamped on every plan
    settings: Any  # TrialSettings without the latency cache (workers open their own)
    cache_path: str  # latency cache file shared by the workers of one machine
    measure_lock: str | None  # lock file path; None = <node temp dir>/autoprune-measure.lock
    isolation: str  # "node": neighbours' compute pauses while a trial measures; "measurements"
    objectives: list[Any]  # Objective list: keys reported to Tune
    stopper: str | None  # name of the EarlyStopper actor (None: no early stopping)
    threads: int  # torch threads per trial (= CPUs per trial)
    finished: dict[int, dict[str, Any]]  # on resume: results of trials that already finished


def _job(ctx: SearchContext, stopper: str | None, finished: dict[int, dict]) -> _Job:
    opts = ctx.backend_options
    spec = _portable_spec(ctx.task_spec)
    return _Job(
        task_spec=spec, task=None if _loadable(spec) else ctx.task, space=ctx.space,
        fingerprint=architecture_signature(ctx.task.build_model()),
        settings=dataclasses.replace(ctx.settings, latency_cache=None),
        cache_path=str((ctx.run_dir / "latency_cache.json").resolve()),
        measure_lock=opts.get("measure_lock"), isolation=_isolation(ctx),
        objectives=list(ctx.objectives), stopper=stopper,
        threads=max(1, int(float(opts.get("cpus_per_trial") or 1.0))), finished=finished)


_WORKER_STATE: dict[tuple, tuple[Any, Any, Any]] = {}  # per process: (task, settings, node)


def _worker_state(job: _Job) -> tuple[Any, Any, Any]:
    """The task and trial settings of this worker process (loaded once, reused by trials)."""
    key = (job.task_spec, job.cache_path, job.measure_lock, job.isolation, job.threads)
    if key not in _WORKER_STATE:
        import torch

        from autoprune.latency import LatencyCache
        from autoprune.task import load_task

        torch.set_num_threads(max(1, job.threads))
        task = job.task if job.task is not None else load_task(job.task_spec)
        lock = job.measure_lock or str(Path(tempfile.gettempdir()) / "autoprune-measure.lock")
        node = NodeIsolation(lock) if job.isolation == "node" else None
        if node is not None:
            task = node.wrap(task)
        settings = dataclasses.replace(job.settings, measure_lock=lock,
                                       latency_cache=LatencyCache(job.cache_path))
        _WORKER_STATE.clear()  # one search at a time per worker process
        _WORKER_STATE[key] = (task, settings, node)
    return _WORKER_STATE[key]


class NodeIsolation:
    """Gives a trial's latency measurement the node to itself (``isolation="node"``).

    ``run_trial`` times models holding the node's lock file exclusively
    (``TrialSettings.measure_lock``). This object makes the other trials on the node step
    aside for it, through the task's own hooks:

    * while a trial prunes and measures, it marks itself *pending* (a shared lock on
      ``LOCK.pending``) until its fine-tuning or evaluation starts;
    * fine-tuning and evaluation hold the measurement lock *shared*, so a measurement waits
      until they leave it, and they cannot start while a measurement runs;
    * at every fine-tuning step (the task's ``loss_fn``), a trial that sees a pending
      neighbour lets go of the lock and waits until no trial is pending, so a measurement waits
      for at most one step of each neighbour, and never starves.

    Pruning itself is not covered (it is short); a task's own ``finetune_fn`` is covered as a
    whole, without the per-step hand-over unless it calls ``task.loss_fn``.

    Example:
        >>> node = NodeIsolation("/tmp/autoprune-measure.lock")  # doctest: +SKIP
        >>> task = node.wrap(task)  # doctest: +SKIP
        >>> with node.trial():  # doctest: +SKIP
        ...     result = run_trial(task, plan, settings)  # measure_lock: the same path
    """

    def __init__(self, lock: str):
        self.lock = lock  # the node's measurement lock file (TrialSettings.measure_lock)
        self._pending_path = lock + ".pending"
        self._depth = 0  # nesting of compute() (evaluation inside fine-tuning)
        self._shared: Any = None  # open lock file while compute() holds it shared
        self._pending: Any = None  # open pending file while this trial is pending
        self._probe: Any = None  # the pending file, opened once, to see if others are pending

    @staticmethod
    def _open(path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a")

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """Around one ``run_trial``: pending from here until its fine-tuning/evaluation."""
        self._pending = self._open(self._pending_path)
        fcntl.flock(self._pending, fcntl.LOCK_SH)
        try:
            yield
        finally:
            self._measured()

    def _measured(self) -> None:
        if self._pending is not None:
            fcntl.flock(self._pending, fcntl.LOCK_UN)
            self._pending.close()
            self._pending = None

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Hold the measurement lock shared (re-entrant); ends this trial's pending phase."""
        self._measured()
        if self._depth == 0:
            self._shared = self._open(self.lock)
            fcntl.flock(self._shared, fcntl.LOCK_SH)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._shared, fcntl.LOCK_UN)
                self._shared.close()
                self._shared = None

    def step(self) -> None:
        """During fine-tuning: step aside while a neighbour waits to prune and measure."""
        if self._depth == 0:
            return
        if self._probe is None:
            self._probe = self._open(self._pending_path)
        try:
            fcntl.flock(self._probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a neighbour is pending: let its measurement in, wait
            fcntl.flock(self._shared, fcntl.LOCK_UN)
            fcntl.flock(self._probe, fcntl.LOCK_EX)
            fcntl.flock(self._probe, fcntl.LOCK_UN)
            fcntl.flock(self._shared, fcntl.LOCK_SH)
        else:
            fcntl.flock(self._probe, fcntl.LOCK_UN)

    def wrap(self, task: Any) -> Any:
        """A copy of ``task`` whose fine-tuning, evaluation and loss go through this object."""
        from autoprune.finetune import finetune_

        user_finetune, user_evaluate, user_loss = task.finetune_fn, task.evaluate_fn, task.loss_fn

        def finetune_fn(model, task_, settings, *, teacher=None, on_eval=None):
            with self.compute():
                if user_finetune is not None:
                    return user_finetune(model, task_, settings, teacher=teacher,
                                         on_eval=on_eval)
                plain = dataclasses.replace(task_, finetune_fn=None)
                return finetune_(model, plain, settings, teacher=teacher, on_eval=on_eval)

        def evaluate_fn(model):
            with self.compute():
                if user_evaluate is not None:
                    return user_evaluate(model)
                return task.metric.fn(model, task.val_data)

        def loss_fn(outputs, targets):
            self.step()
            return user_loss(outputs, targets)

        return dataclasses.replace(task, finetune_fn=finetune_fn, evaluate_fn=evaluate_fn,
                                   loss_fn=loss_fn)


def _payload(result: TrialResult, curve: list, objectives: list) -> dict[str, Any]:
    """What a trial reports to Tune: the TrialResult (JSON), its curve, and the objectives
    (Tune checks that every searched metric is reported; NaN when not measured)."""
    values = {o.key: float(result.metrics.get(o.key, math.nan)) for o in objectives}
    return {RESULT_KEY: json.dumps(result.to_dict()), "curve": [list(c) for c in curve],
            **values}


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
    task, settings, node = _worker_state(job)
    plan = job.space.build(params).with_fingerprint(job.fingerprint)
    stopper = None
    if job.stopper:
        with contextlib.suppress(ValueError):  # the actor is gone: run without early stopping
            stopper = ray.get_actor(job.stopper)
    curve: list[tuple[int, float]] = []

    def on_intermediate(step: int, value: float) -> bool:
        curve.append((step, value))
        if stopper is None:
            return False
        try:
            return bool(ray.get(stopper.should_stop.remote(step, value), timeout=30))
        except Exception:  # a lost stopper never fails a trial
            return False

    with node.trial() if node is not None else contextlib.nullcontext():
        result = run_trial(task, plan, settings, on_intermediate=on_intermediate)
    result.number, result.params, result.baseline = number, params, meta.get("baseline")
    tune.report(_payload(result, curve, job.objectives))


def _confirm_on_worker(job: _Job, results: list[dict], config: Any) -> dict[int, dict]:
    """``confirm_fronts`` on a worker: the trials' metrics by number, fronts re-measured."""
    from autoprune.search._confirm import confirm_fronts

    task, settings, _ = _worker_state(job)
    trials = [TrialResult.from_dict(d) for d in results]
    confirm_fronts(task, trials, config, settings, say=lambda _: None)
    return {r.number: r.metrics for r in trials}


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# -- driver -------------------------------------------------------------------------------------


class _Journal:
    """Append-only JSON lines, flushed and fsync'd: what the driver must not forget."""

    def __init__(self, path: Path):
        self.path = path  # RUN/ray/journal.jsonl

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a kill
                records.append(json.loads(line))
        return records


class _Session:
    """The live search in the driver. Tune pickles its searcher and callbacks (tuner.pkl, state
    snapshots), so those keep no live objects and reach the running search through ``_ACTIVE``.
    """

    def __init__(self, ctx: SearchContext, journal: _Journal, stopper: Any):
        self.ctx = ctx
        self.journal = journal
        self.stopper = stopper  # EarlyStopper actor handle, or None
        self.results: dict[int, TrialResult] = {}  # finished trials by number
        self.order: list[TrialResult] = []  # the same, in the order they finished
        self.suggested: dict[int, dict[str, Any]] = {}  # number -> {params, baseline}
        self.finished: dict[int, dict[str, Any]] = {}  # number -> {params, payload, curve}
        self.trials = ctx.trials  # trials Ray runs (a restored experiment keeps its own)
        records = journal.read()
        for rec in records:
            if rec.get("event") == "start":
                self.trials = rec["trials"]
            elif rec.get("event") == "suggest":
                self.suggested[rec["number"]] = {"params": rec["params"],
                                                 "baseline": rec.get("baseline")}
            elif rec.get("event") == "finish":
                self.finished[rec["number"]] = rec
        if not records:
            journal.append({"event": "start", "trials": ctx.trials})
        elif self.trials != ctx.trials:
            print(f"note: a Ray search resumes with the trial count it started with "
                  f"({self.trials}), not {ctx.trials}", file=sys.stderr)
        for _, rec in sorted(self.finished.items()):
            self._add(_parse(rec["payload"]), rec.get("curve", []), show=False)

    def on_suggest(self, number: int, params: dict[str, Any], baseline: str | None) -> None:
        if number not in self.suggested:
            self.suggested[number] = {"params": params, "baseline": baseline}
            self.journal.append({"event": "suggest", "number": number, "params": params,
                                 "baseline": baseline})

    def on_complete(self, trial) -> None:
        payload = trial.last_result or {}
        meta = trial.config[CONFIG_KEY]
        if RESULT_KEY not in payload:
            self.on_error(trial, "the trial ended without reporting a result")
            return
        self._finish(meta, payload, payload.get("curve", []))

    def on_error(self, trial, reason: str | None = None) -> None:
        meta = trial.config[CONFIG_KEY]
        if reason is None:
            reason = (f"Ray worker failed {trial.num_failures} time(s), retries exhausted: "
                      f"{_error_line(trial)}")
        result = TrialResult(self._plan(meta["params"]), "failed", reason=reason,
                             number=meta["number"], params=meta["params"],
                             baseline=meta.get("baseline"))
        self._finish(meta, _payload(result, [], self.ctx.objectives), [])

    def on_retry(self, trial) -> None:
        if self.ctx.progress:
            meta = trial.config[CONFIG_KEY]
            print(f"trial {meta['number']}: Ray worker lost ({_error_line(trial)}); retrying",
                  file=sys.stderr, flush=True)

    def _finish(self, meta: dict[str, Any], payload: dict[str, Any], curve: list) -> None:
        number = meta["number"]
        if number in self.results:  # a journaled trial replayed after a resume
            return
        rec = {"event": "finish", "number": number, "params": meta["params"],
               "payload": payload, "curve": curve}
        self.journal.append(rec)
        self.finished[number] = rec
        self._add(_parse(payload), curve, show=True)

    def _add(self, result: TrialResult, curve: list, show: bool) -> None:
        self.results[result.number] = result
        self.order.append(result)
        if result.status == "complete" and curve and self.stopper is not None:
            self.stopper.record.remote([tuple(c) for c in curve])
        if show and self.ctx.progress:
            self.ctx.progress(result, list(self.order))

    def _plan(self, params: dict[str, Any]):
        try:
            return self.ctx.plan_for(params)
        except Exception:  # the parameters do not build: record the failure on a dense plan
            from autoprune.plan import PruningPlan

            return PruningPlan.uniform(0.0)


_ACTIVE: _Session | None = None  # the search running in this process (one at a time)


def _parse(payload: dict[str, Any]) -> TrialResult:
    return TrialResult.from_dict(json.loads(payload[RESULT_KEY]))


def _error_line(trial) -> str:
    with contextlib.suppress(Exception):
        path = trial.error_file
        if path and Path(path).is_file():
            lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
            if lines:  # Ray's last line, without its list of common causes
                return lines[-1].split(" Some common causes")[0][:300]
    return "unknown error"


class _Sample:
    """The define-by-run space for ``OptunaSearch``: the space's own ``sample`` function, plus
    the Optuna trial number and baseline name so results keep the Optuna backend's numbering."""

    def __init__(self, space: Any):
        self.space = space  # BoundSpace

    def __call__(self, trial) -> dict[str, Any]:
        params = self.space.sample(trial)
        baseline = trial.user_attrs.get("baseline")
        if _ACTIVE is not None:
            _ACTIVE.on_suggest(trial.number, params, baseline)
        return {CONFIG_KEY: {"number": trial.number, "baseline": baseline, "params": params}}


def _make_searcher(ctx: SearchContext):
    from autoprune.search._optuna import make_sampler

    return _ray_classes()["_Searcher"](
        ctx.baselines(), [b.text for b in ctx.settings.budgets], ctx.settings.primary,
        list(ctx.objectives), space=_Sample(ctx.space),
        metric=[o.key for o in ctx.objectives],
        mode=["max" if o.direction == "maximize" else "min" for o in ctx.objectives],
        sampler=make_sampler(ctx.config.sampler, ctx.config.seed))


@functools.cache
def _ray_classes() -> dict[str, type]:
    """The classes that subclass Ray's, defined on first use (Ray is imported lazily).

    Tune pickles the searcher and the callback (tuner.pkl); they are reachable as
    ``autoprune.search._ray._Searcher`` / ``._DriverCallback`` (module ``__getattr__``), so
    pickle stores a reference and the restored objects see this module's live ``_ACTIVE``.
    """
    from ray.tune import Callback
    from ray.tune.search.optuna import OptunaSearch

    class _DriverCallback(Callback):
        """Forwards trial events to the live search (stateless: Tune pickles it)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.on_complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.on_error(trial)

        def on_trial_recover(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.on_retry(trial)

    class _Searcher(OptunaSearch):
        """``OptunaSearch`` told results the way the Optuna backend tells them: constraints
        from the budgets, and complete / pruned / failed states from the trial's status.
        Baselines are enqueued with their names; on restore, suggestions made after Ray's last
        snapshot are replayed from the journal so trial numbers keep their parameters."""

        def __init__(self, baselines: dict[str, dict], budgets: list[str], primary: str,
                     objectives: list, **kwargs: Any):
            self._baselines = baselines  # plain data only: Tune pickles the searcher
            self._budget_texts = budgets
            self._primary = primary
            self._objectives = objectives
            super().__init__(**kwargs)

        def _setup_study(self, mode):
            super()._setup_study(mode)
            if not self._replay():
                for name, params in self._baselines.items():
                    self._ot_study.enqueue_trial(params, user_attrs={"baseline": name},
                                                 skip_if_exists=True)

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            self._replay()

        def _replay(self) -> bool:
            if _ACTIVE is None or not _ACTIVE.suggested:
                return False
            known = len(self._ot_study.get_trials(deepcopy=False))
            for number in sorted(n for n in _ACTIVE.suggested if n >= known):
                s = _ACTIVE.suggested[number]
                attrs = {"baseline": s["baseline"]} if s["baseline"] else {}
                self._ot_study.enqueue_trial(s["params"], user_attrs=attrs)
            return True

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # multi-objective: Optuna takes no intermediate values

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            from optuna.trial import TrialState

            from autoprune.budget import parse_budgets

            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._completed_trials.add(trial_id)
            trial = self._ot_trials[trial_id]
            if error or not result or RESULT_KEY not in result:
                self._ot_study.tell(trial, state=TrialState.FAIL)
                return
            tell_result(self._ot_study, trial, _parse(result),
                        parse_budgets(self._budget_texts), self._primary, self._objectives,
                        keep_result=False)

    classes = {"_DriverCallback": _DriverCallback, "_Searcher": _Searcher}
    for name, cls in classes.items():
        cls.__qualname__ = name
    return classes


def __getattr__(name: str) -> Any:
    if name in ("_DriverCallback", "_Searcher"):
        return _ray_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- Ray start-up -------------------------------------------------------------------------------


@contextlib.contextmanager
def _connected(ctx: SearchContext) -> Iterator[Any]:
    """Connect to ``address``, or start a local Ray bound to loopback and shut it down after.

    A Ray already initialized in this process is used as it is (and left running).
    """
    opts = ctx.backend_options
    address = opts.get("address")
    workers = max(1, int(ctx.workers or 1))
    cpus = float(opts.get("cpus_per_trial") or 1.0)
    gpus = float(opts.get("gpus_per_trial") or 0.0)
    if cpus <= 0 or gpus < 0:
        raise UsageError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got "
                         f"{cpus:g} and {gpus:g}")
    # A local Ray: node IP = loopback, so every Ray server binds 127.0.0.1 (Ray reads this
    # variable on import; the constant is patched below in case Ray was imported earlier);
    # no usage reporting. Restored when the search ends.
    local_env = {} if address else {k: v for k, v in (
        ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"))
        if k not in os.environ}
    with _env(**local_env):
        ray = _import_ray()
        from ray._private import ray_constants

        cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
        started = False
        try:
            if not ray.is_initialized():
                common = dict(include_dashboard=False, log_to_driver=False,
                              logging_level=logging.ERROR, namespace="autoprune",
                              runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}})
                if address:
                    try:
                        ray.init(address=address, **common)
                    except (ConnectionError, RuntimeError, ValueError) as e:
                        first = (str(e).splitlines() or [""])[0][:200]
                        raise UsageError(
                            f"cannot connect to the Ray cluster at {address!r} ({first}); "
                            f"check the address ('ray status' on the head node; 'auto' finds "
                            f"a cluster started on this machine) and, if the cluster uses "
                            f"token authentication, set RAY_AUTH_MODE=token") from None
                else:
                    ray_constants.ENABLE_RAY_CLUSTER = False
                    ray.init(num_cpus=math.ceil(workers * cpus), **common)  # GPUs: detected
                started = True
            total = ray.cluster_resources()
            if total.get("CPU", 0) < cpus or total.get("GPU", 0) < gpus:
                raise UsageError(
                    f"each trial asks for {cpus:g} CPU(s) and {gpus:g} GPU(s), but the Ray "
                    f"cluster has {total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} "
                    f"GPU(s); lower --cpus-per-trial / --gpus-per-trial or add nodes")
            yield ray
        finally:
            if started:
                ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


# -- the backend --------------------------------------------------------------------------------


def _isolation(ctx: SearchContext) -> str:
    mode = ctx.backend_options.get("isolation") or ISOLATION[0]
    if mode not in ISOLATION:
        raise UsageError(f"isolation must be one of {', '.join(ISOLATION)}, got {mode!r}")
    return mode


def _portable_spec(spec: str) -> str:
    """A task spec that workers can load: file paths made absolute."""
    head, sep, tail = spec.rpartition(":")
    path = head if sep else spec
    if path.endswith(".py") and Path(path).is_file():
        return str(Path(path).resolve()) + (sep + tail if sep else "")
    return spec


def _loadable(spec: str) -> bool:
    from autoprune.tasks import list_tasks

    return spec in list_tasks() or ":" in spec or spec.endswith(".py")


@register_backend("ray")
class RayBackend(Backend):
    """Ray Tune with ``OptunaSearch``: ``--workers`` concurrent trials on a local Ray or a
    cluster (``--address``), each with ``--cpus-per-trial`` / ``--gpus-per-trial``.

    ``backend_options``: ``address``, ``cpus_per_trial``, ``gpus_per_trial`` (from the CLI);
    ``max_failures`` (retries of a trial whose worker died, default 2); ``isolation``
    (``"node"``, default, or ``"measurements"``); ``measure_lock`` (lock file path; default:
    ``autoprune-measure.lock`` in each node's temp directory).

    Example:
        >>> autoprune.search("digits", trials=40, backend="ray", workers=2,
        ...                  output="runs/ray")  # doctest: +SKIP
    """

    name = "ray"

    def check(self) -> None:
        _check_ray()

    def run(self, ctx: SearchContext) -> list[TrialResult]:
        global _ACTIVE

        _check_ray()  # the install hint before anything starts
        _isolation(ctx)
        if _ACTIVE is not None:
            raise UsageError("a Ray search is already running in this process")
        ray_dir = (ctx.run_dir / "ray").resolve()
        if not ctx.resume and ray_dir.exists() and any(ray_dir.iterdir()):
            raise UsageError(f"{ray_dir} already holds a Ray experiment: pass --resume")
        journal = _Journal(ray_dir / "journal.jsonl")
        with _connected(ctx) as ray:
            steps = (ctx.settings.finetune or ctx.task.finetune).steps
            stopper = f"autoprune-stopper-{uuid.uuid4().hex[:12]}"
            actor = ray.remote(num_cpus=0)(EarlyStopper).options(name=stopper).remote(
                ctx.task.metric.direction, min_step=max(1, steps // 3))
            _ACTIVE = session = _Session(ctx, journal, actor)
            try:
                grid = self._fit(ctx, ray_dir, stopper)
                self._collect(grid)
            finally:
                _ACTIVE = None
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        unfinished = [r for r in grid if (r.config or {}).get(CONFIG_KEY, {}).get("number")
                      not in session.results]
        if unfinished or len(session.results) < session.trials:
            # Tune stops on Ctrl-C (SIGINT) and returns; its state is saved for --resume.
            raise KeyboardInterrupt
        return [session.results[n] for n in sorted(session.results)]

    def confirm(self, ctx: SearchContext, results: list[TrialResult]) -> None:
        """On a cluster (``--address``), the fronts are re-measured by a Ray task that asks
        for the same resources as a trial, so it runs on a node that can run trials (Ray
        picks which one), not necessarily on the driver's machine."""
        from autoprune.search._confirm import screened

        if not ctx.backend_options.get("address"):
            super().confirm(ctx, results)  # a local Ray measured on this machine
            return
        if not screened(results, ctx.config):
            return
        cpus = float(ctx.backend_options.get("cpus_per_trial") or 1.0)
        try:
            with _connected(ctx) as ray:
                remote = ray.remote(num_cpus=cpus)(_confirm_on_worker)
                metrics = ray.get(remote.remote(_job(ctx, None, {}),
                                                [r.to_dict() for r in results], ctx.config))
        except Exception as e:  # every trial is done: keep their screening latencies, marked
            print(f"re-measuring the front on the cluster failed ({type(e).__name__}: "
                  f"{str(e)[:200]}); its plans keep their screening latencies", flush=True)
            return
        for r in results:
            r.metrics = metrics[r.number]

    def _fit(self, ctx: SearchContext, ray_dir: Path, stopper: str) -> Any:
        import optuna
        from ray import tune

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opts = ctx.backend_options
        cpus = float(opts.get("cpus_per_trial") or 1.0)
        gpus = float(opts.get("gpus_per_trial") or 0.0)
        job = _job(ctx, stopper, finished={n: {"params": r["params"], "payload": r["payload"]}
                                           for n, r in _ACTIVE.finished.items()})
        trainable = tune.with_resources(tune.with_parameters(_trainable, job=job),
                                        {"cpu": cpus, "gpu": gpus})
        exp_dir = ray_dir / EXPERIMENT
        if ctx.resume and _restorable(exp_dir):
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable,
                                       resume_unfinished=True, resume_errored=False)
        else:
            if exp_dir.exists():  # a driver killed before Ray's first snapshot: start over
                import shutil

                shutil.rmtree(exp_dir)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=_make_searcher(ctx), num_samples=_ACTIVE.trials,
                    max_concurrent_trials=max(1, int(ctx.workers or 1)), reuse_actors=True,
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=str(ray_dir), verbose=0,
                    callbacks=[_ray_classes()["_DriverCallback"]()],
                    failure_config=tune.FailureConfig(
                        max_failures=int(opts.get("max_failures", DEFAULT_MAX_FAILURES)))))
        # The classic reporter honours verbose=0; trial errors are reported by the callback.
        with _env(RAY_AIR_NEW_OUTPUT="0"), _log_level("ray.tune", logging.CRITICAL):
            return tuner.fit()

    @staticmethod
    def _collect(grid) -> None:
        """Trials Ray knows as finished that the callbacks did not see (belt and braces)."""
        for res in grid:
            meta = (res.config or {}).get(CONFIG_KEY)
            if not meta or meta["number"] in _ACTIVE.results:
                continue
            if RESULT_KEY in (res.metrics or {}):
                _ACTIVE._finish(meta, res.metrics, res.metrics.get("curve", []))


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _log_level(name: str, level: int) -> Iterator[None]:
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(saved)


def _restorable(exp_dir: Path) -> bool:
    return (exp_dir / "tuner.pkl").is_file() and any(exp_dir.glob("experiment_state-*.json"))
