"""Embedded backend: an Optuna multi-objective study in a SQLite file of the run directory."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

from autoprune.metrics import Direction, TrialStatus
from autoprune.run.layout import STUDY_DB
from autoprune.search._base import Backend, EarlyStopper, SearchContext, register_backend
from autoprune.trial import TrialResult, run_trial

__all__ = ["OptunaBackend", "make_sampler", "tell_result"]

STUDY_NAME = "autoprune"


def make_sampler(name: str, seed: int):
    """TPE (default), NSGA-II or random. Budgets reach them as ``Trial.set_constraint``.

    TPE is the default: in ``benchmarks/search_quality.py`` (40 trials, steered) it matched or
    beat NSGA-II's final metric and hypervolume; a population of 20 leaves NSGA-II two
    generations in 40 trials."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    from autoprune.errors import UsageError

    raise UsageError(f"unknown sampler {name!r}; choose tpe, nsga2 or random")


def _storage(path):
    """The study's SQLite file, in WAL mode with NORMAL sync: a trial's ~25 writes (params,
    attributes, state) cost 25 ms instead of 50 ms, and a crashed process loses nothing (only
    a power cut can lose the last writes). optuna-dashboard reads it as any SQLite study."""
    from optuna.storages import RDBStorage
    from sqlalchemy import event

    storage = RDBStorage(f"sqlite:///{path}")

    @event.listens_for(storage.engine, "connect")
    def _pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    storage.engine.dispose()  # reconnect with the pragmas
    return storage


def _describe(study, ctx: SearchContext) -> None:
    """Name the objectives and store what the search is as study attributes, so that
    optuna-dashboard tells the same story as the report: task, space, budgets, targets."""
    import optuna

    config = ctx.config
    with warnings.catch_warnings():  # experimental since Optuna 3.2, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.key for o in ctx.objectives])
    attrs = {
        "task": config.task,
        "task_description": ctx.task.description,
        "space": config.space.get("name"),
        "budgets": config.budgets,
        "targets": config.target_names,
        "trials": ctx.trials,
        "sampler": config.sampler,
        "seed": config.seed,
        "finetune_steps": (ctx.settings.finetune or ctx.task.finetune).steps,
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def _previous_trials(storage) -> list:
    """The trials of the study already in ``storage`` (none if there is no study yet)."""
    import optuna

    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials(
            deepcopy=False)
    except KeyError:
        return []


def _result_of(trial) -> TrialResult | None:
    data = trial.user_attrs.get("result")
    return TrialResult.from_dict(json.loads(data)) if data else None


@register_backend("optuna")
class OptunaBackend(Backend):
    """Runs trials one after another in this process; the study survives crashes."""

    name = "optuna"

    def run(self, ctx: SearchContext) -> list[TrialResult]:
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = _storage(ctx.run_dir / STUDY_DB)
        # A resumed study goes on with a fresh seed: restarting the sampler from the original
        # seed would propose the plans it already tried.
        done = len(_previous_trials(storage)) if ctx.resume else 0
        sampler = make_sampler(ctx.config.sampler, ctx.config.seed + done)
        study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, sampler=sampler, load_if_exists=ctx.resume,
            directions=[o.direction for o in ctx.objectives])
        _describe(study, ctx)
        # A crash leaves the trial that was running in RUNNING: it did not finish, rerun it.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
        results = [r for t in study.get_trials(deepcopy=False) if (r := _result_of(t))]
        for r in results:
            ctx.record(r)
        if not ctx.resume:
            for name, params in ctx.baselines().items():
                study.enqueue_trial(params, user_attrs={"baseline": name})
        stopper = EarlyStopper(ctx.task.metric.direction,
                               min_step=max(1, (ctx.settings.finetune or ctx.task.finetune).steps
                                            // 3))
        for t in study.get_trials(deepcopy=False):
            stopper.record([tuple(x) for x in t.user_attrs.get("curve", [])])

        while len(results) < ctx.trials:
            trial = study.ask()
            result = self._run_one(ctx, trial, stopper)
            results.append(result)
            self._tell(study, trial, result, ctx)
            if ctx.steer_again(result, results):
                study.enqueue_trial(result.params, user_attrs={"baseline": result.baseline})
            if ctx.progress:
                ctx.progress(result, results)
        return results

    def _run_one(self, ctx: SearchContext, trial, stopper: EarlyStopper) -> TrialResult:
        params = ctx.space.sample(trial)
        baseline = trial.user_attrs.get("baseline")
        plan, predicted = ctx.prepare(params, baseline)
        result = ctx.reuse(plan)
        if result is None:
            result = self._try(ctx, trial, plan, stopper)
        result.metrics.update(predicted)
        result.number, result.params, result.baseline = trial.number, params, baseline
        ctx.record(result)
        return result

    def _try(self, ctx: SearchContext, trial, plan, stopper: EarlyStopper) -> TrialResult:
        curve: list[tuple[int, float]] = []

        def on_intermediate(step: int, value: float) -> bool:
            curve.append((step, value))
            return stopper.should_stop(step, value)

        try:
            result = run_trial(ctx.task, plan, ctx.settings, on_intermediate=on_intermediate)
        except KeyboardInterrupt:
            from optuna.trial import TrialState

            trial.study.tell(trial, state=TrialState.FAIL)
            raise
        if result.status == TrialStatus.COMPLETE:
            stopper.record(curve)
        trial.set_user_attr("curve", curve)
        return result

    def _tell(self, study, trial, result: TrialResult, ctx: SearchContext) -> None:
        tell_result(study, trial, result, ctx.settings.budgets, ctx.settings.primary,
                    ctx.objectives)


def tell_result(study, trial, result: TrialResult, budgets: list, primary: str,
                objectives: list, *, keep_result: bool = True) -> None:
    """Report a finished trial to an Optuna study: constraints, state, values, attributes.

    Both backends use it (Ray's ``OptunaSearch`` keeps its own in-memory study).
    """
    from optuna.trial import TrialState

    trial.set_user_attr("status", result.status)
    trial.set_user_attr("reason", result.reason)
    for budget, value in zip(budgets, result.constraints(budgets, primary)):
        trial.set_constraint(budget.text, value)
    # A few headline values for optuna-dashboard; everything is in "result" (each attribute
    # is one SQLite transaction, so not every metric gets its own).
    for key in (*(o.key for o in objectives), "params", "macs"):
        value = result.metrics.get(key)
        if isinstance(value, float) and math.isfinite(value):
            trial.set_user_attr(key, value)
    if keep_result:
        trial.set_user_attr("result", json.dumps(result.to_dict()))
    values: Any = result.values(objectives)
    if result.status == TrialStatus.INFEASIBLE and values is None:
        # Not evaluated (stopped before fine-tuning): the metric counts as the worst value, so
        # the sampler still learns from the trial. Optuna ranks infeasible trials by their
        # constraint violation anyway, and its NSGA-II handles infinite values.
        worst = {Direction.MAXIMIZE: -math.inf, Direction.MINIMIZE: math.inf}
        values = [result.metrics.get(o.key, worst[o.direction]) for o in objectives]
        values = None if any(math.isnan(v) for v in values) else values
    if result.status in (TrialStatus.COMPLETE, TrialStatus.INFEASIBLE) and values:
        study.tell(trial, values)
    elif result.status in (TrialStatus.PRUNED, TrialStatus.INFEASIBLE):  # no values to tell
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
