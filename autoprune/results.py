"""Search results: Pareto fronts, the run directory's trials (layout: ``autoprune.run.layout``)
and the summary a search prints."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from autoprune.budget import Budget, Objective, latency_key
from autoprune.busy import busy_lines
from autoprune.metrics import DENSE_END, PREDICTED, SPEEDUP, Direction, TrialStatus
from autoprune.run.config import RunConfig
from autoprune.run.layout import PARETO_DIR, RUN_JSON, SUMMARY_MD, TRIALS_CSV, TRIALS_JSONL
from autoprune.trial import TrialResult

__all__ = ["RunConfig", "pareto_front", "write_run", "load_run", "summarize",
           "recommend", "target_budgets", "target_front", "front_plans", "steering_lines",
           "cost_model_errors", "within_cost_budgets"]


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(
    results: list[TrialResult], objectives: list[Objective], budgets: list[Budget], primary: str
) -> list[TrialResult]:
    """Non-dominated trials among those that completed and meet every budget, best metric first.

    If no trial meets the budgets, the front of all completed trials is returned instead
    (``summarize`` says so).
    """
    pool = [r for r in results if r.feasible(budgets, primary) and r.values(objectives)]
    if not pool:
        pool = [r for r in results if r.status == TrialStatus.COMPLETE and r.values(objectives)]
    signs = [-o.direction.sign for o in objectives]
    keyed = [(r, [s * v for s, v in zip(signs, r.values(objectives))]) for r in pool]
    front = [r for r, v in keyed if not any(_dominates(w, v) for _, w in keyed)]
    # One representative per distinct point (duplicated plans measure the same).
    unique: dict[tuple, TrialResult] = {}
    for r in front:
        unique.setdefault(tuple(r.values(objectives)), r)
    return sorted(unique.values(), key=lambda r: signs[0] * r.values(objectives)[0])


def target_budgets(config: RunConfig, target: str) -> list[Budget]:
    """Budgets a plan shipped to ``target`` must meet: its latency budgets and the others.

    A latency budget without ``@target`` applies to the first (primary) target.
    """
    return [b for b in config.parsed_budgets()
            if b.metric != "latency" or b.limits_latency_on(target, config.primary)]


def target_front(results: list[TrialResult], config: RunConfig, target: str) -> list[TrialResult]:
    """The metric-vs-latency front on one target (every target keeps its own front)."""
    objectives = [Objective(config.metric, config.metric_direction),
                  Objective(latency_key(target), Direction.MINIMIZE)]
    return pareto_front(results, objectives, target_budgets(config, target), config.primary)


def recommend(results: list[TrialResult], config: RunConfig, target: str | None = None
              ) -> TrialResult | None:
    """The best-metric trial meeting ``target``'s budgets (ties: lower latency on it)."""
    target = target or config.primary
    budgets = target_budgets(config, target)
    ok = [r for r in results if r.feasible(budgets, config.primary)]
    if not ok:
        return None
    sign = -Direction(config.metric_direction).sign
    lat = latency_key(target)
    return min(ok, key=lambda r: (sign * r.metrics[config.metric], r.metrics.get(lat, 0.0)))


def _completed_uniform(results: list[TrialResult], config: RunConfig) -> list[TrialResult]:
    lat = latency_key(config.primary)
    return [r for r in results if r.baseline and r.baseline.startswith("uniform")
            and r.status == TrialStatus.COMPLETE and lat in r.metrics]


def uniform_reference(results: list[TrialResult], config: RunConfig, best: TrialResult
                      ) -> TrialResult | None:
    """The best completed uniform baseline at equal (or lower, +2 %) latency than ``best`` on
    the primary target: the hand-picked plan ``best`` is compared with (None: there is none)."""
    lat = latency_key(config.primary)
    if lat not in best.metrics:
        return None
    sign = Direction(config.metric_direction).sign
    at_latency = [r for r in _completed_uniform(results, config)
                  if r.metrics[lat] <= best.metrics[lat] * 1.02]
    return max(at_latency, key=lambda r: sign * r.metrics[config.metric], default=None)


def _baseline_gain(results: list[TrialResult], config: RunConfig, best: TrialResult) -> str:
    """Compare a plan with the best uniform baseline at equal (or lower) latency."""
    lat = latency_key(config.primary)
    uniform = _completed_uniform(results, config)
    if not uniform or lat not in best.metrics:
        return "no uniform baseline completed"
    ref = uniform_reference(results, config, best)
    if ref is None:
        fastest = min(uniform, key=lambda r: r.metrics[lat])
        return (f"faster than every uniform baseline (fastest: {fastest.baseline} at "
                f"{fastest.metrics[lat]:.3f} ms)")
    gain = best.metrics[config.metric] - ref.metrics[config.metric]
    return (f"{config.metric} {gain:+.4f} vs best uniform baseline at equal latency "
            f"({ref.baseline}: {ref.metrics[config.metric]:.4f} at {ref.metrics[lat]:.3f} ms)")


def front_plans(results: list[TrialResult], config: RunConfig,
                target: str | None = None) -> dict[int | None, TrialResult]:
    """The plans a run ships in ``pareto/``, by trial number: the front over every objective
    and each target's metric/latency front (``target``: only that target's)."""
    keep: dict[int | None, TrialResult] = {}
    if target in (None, config.primary):
        front = pareto_front(results, config.parsed_objectives(), config.parsed_budgets(),
                             config.primary)
        keep.update({r.number: r for r in front})
    for name in config.target_names:
        if target in (None, name):
            keep.update({r.number: r for r in target_front(results, config, name)})
    return keep


def _plan_file(result: TrialResult, config: RunConfig) -> dict[str, Any]:
    return {"trial": result.number, "status": result.status, "baseline": result.baseline,
            "task": config.task, "targets": config.targets, "metrics": result.metrics,
            "plan": result.plan.to_dict()}


_CSV_FIXED = ["number", "status", "baseline", "params", "nonzero_params", "macs", "size_bytes"]


def write_run(run_dir: Path, config: RunConfig, results: list[TrialResult]) -> list[TrialResult]:
    """Write trials.jsonl, trials.csv, pareto/ and summary.md; return the front."""
    results = sorted(results, key=lambda r: r.number if r.number is not None else -1)
    with open(run_dir / TRIALS_JSONL, "w") as f:
        for r in results:
            f.write(json.dumps(r.to_dict()) + "\n")
    lat_cols = [latency_key(t, s) for t in config.target_names for s in ("p50", "p90")]
    cols = [*_CSV_FIXED[:3], config.metric, *lat_cols, *_CSV_FIXED[3:], "reason",
            "t_prune", "t_latency", "t_finetune", "t_evaluate", "plan_params"]
    with open(run_dir / TRIALS_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            row = {"number": r.number, "status": r.status, "baseline": r.baseline or "",
                   "reason": r.reason, "plan_params": json.dumps(r.params, sort_keys=True),
                   **{f"t_{k}": f"{v:.3f}" for k, v in r.timings.items()},
                   **{k: (f"{v:.6g}" if isinstance(v, float) else v)
                      for k, v in r.metrics.items()}}
            w.writerow([row.get(c, "") for c in cols])
    pareto_dir = run_dir / PARETO_DIR
    pareto_dir.mkdir(exist_ok=True)
    for old in pareto_dir.glob("*.json"):
        old.unlink()
    front = pareto_front(results, config.parsed_objectives(), config.parsed_budgets(),
                         config.primary)
    for r in front_plans(results, config).values():
        (pareto_dir / f"trial_{r.number}.json").write_text(
            json.dumps(_plan_file(r, config), indent=2))
    (run_dir / SUMMARY_MD).write_text(summarize(results, config))
    return front


def load_run(run_dir: str | Path) -> tuple[RunConfig, list[TrialResult]]:
    """Read a run directory written by any backend."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_JSON).is_file():
        from autoprune.errors import UsageError

        raise UsageError(f"{run_dir} is not a run directory (no run.json); pass the --output "
                         f"directory of a search")
    config = RunConfig.load(run_dir)
    results = []
    if (run_dir / TRIALS_JSONL).is_file():
        for line in (run_dir / TRIALS_JSONL).read_text().splitlines():
            if line.strip():
                results.append(TrialResult.from_dict(json.loads(line)))
    return config, results


def metric_cell(r: TrialResult, metric: str) -> str:
    """The metric of what ships; for a quantized plan, the fp32 model's value beside it."""
    if metric not in r.metrics:
        return "-"
    fp32 = r.metrics.get(f"{metric}_fp32")
    return f"{r.metrics[metric]:.4f}" + (f" (fp32 {fp32:.4f})" if fp32 is not None else "")


def _fmt_row(r: TrialResult, config: RunConfig) -> list[str]:
    m = r.metrics
    cells = [str(r.number), r.baseline or "", metric_cell(r, config.metric)]
    cells += [f"{m[latency_key(t)]:.3f}" if latency_key(t) in m else "-"
              for t in config.target_names]
    cells += [f"{m.get('params', 0) / 1e3:.1f}K", f"{m.get('macs', 0) / 1e6:.2f}M",
              f"{m.get('size_bytes', 0) / 1e6:.2f}MB", r.plan.quantize]
    return cells


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in rows)])


def _reused(results: list[TrialResult]) -> str:
    n = sum(r.reused_from is not None for r in results)
    return f"; {n} reused the result of an earlier trial of the same plan" if n else ""


def cost_model_errors(results: list[TrialResult], target: str) -> list[float]:
    """|predicted / measured - 1| of each measured trial's latency on ``target``, in order."""
    key = latency_key(target)
    return [abs(r.metrics[PREDICTED + key] / r.metrics[key] - 1) for r in results
            if r.reused_from is None and r.metrics.get(key) and r.metrics.get(PREDICTED + key)]


def within_cost_budgets(results: list[TrialResult], config: RunConfig) -> tuple[int, int]:
    """How many searched plans (not baselines, not reused, not failed) met every cost budget,
    and how many there are; (0, 0) without a cost budget."""
    searched = [r for r in results if not r.baseline and r.reused_from is None
                and r.status != TrialStatus.FAILED]
    cost = [b for b in config.parsed_budgets() if b.is_cost]
    if not cost:
        return 0, 0
    inside = sum(all(b.met_by(r.metrics, config.primary) for b in cost) for r in searched)
    return inside, len(searched)


def steering_lines(results: list[TrialResult], config: RunConfig,
                    dense: TrialResult | None) -> list[str]:
    """How well the cost model predicted, how many searched plans met the cost budgets, and
    how the dense model's latency moved between the start and the end of the search."""
    lines = []
    inside, searched = within_cost_budgets(results, config)
    if searched:
        lines.append(f"- {inside} of {searched} searched plans met the cost budgets")
    for target in config.target_names:
        key = latency_key(target)
        errors = cost_model_errors(results, target)
        if errors:
            late = errors[10:]
            lines.append(f"- cost model on {target}: median |predicted / measured - 1| "
                         f"{100 * statistics.median(errors):.1f} % over {len(errors)} trials"
                         + (f", {100 * statistics.median(late):.1f} % after the first 10"
                            if late else ""))
        start, end = config.reference.get(key), dense.metrics.get(DENSE_END + target) \
            if dense else None
        if start and end:
            lines.append(f"- dense model on {target}: {start:.3f} ms at the start, {end:.3f} ms "
                         f"at the end, timed side by side with the front "
                         f"({100 * (end / start - 1):+.1f} %)")
    return ["", "## Steering and measurement", "", *lines] if lines else []


def fallback_lines(results: list[TrialResult]) -> list[str]:
    """One line per trial (first 20) whose plan asked for a criterion that could not score
    some groups: the criterion that ranked them instead, recorded with the trial."""
    fell_back = [r for r in results if r.fallbacks and r.reused_from is None]
    return [f"- trial {r.number}: {len(r.fallbacks)} group(s) ranked "
            f"{', '.join(sorted(set(r.fallbacks.values())))} (the criterion cannot score "
            f"them), e.g. {next(iter(r.fallbacks))}" for r in fell_back[:20]]


def warning_lines(results: list[TrialResult]) -> list[str]:
    """One line per distinct warning the trials recorded (timing left unpinned, early
    stopping lost), with the trials it concerns."""
    trials: dict[str, list[int]] = {}
    for r in results:
        for w in r.warnings:
            trials.setdefault(w, []).append(r.number)
    return [f"- {w} (trials {', '.join(str(n) for n in numbers[:10])}"
            f"{', ...' if len(numbers) > 10 else ''})" for w, numbers in trials.items()]


def summarize(results: list[TrialResult], config: RunConfig) -> str:
    """Markdown summary: counts, the front, the recommended plan, the gain over baselines."""
    budgets = config.parsed_budgets()
    counts = {s.value: sum(r.status == s for r in results) for s in TrialStatus}
    lines = [f"# autoprune run: task {config.task}, space {config.space.get('name')}", "",
             f"{len(results)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}"
             f"{_reused(results)}); "
             f"budgets: {config.budgets_text(budgets)}; targets: "
             f"{', '.join(config.target_names)}", ""]
    header = ["trial", "baseline", config.metric,
              *[f"p50 ms @{t}" for t in config.target_names], "params", "MACs", "size",
              "quantize"]
    # The dense model is a reference even when it breaks a budget (then not fine-tuned).
    dense = next((r for r in results if r.baseline == "dense"
                  and latency_key(config.primary) in r.metrics), None)
    if dense:
        note = "" if dense.status == TrialStatus.COMPLETE else f" ({dense.status}: {dense.reason})"
        lines += ["Dense model: " + ", ".join(
            f"{c} {v}" for c, v in zip(header[2:], _fmt_row(dense, config)[2:])) + note, ""]
    for target in config.target_names:
        front = target_front(results, config, target)
        feasible = any(r.feasible(budgets, config.primary) for r in front)
        lines += [f"## Pareto front on {target} ({config.metric} vs p50 latency)"
                  + ("" if feasible or not front else " - no trial meets the budgets; "
                                                       "front of all trials"), ""]
        lines += [_table([_fmt_row(r, config) for r in front], header) if front
                  else "no trial completed", ""]
    lines += ["## Recommended plan", ""]
    for target in config.target_names:
        best = recommend(results, config, target)
        if best is None:
            shown = config.budgets_text(target_budgets(config, target))
            lines.append(f"- {target}: no trial meets its budgets ({shown})")
            continue
        lat = best.metrics.get(latency_key(target), float("nan"))
        speed = ""
        if SPEEDUP + target in best.metrics:
            speed = (f", {best.metrics[SPEEDUP + target]:.2f}x faster than dense (timed side "
                     f"by side)")
        elif dense and latency_key(target) in dense.metrics:
            speed = f", {dense.metrics[latency_key(target)] / lat:.2f}x faster than dense"
        lines.append(f"- {target}: pareto/trial_{best.number}.json - {config.metric} "
                     f"{best.metrics[config.metric]:.4f}, {lat:.3f} ms{speed}; "
                     f"{_baseline_gain(results, config, best)}")
    lines += steering_lines(results, config, dense)
    busy = busy_lines(results, config)
    if busy:
        lines += ["", *busy]
    fell_back = fallback_lines(results)
    if fell_back:
        lines += ["", f"## Criterion fallbacks ({len(fell_back)} trials)", "", *fell_back]
    warned = warning_lines(results)
    if warned:
        lines += ["", "## Warnings", "", *warned]
    failed = [r for r in results if r.status in (TrialStatus.FAILED, TrialStatus.INFEASIBLE)]
    if failed:
        lines += ["", f"## Failed and infeasible trials ({len(failed)})", ""]
        lines += [f"- trial {r.number} ({r.status}): {r.reason}" for r in failed[:20]]
        if len(failed) > 20:
            lines.append(f"- ... {len(failed) - 20} more in trials.csv")
    return "\n".join(lines) + "\n"
