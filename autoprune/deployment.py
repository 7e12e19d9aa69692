"""Deployment plan: which pruning plan to ship to every target of a run.

Accuracy depends only on the plan; latency depends on the plan and the target. A multi-target
search fine-tunes each plan once and measures it on every target, so one run answers "what do
I ship where". For every target this module picks the best-metric plan that meets the budgets
applying to that target (its own latency budgets plus the target-free ones such as
``accuracy>=0.97`` or ``params<1M``), and compares it with the dense model on the same target.
A target whose budgets no trial met says so and shows the closest plan (smallest total budget
violation).

``autoprune plan RUN`` prints the Markdown and writes ``RUN/deployment.md`` and
``RUN/deployment.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoprune.budget import Budget
from autoprune.busy import BusyMeasurement, busy_lines, busy_measurements
from autoprune.metrics import LATENCY, SPEEDUP, Direction, TrialStatus, latency_key
from autoprune.results import load_run, metric_cell, target_budgets
from autoprune.run.config import RunConfig
from autoprune.run.layout import DEPLOYMENT_JSON, DEPLOYMENT_MD
from autoprune.trial import TrialResult

__all__ = ["TargetPlan", "DeploymentPlan", "deployment_plan",
           "write_deployment_plan"]

DEPLOYMENT_FORMAT_VERSION = 1


@dataclass
class TargetPlan:
    """The plan recommended for one target (or the closest one when no plan meets its budgets)."""

    target: str  # target name, e.g. "cpu-1t" or "remote://10.0.0.5:8765"
    spec: str  # how the search named it (for `autoprune apply --target`)
    budgets: list[str]  # budgets that apply to this target
    met: bool  # True: `trial` meets every budget above; False: `trial` is the closest plan
    trial: TrialResult | None  # the recommended (or closest) trial; None if nothing was measured
    plan_file: str | None  # plan to apply, relative to the run directory (pareto/trial_N.json)
    dense: TrialResult | None  # the dense model's trial (for speed-ups)
    checks: list[dict[str, Any]] = field(default_factory=list)  # budget, measured, ok
    note: str = ""  # why the plan was chosen / what is missing
    remote: bool = False  # measured on an `autoprune serve-latency` server (needs a token)

    def latency(self, statistic: str = "p50", trial: TrialResult | None = None) -> float | None:
        trial = trial or self.trial
        return trial.metrics.get(latency_key(self.target, statistic)) if trial else None

    @property
    def speedup(self) -> float | None:
        """Dense p50 / plan p50 on this target: timed side by side at the end of the search
        where it was, else the ratio of the two medians."""
        side_by_side = self.trial.metrics.get(SPEEDUP + self.target) if self.trial else None
        if side_by_side:
            return side_by_side
        plan, dense = self.latency(), self.latency(trial=self.dense) if self.dense else None
        return dense / plan if plan and dense else None

    def to_dict(self, metric: str) -> dict[str, Any]:
        t, dense = self.trial, self.dense
        out: dict[str, Any] = {
            "target": self.target, "spec": self.spec, "remote": self.remote,
            "budgets": self.budgets,
            "meets_budgets": self.met, "note": self.note, "checks": self.checks,
            "plan_file": self.plan_file, "trial": t.number if t else None,
        }
        if t is not None:
            out.update({
                "status": t.status, "baseline": t.baseline, "quantize": t.plan.quantize,
                metric: t.metrics.get(metric), f"{metric}_fp32": t.metrics.get(f"{metric}_fp32"),
                "latency_p50_ms": self.latency("p50"),
                "latency_p90_ms": self.latency("p90"), "speedup_vs_dense": self.speedup,
                "params": t.metrics.get("params"), "macs": t.metrics.get("macs"),
                "size_bytes": t.metrics.get("size_bytes"),
            })
        if dense is not None:
            out["dense"] = {"trial": dense.number, metric: dense.metrics.get(metric),
                            "latency_p50_ms": self.latency("p50", dense),
                            "latency_p90_ms": self.latency("p90", dense),
                            "params": dense.metrics.get("params"),
                            "size_bytes": dense.metrics.get("size_bytes")}
        return out


@dataclass
class DeploymentPlan:
    """Targets x recommended plans of one run."""

    config: RunConfig  # the run's configuration
    targets: list[TargetPlan]  # one entry per target, in the search's order
    shared: TrialResult | None  # the best plan meeting every budget on every target, if any
    shared_file: str | None  # its plan file
    counts: dict[str, int]  # trials by status
    busy: list[BusyMeasurement] = field(default_factory=list)  # busy-machine measurements
    busy_lines: list[str] = field(default_factory=list)  # ... as a Markdown section

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "version": DEPLOYMENT_FORMAT_VERSION, "task": c.task, "space": c.space.get("name"),
            "metric": c.metric, "metric_direction": c.metric_direction, "budgets": c.budgets,
            "trials": self.counts,
            "targets": [t.to_dict(c.metric) for t in self.targets],
            "all_targets": {"trial": self.shared.number if self.shared else None,
                            "plan_file": self.shared_file},
            "busy_measurements": [b.to_dict() for b in self.busy],
        }

    def to_markdown(self, run_dir: str | Path | None = None) -> str:
        return _markdown(self, run_dir)


def _sign(config: RunConfig) -> float:
    return Direction(config.metric_direction).sign


def _best(candidates: list[TrialResult], config: RunConfig, target: str) -> TrialResult | None:
    """Best metric; ties: lower p50 latency on ``target``, then lower trial number."""
    lat = latency_key(target)
    ok = [r for r in candidates if config.metric in r.metrics]
    if not ok:
        return None
    return min(ok, key=lambda r: (-_sign(config) * r.metrics[config.metric],
                                  r.metrics.get(lat, float("inf")), r.number or 0))


def _violation(r: TrialResult, budgets: list[Budget], primary: str) -> float:
    return sum(max(b.violation_by(r.metrics, primary), 0.0) for b in budgets)


def _checks(r: TrialResult, budgets: list[Budget], primary: str) -> list[dict[str, Any]]:
    """Each budget's verdict; a relative latency budget judged side by side also gives the
    plan's latency as a fraction of the dense model's (``side_by_side``)."""
    checks = []
    for b in budgets:
        ratio = b.side_by_side(r.metrics, primary)
        checks.append({"budget": b.text, "measured": r.metrics.get(b.metric_key(primary)),
                       "ok": b.met_by(r.metrics, primary),
                       **({"side_by_side": ratio} if ratio is not None else {})})
    return checks


def _plan_file(run_dir: Path, r: TrialResult, config: RunConfig, write: bool) -> str | None:
    """``pareto/trial_N.json`` when the search wrote it, else ``deployment/trial_N.json``."""
    rel = f"pareto/trial_{r.number}.json"
    if (run_dir / rel).is_file():
        return rel
    rel = f"deployment/trial_{r.number}.json"
    if write:
        (run_dir / "deployment").mkdir(exist_ok=True)
        (run_dir / rel).write_text(json.dumps(
            {"trial": r.number, "status": r.status, "baseline": r.baseline, "task": config.task,
             "targets": config.targets, "metrics": r.metrics, "plan": r.plan.to_dict()},
            indent=2))
    return rel if (run_dir / rel).is_file() else None


def _plan_for_target(config: RunConfig, results: list[TrialResult], target: dict[str, Any],
                     dense: TrialResult | None) -> TargetPlan:
    name, primary = target["name"], config.primary
    budgets = target_budgets(config, name)
    lat = latency_key(name)
    measured = [r for r in results if lat in r.metrics]
    spec = str(target.get("spec", name))
    plan = TargetPlan(name, spec, [b.describe() for b in budgets], False, None, None, dense,
                      remote=bool(target.get("remote")) or spec.startswith("remote://"))
    # Every plan measured on this target. Infeasible trials broke a budget (maybe on another
    # target) and were not fine-tuned; only the dense one has a metric (the trained model's),
    # so they compete only when they are truly better. Without a metric a plan can still be
    # the closest one when nothing meets the budgets.
    pool = [r for r in measured if r.status in (TrialStatus.COMPLETE, TrialStatus.INFEASIBLE)]
    meets = [r for r in pool if config.metric in r.metrics
             and all(c["ok"] for c in _checks(r, budgets, primary))]
    best = _best(meets, config, name)
    if best is not None:
        plan.met, plan.trial = True, best
        tuned = sum(r.status == TrialStatus.COMPLETE for r in meets)
        plan.note = (f"no budget applies to this target: best {config.metric} of all plans"
                     if not budgets else f"best {config.metric} among the {len(meets)} plans "
                     f"meeting every budget on {name} ({tuned} fine-tuned)")
        if best.baseline == "dense":
            plan.note += "; the dense model: pruning is not needed here"
        elif best.status != TrialStatus.COMPLETE:
            plan.note += (f"; it was not fine-tuned in the search (it broke a budget on another "
                          f"target), so its {config.metric} is before fine-tuning: "
                          "`autoprune apply` fine-tunes it")
    elif not pool:
        plan.note = (f"no trial was measured on {name}" if not measured else
                     f"no trial measured on {name} completed or was stopped as infeasible")
        return plan
    else:
        closest = min(pool, key=lambda r: (
            round(_violation(r, budgets, primary), 12), r.status != TrialStatus.COMPLETE,
            -_sign(config) * r.metrics.get(config.metric, -_sign(config) * math.inf),
            r.number or 0))
        plan.trial = closest
        broken = [c for c in _checks(closest, budgets, primary) if not c["ok"]]
        plan.note = ("no trial met the budgets on this target; closest plan (smallest budget "
                     "violation) breaks " + ", ".join(
                         f"{c['budget']} (measured {_value(c['measured'])}"
                         + (f", {c['side_by_side']:.0%} of the dense model side by side"
                            if "side_by_side" in c else "") + ")" for c in broken))
    plan.checks = _checks(plan.trial, budgets, primary)
    return plan


def deployment_plan(config: RunConfig, results: list[TrialResult]) -> DeploymentPlan:
    """Compute the recommended plan for every target of a run (no files are written).

    Example:
        >>> config, results = load_run("runs/digits")  # doctest: +SKIP
        >>> [(t.target, t.trial.number, t.met) for t in deployment_plan(config, results).targets]
        [('cpu-1t', 17, True), ('cpu', 9, True)]  # doctest: +SKIP
    """
    dense = next((r for r in sorted(results, key=lambda r: r.status != TrialStatus.COMPLETE)
                  if r.baseline == "dense" and any(k.startswith(LATENCY) for k in r.metrics)),
                 None)
    targets = [_plan_for_target(config, results, t, dense) for t in config.targets]
    every = [r for r in results
             if r.feasible(config.parsed_budgets(), config.primary)
             and all(latency_key(t) in r.metrics for t in config.target_names)]
    counts = {s.value: sum(r.status == s for r in results) for s in TrialStatus}
    return DeploymentPlan(config, targets, _best(every, config, config.primary), None, counts,
                          busy_measurements(results, config), busy_lines(results, config))


def _value(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.3g}{unit}"


def _count(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}K"


def _size(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} KB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in rows)])


def table_rows(plan: DeploymentPlan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the targets x plans table (Markdown and HTML share them)."""
    metric = plan.config.metric
    header = ["target", "budgets", "status", "plan file", "trial", metric, "p50 ms", "p90 ms",
              "speed-up vs dense", "params", "size", "quantize"]
    rows = []
    for t in plan.targets:
        r = t.trial
        status = "meets budgets" if t.met else ("NO PLAN MEETS BUDGETS - closest shown"
                                                if r else "nothing measured")
        dense_params = t.dense.metrics.get("params") if t.dense else None
        params = _count(r.metrics.get("params")) if r else "-"
        if r and dense_params and r.metrics.get("params") is not None:
            params += f" ({r.metrics['params'] / dense_params:.0%})"
        label = f"{r.number}" + (f" ({r.baseline})" if r and r.baseline else "") if r else "-"
        rows.append([
            t.target, ", ".join(t.budgets) or "none", status, t.plan_file or "-", label,
            metric_cell(r, metric) if r else "-", _value(t.latency("p50")),
            _value(t.latency("p90")),
            f"{t.speedup:.2f}x" if t.speedup else "-", params,
            _size(r.metrics.get("size_bytes")) if r else "-", r.plan.quantize if r else "-"])
    return header, rows


def _markdown(plan: DeploymentPlan, run_dir: str | Path | None) -> str:
    c = plan.config
    counts = ", ".join(f"{n} {s}" for s, n in plan.counts.items())
    where = f" ({run_dir})" if run_dir is not None else ""
    lines = [f"# Deployment plan{where}", "",
             f"Task {c.task}, space {c.space.get('name')}, {sum(plan.counts.values())} trials "
             f"({counts}); budgets: {c.budgets_text()}.", ""]
    header, rows = table_rows(plan)
    lines += [_table(rows, header), ""]
    dense = next((t.dense for t in plan.targets if t.dense), None)
    if dense is not None:
        lat = ", ".join(f"{_value(t.latency('p50', dense))} ms on {t.target}"
                        for t in plan.targets if t.latency("p50", dense) is not None)
        lines += [f"Dense model (trial {dense.number}): {c.metric} "
                  f"{dense.metrics.get(c.metric, float('nan')):.4f}, p50 {lat}, "
                  f"{_count(dense.metrics.get('params'))} params, "
                  f"{_size(dense.metrics.get('size_bytes'))}.", ""]
    lines += ["## Per target", ""]
    for t in plan.targets:
        lines.append(f"- **{t.target}**: {t.note}.")
    if len(plan.targets) > 1:
        if plan.shared is not None:
            lines += ["", f"One plan for every target: trial {plan.shared.number} "
                          f"({plan.shared_file or '-'}) meets every budget on every target "
                          f"({c.metric} {plan.shared.metrics[c.metric]:.4f})."]
        else:
            lines += ["", "No single plan meets every budget on every target: ship a plan per "
                          "target."]
    if plan.busy_lines:
        lines += ["", *plan.busy_lines]
    shipped = [t for t in plan.targets if t.plan_file]
    if shipped:
        lines += ["", "## Apply", "", "```"]
        for t in shipped:
            token = " --token-file TOKEN_FILE" if t.remote else ""
            out = "ship/" + "".join(ch if ch.isalnum() or ch in "-_." else "-"
                                    for ch in t.target.replace("://", "-"))
            run = f"{run_dir}/" if run_dir is not None else ""
            lines.append(f"autoprune apply {run}{t.plan_file} --task {c.task} --target "
                         f"{t.spec}{token} --output {out}")
        lines.append("```")
    return "\n".join(lines) + "\n"


def write_deployment_plan(run_dir: str | Path) -> str:
    """Write ``RUN/deployment.md`` and ``RUN/deployment.json``; return the Markdown.

    Plan files are the search's ``pareto/trial_N.json``; a recommended or closest plan that is
    not on a saved front is written to ``deployment/trial_N.json``.

    Example:
        >>> print(write_deployment_plan("runs/digits"))  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    config, results = load_run(run_dir)
    plan = deployment_plan(config, results)
    for t in plan.targets:
        if t.trial is not None:
            t.plan_file = _plan_file(run_dir, t.trial, config, write=True)
    if plan.shared is not None:
        plan.shared_file = _plan_file(run_dir, plan.shared, config, write=True)
    markdown = plan.to_markdown(run_dir)
    (run_dir / DEPLOYMENT_MD).write_text(markdown)
    (run_dir / DEPLOYMENT_JSON).write_text(json.dumps(plan.to_dict(), indent=2))
    return markdown
