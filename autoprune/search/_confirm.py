"""Full-protocol latency for the plans a search returns.

Trials are timed with the target's quick screening protocol (``Target.screening``): about
0.1 s per new architecture instead of 1.25 s, with medians within a few percent. What a user
ships must carry full measurements, so at the end of a search every plan on a front, every
baseline the summary compares with and every plan `autoprune plan` picks is measured again
with the target's own protocol. A re-measured plan can leave the front (or break its budget),
which puts other screened plans on it: repeat until every front holds full measurements only.

Medians taken minutes apart drift with the machine (the dense digits model measured 2.02 ms
and 1.53 ms in two processes on one idle VM), so the speed-ups a search reports are measured
side by side: the dense model is timed again, interleaved with the plans a user sees
(:func:`time_side_by_side`), and the start and end values of the dense model are compared.
"""

from __future__ import annotations

from collections.abc import Callable

from autoprune.metrics import (
    DENSE_END,
    LATENCY,
    SCREENED,
    SIDE_BY_SIDE,
    SPEEDUP,
    STATISTICS,
    latency_key,
)
from autoprune.results import front_plans
from autoprune.run.config import RunConfig
from autoprune.trial import TrialResult, TrialSettings, measure_plan

__all__ = ["confirm_and_time", "confirm_fronts", "screened", "time_side_by_side",
           "untimed"]


def screened(results: list[TrialResult], config: RunConfig,
             skip: set[tuple[int, str]] = frozenset()) -> list[tuple[TrialResult, list[str]]]:
    """(trial, targets) pairs still holding a screened latency where a user sees it: a front,
    a baseline, or a plan `autoprune plan` picks (recommended, closest, one for every
    target)."""
    from autoprune.deployment import deployment_plan

    chosen = deployment_plan(config, results)
    todo: dict[int, tuple[TrialResult, list[str]]] = {}
    for target in config.target_names:
        picked = [p.trial for p in chosen.targets if p.target == target and p.trial is not None]
        shown = [*front_plans(results, config, target).values(),
                 *(r for r in results if r.baseline), *picked,
                 *([chosen.shared] if chosen.shared is not None else [])]
        for r in shown:
            if r.metrics.get(SCREENED + target) and (id(r), target) not in skip:
                entry = todo.setdefault(id(r), (r, []))
                if target not in entry[1]:
                    entry[1].append(target)
    return list(todo.values())


def confirm_fronts(
    task, results: list[TrialResult], config: RunConfig, settings: TrialSettings,
    say: Callable[[str], None] | None = None,
) -> int:
    """Re-measure screened latencies of the fronts, baselines and deployment picks in place;
    return how many (trial, target) measurements were attempted."""
    say = say or (lambda text: print(text, flush=True))
    targets = {t.name: t for t in settings.targets}
    tried: set[tuple[int, str]] = set()  # a failed re-measurement is not tried again
    while todo := screened(results, config, tried):
        if not tried:
            say(f"re-measuring {len(todo)} front and baseline plan(s) with the full latency "
                f"protocol")
        for result, names in todo:
            tried.update((id(result), n) for n in names)
            try:
                fresh = measure_plan(task, result.plan, settings, [targets[n] for n in names])
            except Exception as e:  # measured once already: keep the screened value, marked
                say(f"trial {result.number}: full re-measurement failed ({type(e).__name__}: "
                    f"{str(e)[:200]}); it keeps its screening latency")
                continue
            for name in names:
                result.metrics.pop(SCREENED + name, None)
            result.metrics.update({k: v for k, v in fresh.items() if k.startswith(LATENCY)})
    return len(tried)


def confirm_and_time(task, results: list[TrialResult], config: RunConfig,
                     settings: TrialSettings, say: Callable[[str], None] | None = None) -> None:
    """:func:`confirm_fronts`, then :func:`time_side_by_side`. A plan the side-by-side timing
    puts out of a relative budget brings others onto a front: they are re-measured and timed
    in turn, a few rounds at most, and none after a round that timed nothing new (the
    timing failed, or the dense model is missing)."""
    left: set[int] | None = None
    for _ in range(4):
        confirm_fronts(task, results, config, settings, say=say)
        time_side_by_side(task, results, config, settings, say=say)
        before, left = left, {id(r) for r in untimed(results, config, settings)}
        if not screened(results, config) and not left or left == before:
            return


def untimed(results: list[TrialResult], config: RunConfig, settings: TrialSettings
            ) -> list[TrialResult]:
    """Plans on a local target's front not yet timed side by side with the dense model."""
    out = {}
    for target in settings.targets:
        if target.is_remote:
            continue
        key = SIDE_BY_SIDE + latency_key(target.name)
        out.update({id(r): r for r in front_plans(results, config, target.name).values()
                    if r.baseline != "dense" and key not in r.metrics})
    return list(out.values())


def time_side_by_side(task, results: list[TrialResult], config: RunConfig,
                      settings: TrialSettings, say: Callable[[str], None] | None = None) -> None:
    """Time the dense model interleaved with every plan on a front (and the baselines) on
    each local target; store ``speedup@T`` and the latency as a fraction of the dense model's
    (``side_by_side_latency_p50_ms@T``, p90 and mean too: relative budgets are judged on it)
    in each plan's metrics, and ``dense_end_ms@T`` in the dense trial's. A plan that
    quantizes is timed as the ONNX model it ships."""
    from autoprune.latency import SIDE_BY_SIDE_ROUNDS, compare_latency
    from autoprune.plan import PruningPlan
    from autoprune.quantize import quantize_model
    from autoprune.trial import prune_for_task

    say = say or (lambda text: print(text, flush=True))
    dense = next((r for r in results if r.baseline == "dense"), None)
    for target in settings.targets:
        if target.is_remote or dense is None:
            continue
        shown = {id(r): r for r in [*front_plans(results, config, target.name).values(),
                                     *(r for r in results if r.baseline)] if r is not dense}
        if not shown:
            continue
        say(f"timing the dense model side by side with {len(shown)} plan(s) on {target.name}")
        models, shipped = {"dense": prune_for_task(task, PruningPlan(), settings)[1]}, {}
        for r in shown.values():
            label = f"trial {r.number}"
            models[label] = prune_for_task(task, r.plan, settings)[1]
            if r.plan.quantize != "none":
                shipped[label] = quantize_model(task, models[label], r.plan.quantize)
        try:
            rows = compare_latency(models, task.example_inputs, target, onnx_models=shipped,
                                   repeats=SIDE_BY_SIDE_ROUNDS)
        except Exception as e:  # the search's own measurements still stand
            say(f"side-by-side timing on {target.name} failed ({type(e).__name__}: "
                f"{str(e)[:200]}); speed-ups come from separate medians")
            continue
        dense.metrics[DENSE_END + target.name] = rows[0].stats.value(target.statistic)
        for r, row in zip(shown.values(), rows[1:]):
            r.metrics[SPEEDUP + target.name] = row.speedup
            for stat in STATISTICS:  # what relative latency budgets are judged on
                r.metrics[SIDE_BY_SIDE + latency_key(target.name, stat)] = (
                    row.stats.value(stat) / rows[0].stats.value(stat))
