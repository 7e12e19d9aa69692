"""Full-protocol latency for the plans a search returns.

Trials are timed with the target's quick screening protocol (``Target.screening``): about
0.1 s per new architecture instead of 1.25 s, with medians within a few percent. What a user
ships must carry full measurements, so at the end of a search every plan on a front, every
baseline the summary compares with and every plan `autoprune plan` picks is measured again
with the target's own protocol. A re-measured plan can leave the front (or break its budget),
which puts other screened plans on it: repeat until every front holds full measurements only.
"""

from __future__ import annotations

from collections.abc import Callable

from autoprune.results import RunConfig, front_plans
from autoprune.trial import SCREENED, TrialResult, TrialSettings, measure_plan

__all__ = ["confirm_fronts", "screened"]


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
            result.metrics.update({k: v for k, v in fresh.items() if k.startswith("latency_")})
    return len(tried)
