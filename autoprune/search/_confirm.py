"""Full-protocol latency for the plans a search returns.

Trials are timed with the target's quick screening protocol (``Target.screening``): about
0.1 s per new architecture instead of 1.25 s, with medians within a few percent. What a user
ships must carry full measurements, so at the end of a search every plan on a front, and every
baseline the summary compares with, is measured again with the target's own protocol. A
re-measured plan can leave the front (or break its budget), which puts other screened plans on
it: repeat until every front holds full measurements only.
"""

from __future__ import annotations

from collections.abc import Callable

from autoprune.results import RunConfig, front_plans
from autoprune.trial import SCREENED, TrialResult, TrialSettings, measure_plan

__all__ = ["confirm_fronts"]


def _screened(results: list[TrialResult], config: RunConfig
              ) -> list[tuple[TrialResult, list[str]]]:
    """(trial, targets) pairs still holding a screened latency where it counts."""
    todo: dict[int, tuple[TrialResult, list[str]]] = {}
    for target in config.target_names:
        shown = [*front_plans(results, config, target).values(),
                 *(r for r in results if r.baseline)]
        for r in shown:
            if r.metrics.get(SCREENED + target):
                entry = todo.setdefault(id(r), (r, []))
                if target not in entry[1]:
                    entry[1].append(target)
    return list(todo.values())


def confirm_fronts(
    task, results: list[TrialResult], config: RunConfig, settings: TrialSettings,
    say: Callable[[str], None] | None = None,
) -> int:
    """Re-measure screened latencies on the fronts and baselines in place; return how many
    (trial, target) measurements were taken."""
    say = say or (lambda text: print(text, flush=True))
    targets = {t.name: t for t in settings.targets}
    done = 0
    while todo := _screened(results, config):
        if not done:
            say(f"re-measuring {len(todo)} front and baseline plan(s) with the full latency "
                f"protocol")
        for result, names in todo:
            done += len(names)
            try:
                fresh = measure_plan(task, result.plan, settings, [targets[n] for n in names])
            except Exception as e:  # measured once already; keep the screened value
                say(f"trial {result.number}: full re-measurement failed ({type(e).__name__}: "
                    f"{str(e)[:200]}); keeping its screening latency")
                fresh = {}
            for name in names:
                result.metrics.pop(SCREENED + name, None)
            result.metrics.update({k: v for k, v in fresh.items() if k != "size_bytes"})
    return done
