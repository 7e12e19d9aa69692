"""Search backends and the search driver shared by the CLI and the Python API."""

from __future__ import annotations

import json
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autoprune.budget import (
    latency_key,
    objective_names,
    parse_budgets,
    parse_objectives,
    resolve_budgets,
)
from autoprune.busy import busy_note
from autoprune.costmodel import CostModel, CostStructure
from autoprune.device import resolve_device
from autoprune.errors import BudgetError, UsageError
from autoprune.plan import PruningPlan
from autoprune.recover import TeacherCache
from autoprune.results import pareto_front, summarize, write_run
from autoprune.run.config import RunConfig
from autoprune.search._base import (
    Backend,
    EarlyStopper,
    SearchContext,
    eta,
    get_backend,
    register_backend,
)
from autoprune.search._preflight import (
    check_budgets,
    check_criteria,
    check_reach,
    check_targets,
    check_trials,
)
from autoprune.search._steer import Steering
from autoprune.space import GroupInfo, SearchSpace, load_space
from autoprune.trial import TrialResult, TrialSettings

__all__ = ["Backend", "EarlyStopper", "SearchContext", "SearchResult", "get_backend",
           "register_backend", "run_search", "search"]

# Backends register themselves on import; ray is imported lazily by its module.
from autoprune.metrics import TrialStatus
from autoprune.run.layout import COST_PROFILE, LATENCY_CACHE, RUN_JSON, SUMMARY_MD
from autoprune.search import (
    _optuna,  # noqa: E402,F401
    _ray,  # noqa: E402,F401
)


@dataclass
class SearchResult:
    """What a search returns: the front, every trial and where the outputs are."""

    front: list[TrialResult]  # Pareto-optimal trials on the primary target, best metric first
    results: list[TrialResult]  # every finished trial
    run_dir: Path  # the run directory
    summary: str  # the Markdown summary (also in run_dir/summary.md)


def _progress_printer(total: int, config: RunConfig, stream=sys.stdout):
    started = time.time()
    lat = latency_key(config.primary)
    done_before: list[int] = []

    def show(result: TrialResult, results: list[TrialResult]) -> None:
        if not done_before:
            done_before.append(len(results) - 1)
        new = len(results) - done_before[0]
        m = result.metrics
        value = f"{config.metric}={m[config.metric]:.4f} " if config.metric in m else ""
        latency = f"p50={m[lat]:.3f}ms " if lat in m else ""
        latency += f"{busy} " if (busy := busy_note(result, config.target_names)) else ""
        front = pareto_front(results, config.parsed_objectives(), config.parsed_budgets(),
                             config.primary)
        best = ", ".join(f"{r.metrics[config.metric]:.3f}@{r.metrics[lat]:.2f}ms"
                         for r in front[:4])
        tag = f" [{result.baseline}]" if result.baseline else ""
        reason = f" ({result.reason[:70]})" if result.status != TrialStatus.COMPLETE else ""
        print(f"[{len(results)}/{total}] trial {result.number}{tag}: {result.status}{reason} "
              f"{value}{latency}| front: {len(front)} plans {best} | "
              f"ETA {eta(started, new, total - done_before[0])}", file=stream, flush=True)

    return show


def run_search(
    task: str | Any,
    space: str | Path | SearchSpace = "per_layer_structured",
    budgets: list[str] | str | None = None,
    *,
    targets: list[str] | None = None,
    trials: int | None = None,
    output: str | Path | None = None,
    backend: str = "optuna",
    sampler: str = "tpe",
    objectives: list[str] | None = None,
    seed: int = 0,
    resume: bool = False,
    finetune_steps: int | None = None,
    screen_latency: bool = True,
    steer: bool = True,
    workers: int = 1,
    backend_options: dict[str, Any] | None = None,
    progress: bool = True,
    token_file: str | None = None,
    verify: int = 0,
    quantize: str | None = None,
    device: str = "auto",
) -> SearchResult:
    """Run a pruning-plan search and write its run directory; see ``autoprune search --help``.

    ``quantize`` (``none``, ``static``, ``dynamic``) limits the space's precision choices to
    fp32 and that scheme, for targets without INT8 kernels.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is where trials reconstruct,
    fine-tune and evaluate; latency is measured on the targets.

    ``verify=K`` fine-tunes the front's top K plans and K others with the task's full budget
    at the end and reports how well the search's metric predicted theirs (search/_verify.py).
    """
    from autoprune.augment import with_augmented
    from autoprune.latency import LatencyCache, load_target
    from autoprune.prune import inspect_model, rank_blocks
    from autoprune.task import load_task

    device = resolve_device(device)  # before anything runs: a missing GPU is a usage error
    run_dir = Path(output) if output else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise UsageError(f"--verify takes a number of plans >= 0, got {verify!r}")
    if resume:
        if not (run_dir / RUN_JSON).is_file():
            raise UsageError(f"--resume: {run_dir} holds no run to resume (no {RUN_JSON})")
        saved = RunConfig.load(run_dir)
        task, space = saved.task, SearchSpace.from_dict(saved.space)
        budgets, backend, sampler, seed = saved.budgets, saved.backend, saved.sampler, saved.seed
        targets = [t["spec"] for t in saved.targets]
        finetune_steps, screen_latency = saved.finetune_steps, saved.screen_latency
        steer = saved.steer
        objectives = objective_names(saved.parsed_objectives())
        trials = saved.trials if trials is None else trials
    elif (run_dir / RUN_JSON).exists():
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it or "
                         f"--output NEW_DIR for a new one")
    trials = 40 if trials is None else trials
    check_trials(trials)
    space_obj = load_space(space)
    if quantize is not None:
        space_obj = space_obj.with_precision(quantize)
    budget_objs = parse_budgets(budgets)
    target_specs = list(targets or ["cpu-1t"])
    target_objs = [load_target(t, token_file=token_file) for t in target_specs]
    names = [t.name for t in target_objs]
    if len(set(names)) != len(names):
        raise UsageError(f"targets must have distinct names, got {', '.join(names)}")
    check_targets(target_objs)  # an unreachable device fails before the task is loaded
    task_spec = task if isinstance(task, str) else getattr(task, "name", "custom")
    task_obj = load_task(task) if isinstance(task, str) else task
    for b in budget_objs:
        if b.target and b.target not in names:
            raise BudgetError(f"budget {b.text!r} names target {b.target!r}, which is not "
                              f"searched; targets: {', '.join(names)} (add --target {b.target})")
        if not b.is_cost and b.metric != task_obj.metric.name:
            raise BudgetError(f"budget {b.text!r}: the task's metric is "
                              f"{task_obj.metric.name!r}; cost budgets are latency, params, "
                              f"flops, macs, size")
    statistic = next((b.statistic for b in budget_objs if b.limits_latency_on(names[0], names[0])),
                     "p50")
    objective_objs = parse_objectives(objectives, task_obj.metric.name,
                                      task_obj.metric.direction, names[0], statistic)
    model = task_obj.build_model()
    inspection = inspect_model(model, task_obj.example_inputs)
    bound = space_obj.bind([GroupInfo(g.name, tuple(g.producers), bool(g.whole_groups))
                             for g in inspection.groups])

    backend_obj = get_backend(backend)
    check_budgets(budget_objs, task_obj.metric, names[0])  # before any output
    backend_obj.check()  # e.g. Ray's install hint, before a run directory is written
    run_dir.mkdir(parents=True, exist_ok=True)
    ft = task_obj.finetune
    if finetune_steps is not None:
        ft = ft.replace(steps=finetune_steps)
    if not ft.eval_every and ft.steps >= 3:
        ft = ft.replace(eval_every=report_every(ft.steps))  # feeds early stopping
    config = RunConfig(
        task=task_spec, space=_space_dict(space_obj), budgets=[b.text for b in budget_objs],
        targets=[{"name": t.name, "spec": s, **t.to_dict()}
                 for t, s in zip(target_objs, target_specs)],
        objectives=[asdict(o) for o in objective_objs], metric=task_obj.metric.name,
        metric_direction=task_obj.metric.direction, backend=backend, sampler=sampler,
        trials=trials, seed=seed, finetune_steps=finetune_steps, screen_latency=screen_latency,
        steer=steer, reference=saved.reference if resume else {})
    settings = TrialSettings(
        targets=target_objs, budgets=budget_objs, finetune=ft,
        latency_cache=LatencyCache(run_dir / LATENCY_CACHE),
        teacher_cache=TeacherCache(task_obj.build_model, device=device),
        screen_latency=screen_latency, seed=seed, device=device)
    say = (lambda text: print(text, flush=True)) if progress else (lambda _: None)
    ctx = SearchContext(
        task_spec=task_spec, task=task_obj, space=bound, settings=settings,
        objectives=objective_objs, config=config, run_dir=run_dir, trials=trials,
        resume=resume, workers=workers, backend_options=backend_options or {},
        progress=_progress_printer(trials, config) if progress else None)
    if not resume:  # a profile left by a run that stopped before its first trial
        (run_dir / COST_PROFILE).unlink(missing_ok=True)
    if not config.reference:  # the dense model, timed in full: it resolves relative budgets
        say("measuring the dense model (full latency protocol)")
        config.reference = backend_obj.measure(ctx, [PruningPlan()])[0]
    if space_obj.depth:  # which blocks go first, before the profile measures a drop
        batches = task_obj.calibration_batches(settings.calibration_batches, seed)
        bound.block_order = rank_blocks(model, with_augmented(batches, task_obj.augment_fn,
                                                              seed), space_obj.depth)
        say(f"depth: blocks ranked to drop first: {', '.join(bound.block_order) or 'none'}")
    settings.budgets, warnings = resolve_budgets(budget_objs, config.reference, names[0])
    warnings += check_criteria(space_obj, inspection.groups)
    ctx.steering = _steering(task_obj, model, inspection, bound, settings, config, run_dir,
                             lambda plans: backend_obj.measure(ctx, plans, screen=True), say)
    if not resume:  # a resumed run keeps its budgets: nothing the advice could change
        warnings += check_reach(ctx.steering, space_obj, config.reference, names[0],
                                lambda plan: backend_obj.measure(ctx, [plan])[0])
    config.save(run_dir)  # a run to resume from here on
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    results = backend_obj.run(ctx)
    try:
        backend_obj.confirm(ctx, results)
    finally:  # Ctrl-C while re-measuring still leaves the run directory (--resume finishes it)
        front = write_run(run_dir, config, results)
    summary = summarize(results, config)
    if verify:  # proxy vs the task's full fine-tuning, on the top plans and a sample of others
        from autoprune.search._verify import verify_search

        summary += verify_search(task_obj, results, config, settings, verify, run_dir,
                                 say).section()
        (run_dir / SUMMARY_MD).write_text(summary)
    return SearchResult(front, results, run_dir, summary)


def _steering(task: Any, model: Any, inspection: Any, space: Any, settings: TrialSettings,
              config: RunConfig, run_dir: Path, measure: Any, say: Any) -> Steering | None:
    """The cost model and steering of a search with an upper cost budget (else None), its
    latency fit started from the dense model and a cheap profile (screened by ``measure``)."""
    if not config.steer:
        return None
    statistics = tuple(dict.fromkeys(
        ["p50", *(b.statistic for b in settings.budgets if b.metric == "latency")]))
    structure = CostStructure.from_model(model, task.example_inputs, inspection,
                                         config.reference)
    steering = Steering(space, CostModel(structure, config.target_names, statistics),
                        settings.budgets, config.primary)
    if not steering.active:
        return None
    steering.model.observe(PruningPlan(), config.reference)
    steering.profile(measure, run_dir, say)
    return steering


def report_every(steps: int) -> int:
    """Fine-tuning steps between early-stopping reports: about 1/3 and 2/3 of ``steps``, never
    the last step (the trial's final evaluation comes right after it)."""
    every = -(-steps // 3)
    while steps % every == 0:
        every += 1
    return every


def _space_dict(space: SearchSpace) -> dict[str, Any]:
    d = asdict(space)
    d["groups"] = {"include": list(d.pop("include")), "exclude": list(d.pop("exclude"))}
    d["finetune"] = {k: {kk: vv for kk, vv in v.items() if vv is not None}
                     for k, v in d["finetune"].items()}
    d["sparsity"] = {k: v for k, v in d["sparsity"].items() if v is not None}
    return json.loads(json.dumps(d))


def search(
    task: str | Any,
    space: str | Path | SearchSpace = "per_layer_structured",
    budgets: list[str] | str | None = None,
    **kwargs: Any,
) -> SearchResult:
    """Search pruning plans for ``task`` and return the Pareto front.

    Example:
        >>> result = autoprune.search("digits", "per_layer_structured", ["latency<1.5ms"],
        ...                           trials=20, output="runs/demo")  # doctest: +SKIP
        >>> result.front[0].plan.save("best.json")  # doctest: +SKIP
    """
    return run_search(task, space, budgets, **kwargs)


class _CallableModule(types.ModuleType):
    """``autoprune.search`` is both this package and the search function: importing the
    package replaces the attribute on ``autoprune``, so the package itself is made callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> SearchResult:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
