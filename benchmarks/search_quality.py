"""Search quality: does the search beat random search and the best uniform plan?

Settings where pruning costs accuracy: digits at 35 %, 20 % and 12 % of the dense model's
latency and the ``sequences`` task at 40 % and 33 % (relative budgets, resolved on this machine;
sequences@33 is near the most the space can prune there: 29 % of dense).

``search`` part, methods measured side by side (seed by seed, the methods interleaved, so that
load on a shared machine falls on all of them): the default search (``run_search``'s defaults:
TPE, steered), NSGA-II (steered, population 20), random sampling without steering, and the
best uniform plan (the best of the uniform baselines inside the budget, ``uniform-fit``
included, by final metric). Optional variants help choose defaults: ``random-steered``,
``nsga2-pN`` (population N), ``per-layer-criteria`` (``criteria_share: per_layer``). Per
setting it prints mean ± sd over the seeds of: the FINAL metric of each method's recommended
plan (re-fine-tuned with the task's full budget, what ``autoprune apply`` gives; the headline),
the search's own (proxy) metric of that plan, the fraction of searched trials inside the cost
budget, and the hypervolume of the searched trials' proxy-metric / latency front under the
budget (baselines left out; normalized: 1 = metric 1 at zero latency).

``proxies`` part: a pool of plans near each budget (a cheap steered random search without
fine-tuning), each scored with every proxy (brief fine-tuning, BN recalibration, distillation
and their mixes) and with the task's full fine-tuning (twice, two seeds, for the noise); prints
the Kendall tau of each proxy against the final metric, side by side, and its cost.

Usage:
    python benchmarks/search_quality.py search [--settings digits@35,digits@20,...]
        [--methods default,nsga2,random,uniform] [--trials 40] [--seeds 3]
        [--finetune-steps 20] [--out runs/bench_search_quality]
    python benchmarks/search_quality.py proxies [--settings ...] [--plans 12]

Finished runs in ``--out`` are reused (a crash or Ctrl-C loses at most the current search).
The output goes to ``benchmarks/results/search-quality-<date>.txt`` (``proxies-<date>.txt``) and
its tables and values to the ``.json`` beside it (see ``benchmarks/provenance.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import provenance  # noqa: E402

from autoprune.budget import latency_key  # noqa: E402
from autoprune.errors import UsageError  # noqa: E402
from autoprune.results import RunConfig, load_run, recommend  # noqa: E402
from autoprune.search import run_search  # noqa: E402
from autoprune.search._verify import final_result, kendall_tau  # noqa: E402
from autoprune.space import load_space  # noqa: E402
from autoprune.task import load_task  # noqa: E402
from autoprune.trial import TrialResult, TrialSettings, run_trial  # noqa: E402

SETTINGS = "digits@35,digits@20,digits@12,sequences@40,sequences@33"
SPACE = "per_layer_structured"


# ------------------------------------------------------------------------------ context
def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*provenance.load())


def finite(value: float) -> float | None:
    """``value``, or None for nan / inf (a results file is JSON)."""
    return value if math.isfinite(value) else None


def mean_sd(values: list[float], fmt: str = ".4f") -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    missing = f" ({len(values) - len(vals)} n/a)" if len(vals) < len(values) else ""
    return f"{statistics.mean(vals):{fmt}} ± {sd:{fmt}}{missing}"


def cell(values: list[float], fmt: str = ".4f") -> str:
    """A table cell: mean ± sd, or empty where the method has no such figure."""
    return mean_sd(values, fmt) if values else ""


def parse_setting(text: str) -> tuple[str, int]:
    task, _, pct = text.partition("@")
    return task, int(pct)


def setting_text(setting: str) -> str:
    """``sequences@33`` -> ``sequences, latency<33%``."""
    task, pct = parse_setting(setting)
    return f"{task}, latency<{pct}%"


def label(method: str) -> str:
    return "best uniform" if method == "uniform" else method


def average(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.mean(vals) if vals else math.nan


# ------------------------------------------------------------------------------ measures
def hypervolume(points: list[tuple[float, float]], ref_latency: float) -> float:
    """Area dominated by (metric up, latency down) points, from (metric 0, ref_latency),
    normalized by ``ref_latency`` (1.0 = metric 1 at zero latency)."""
    front = sorted((lat, m) for m, lat in points if lat < ref_latency)
    area, best = 0.0, 0.0
    for i, (lat, m) in enumerate(front):
        best = max(best, m)
        following = front[i + 1][0] if i + 1 < len(front) else ref_latency
        area += best * (following - lat)
    return area / ref_latency


class Finals:
    """Final metrics (the task's full fine-tuning) by setting, plan and seed, kept on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, setting: str, task: Any, result: TrialResult, seed: int) -> float:
        key = f"{setting}|{seed}|{result.plan.key()}"
        if key not in self.data:
            final = final_result(task, result.plan, seed)
            self.data[key] = final.metrics.get(task.metric.name, math.nan)
            self.path.write_text(json.dumps(self.data))
        return self.data[key]


# ------------------------------------------------------------------------------ search part
def methods_table(names: list[str]) -> dict[str, dict[str, Any]]:
    """run_search keyword arguments of each searched method."""
    table: dict[str, dict[str, Any]] = {
        "default": {},
        "nsga2": {"sampler": "nsga2", "steer": True},
        "random": {"sampler": "random", "steer": False},
        "random-steered": {"sampler": "random", "steer": True},
        "per-layer-criteria": {"space": "per_layer_criteria"},
    }
    out = {}
    for name in names:
        if name == "uniform":
            continue
        if name.startswith("nsga2-p"):
            out[name] = {"sampler": "nsga2", "population": int(name[len("nsga2-p"):])}
        elif name in table:
            out[name] = table[name]
        else:
            raise SystemExit(f"unknown method {name!r}; known: {', '.join(table)}, uniform, "
                             f"nsga2-pN")
    return out


def searched(task: str, pct: int, seed: int, out: Path, trials: int, steps: int,
             space: str = SPACE, population: int | None = None, **kwargs: Any
             ) -> tuple[RunConfig, list[TrialResult], float]:
    """One search (or the finished one already in ``out``): config, results, minutes."""
    done = out / "bench_done.json"
    if done.is_file():
        config, results = load_run(out)
        return config, results, json.loads(done.read_text())["minutes"]
    shutil.rmtree(out, ignore_errors=True)
    import autoprune.search._optuna as backend

    space_obj = load_space(SPACE)
    if space == "per_layer_criteria":
        from dataclasses import replace

        space_obj = replace(space_obj, name=space, criteria_share="per_layer")
    original = backend.make_sampler
    if population:
        import optuna

        backend.make_sampler = lambda name, seed: optuna.samplers.NSGAIISampler(
            seed=seed, population_size=population)
    start = time.time()
    try:
        run_search(task, space_obj, [f"latency<{pct}%"], targets=["cpu-1t"], trials=trials,
                   finetune_steps=steps, seed=seed, output=out, progress=False, **kwargs)
    finally:
        backend.make_sampler = original
    minutes = (time.time() - start) / 60
    done.write_text(json.dumps({"minutes": minutes}))
    config, results = load_run(out)
    return config, results, minutes


def run_measures(config: RunConfig, results: list[TrialResult]) -> dict[str, float]:
    budget = config.parsed_budgets()[0]
    lat = latency_key(config.primary)
    trials = [r for r in results if r.baseline is None]
    inside = [r for r in trials if r.status != "failed" and r.metrics.get(lat, math.inf)
              <= budget.value]
    # The baselines (dense, uniform 25/50/75 %) are the same plans in every method's run: the
    # hypervolume is that of what the method's own trials found.
    feasible = [r for r in trials if r.feasible([budget], config.primary)]
    points = [(r.metrics[config.metric], r.metrics[lat]) for r in feasible]
    return {"inside": len(inside) / max(1, len(trials)),
            "hypervolume": hypervolume(points, budget.value), "limit_ms": budget.value,
            "dense_ms": config.reference.get(lat, math.nan)}


def search_part(args: argparse.Namespace, rec: provenance.Record) -> None:
    methods = methods_table(args.methods.split(","))
    want_uniform = "uniform" in args.methods.split(",")
    finals = Finals(Path(args.out) / "finals.json")
    summary: dict[str, dict[str, dict[str, list[float]]]] = {}
    for setting in args.settings.split(","):
        try:
            summary[setting] = search_setting(args, rec, setting, methods, want_uniform, finals)
        except UsageError as e:  # e.g. a budget out of this machine's reach: say so, go on
            print(f"\n### {setting}: not searched: {e}\n", flush=True)
            rec.value(f"not-searched-{setting}", str(e))
    print_summary(summary)
    print_checks(summary)


def search_setting(args: argparse.Namespace, rec: provenance.Record, setting: str,
                   methods: dict[str, dict[str, Any]], want_uniform: bool, finals: Finals
                   ) -> dict[str, dict[str, list[float]]]:
    """Every method's searches of one setting, seed by seed; prints the setting's table."""
    task_name, pct = parse_setting(setting)
    task = load_task(task_name)
    rows: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in ("final", "proxy", "inside", "hypervolume", "minutes")}
        for m in [*methods, *(["uniform"] if want_uniform else [])]}
    pairs: list[tuple[float, float]] = []  # (proxy, final) of every plan re-fine-tuned
    load_before, limits = load(), []
    for seed in range(args.seeds):
        runs = {}
        for name, kwargs in methods.items():
            out = Path(args.out) / setting.replace("@", "-") / name / f"seed{seed}"
            config, results, minutes = searched(task_name, pct, seed, out, args.trials,
                                                args.finetune_steps, **kwargs)
            runs[name] = (config, results)
            m = run_measures(config, results)
            limits.append((m["dense_ms"], m["limit_ms"]))
            best = recommend(results, config)
            final = finals(setting, task, best, seed) if best else math.nan
            proxy = best.metrics[config.metric] if best else math.nan
            if best:
                pairs.append((proxy, final))
            row = rows[name]
            for key, value in (("final", final), ("proxy", proxy), ("inside", m["inside"]),
                               ("hypervolume", m["hypervolume"]), ("minutes", minutes)):
                row[key].append(value)
            print(f"  {setting} seed {seed} {name:<20} final {final:.4f} proxy {proxy:.4f} "
                  f"inside {m['inside']:.2f} hv {m['hypervolume']:.4f} "
                  f"{minutes:.1f} min ({load()})", flush=True)
        if want_uniform:
            config, results = runs.get("default") or next(iter(runs.values()))
            budgets = config.parsed_budgets()
            uniform = [r for r in results if r.baseline and r.baseline.startswith("uniform")
                       and r.feasible(budgets, config.primary)]
            scored = [(finals(setting, task, r, seed), r) for r in uniform]
            pairs += [(r.metrics[config.metric], f) for f, r in scored]
            best_final, best = max(scored, key=lambda x: x[0], default=(math.nan, None))
            rows["uniform"]["final"].append(best_final)
            rows["uniform"]["proxy"].append(best.metrics[config.metric] if best
                                            else math.nan)
            print(f"  {setting} seed {seed} {'uniform':<20} final {best_final:.4f} "
                  f"({best.baseline if best else 'none inside the budget'})", flush=True)
    print_setting(rec, setting, rows, limits, pairs, load_before)
    return rows


COLUMNS = ["FINAL metric", "proxy metric", "searched trials inside", "hypervolume"]


def figures(row: dict[str, list[float]]) -> list[str]:
    return [cell(row["final"]), cell(row["proxy"]), cell(row["inside"], ".2f"),
            cell(row["hypervolume"])]


def print_setting(rec: provenance.Record, setting: str,
                  rows: dict[str, dict[str, list[float]]], limits: list[tuple[float, float]],
                  pairs: list[tuple[float, float]], load_before: str) -> None:
    dense = statistics.median(d for d, _ in limits) if limits else math.nan
    limit = statistics.median(v for _, v in limits) if limits else math.nan
    print(f"\n### {setting}: latency < {setting.partition('@')[2]} % of dense (dense p50 "
          f"{dense:.3f} ms, budget {limit:.3f} ms, medians over runs); {load_before} before, "
          f"{load()} after")
    provenance.print_table(f"setting-{setting}", ["method", *COLUMNS],
                           [[label(name), *figures(row)] for name, row in rows.items()],
                           right=(1, 2, 3, 4))
    minutes = {name: round(statistics.mean(row["minutes"]), 2)
               for name, row in rows.items() if row["minutes"]}
    print("minutes per search: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()))
    rec.value(f"minutes-{setting}", minutes)
    tau = kendall_tau([p for p, _ in pairs], [f for _, f in pairs])
    rec.value(f"tau-{setting}", finite(tau))
    print(f"Kendall tau, proxy vs final, over the {len(pairs)} plans re-fine-tuned above: "
          f"{tau:.2f}\n", flush=True)


def print_summary(summary: dict[str, dict[str, dict[str, list[float]]]]) -> None:
    """All settings in one table; the default search's FINAL metric in bold where it is the
    best of the methods."""
    table = []
    for setting, rows in summary.items():
        finals = {name: average(row["final"]) for name, row in rows.items()}
        others = [v for name, v in finals.items() if name != "default" and math.isfinite(v)]
        best = ("default" in finals and math.isfinite(finals["default"]) and bool(others)
                and finals["default"] >= max(others))
        for i, (name, row) in enumerate(rows.items()):
            cells = figures(row)
            if name == "default" and best:
                cells[0] = f"**{cells[0]}**"
            table.append([setting_text(setting) if i == 0 else "", label(name), *cells])
    provenance.print_table("search", ["setting", "method", *COLUMNS], table,
                           right=(2, 3, 4, 5))


def print_checks(summary: dict[str, dict[str, dict[str, list[float]]]]) -> None:
    """The issue's targets under 20 % and 12 % of dense, met or not, with the numbers."""
    print("### Targets (mean of the seeds)")
    table = []
    for setting, rows in summary.items():
        if "default" not in rows:
            continue

        def avg(method: str, key: str, rows: dict = rows) -> float:
            return average(rows.get(method, {}).get(key, []))

        d = avg("default", "final")
        checks = [("default final >= best uniform + 0.01", d, avg("uniform", "final") + 0.01),
                  ("default final >= random + 0.005", d, avg("random", "final") + 0.005),
                  ("default hypervolume >= 1.05x random", avg("default", "hypervolume"),
                   1.05 * avg("random", "hypervolume")),
                  ("default inside budget >= 0.80", avg("default", "inside"), 0.80)]
        for text, value, target in checks:
            verdict = ("n/a" if not (math.isfinite(value) and math.isfinite(target))
                       else "met" if value >= target else "NOT MET")
            table.append([setting, f"{text} ({target:.4f})", f"{value:.4f}", verdict])
    provenance.print_table("targets", ["setting", "target", "value", "verdict"], table,
                           right=(2,))


# ------------------------------------------------------------------------------ proxies
PROXIES = {  # name -> (fine-tuning steps, BN recalibration batches, distillation weight)
    "BN only": (0, 8, 0.0),
    "ft10": (10, 0, 0.0),
    "ft10+BN": (10, 8, 0.0),
    "ft20": (20, 0, 0.0),
    "ft20+BN": (20, 8, 0.0),
    "ft20+KD": (20, 0, 0.5),
    "ft20+BN+KD": (20, 8, 0.5),
    "ft40": (40, 0, 0.0),
    "ft40+BN": (40, 8, 0.0),
}


def plan_pool(task_name: str, pct: int, out: Path, trials: int, n: int) -> list[TrialResult]:
    """Distinct pruned plans near the budget: a steered random search without fine-tuning,
    its completed plans at evenly spaced ranks of their metric (baselines included)."""
    config, results, _ = searched(task_name, pct, 0, out, trials, 0, sampler="random",
                                  steer=True)
    budgets = config.parsed_budgets()
    distinct: dict[str, TrialResult] = {}
    for r in results:
        if r.baseline != "dense" and r.feasible(budgets, config.primary):
            distinct.setdefault(r.plan.key(), r)
    pool = sorted(distinct.values(), key=lambda r: r.metrics[config.metric])
    if len(pool) <= n:
        return pool
    return [pool[round(i * (len(pool) - 1) / (n - 1))] for i in range(n)]


def proxy_part(args: argparse.Namespace, rec: provenance.Record) -> None:
    for setting in args.settings.split(","):
        task_name, pct = parse_setting(setting)
        task = load_task(task_name)
        load_before = load()
        pool = plan_pool(task_name, pct, Path(args.out) / "proxies" / setting.replace("@", "-"),
                         args.pool_trials, args.plans)
        has_bn = any("BatchNorm" in type(m).__name__ for m in task.build_model().modules())
        proxies = {k: v for k, v in PROXIES.items() if has_bn or not v[1]}
        scores: dict[str, list[float]] = {k: [] for k in proxies}
        seconds: dict[str, float] = dict.fromkeys(proxies, 0.0)
        finals, noise = [], []
        for i, r in enumerate(pool):
            for name, (steps, bn, kd) in proxies.items():
                ft = task.finetune.replace(steps=steps, eval_every=0, bn_recalibration=bn,
                                           distill_weight=kd)
                start = time.time()
                res = run_trial(task, r.plan, TrialSettings(targets=[], finetune=ft, seed=0))
                seconds[name] += time.time() - start
                scores[name].append(res.metrics.get(task.metric.name, math.nan))
            finals.append(final_result(task, r.plan, 0).metrics.get(task.metric.name, math.nan))
            if i < args.noise_plans:
                again = final_result(task, r.plan, 1).metrics.get(task.metric.name, math.nan)
                noise.append(abs(again - finals[-1]))
            print(f"  {setting} plan {i} (trial {r.number}, {r.baseline or 'searched'}): "
                  + " ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items())
                  + f" | final {finals[-1]:.4f}", flush=True)
        spread = max(finals) - min(finals) if finals else math.nan
        typical = statistics.mean(noise) if noise else math.nan
        apart = spread > 2 * typical
        print(f"\n### {setting}: {len(pool)} plans near the budget; final = the task's full "
              f"fine-tuning ({task.finetune.steps} steps, bn_recalibration="
              f"{task.finetune.bn_recalibration}); {load_before} before, {load()} after")
        print(f"final {task.metric.name}: {min(finals):.4f} .. {max(finals):.4f} (spread "
              f"{spread:.4f}); noise (|seed 0 - seed 1| over {len(noise)} plans): mean "
              f"{typical:.4f}, max {max(noise, default=math.nan):.4f}; "
              + ("final metrics differ by more than their noise" if apart
                 else "WITHIN NOISE: tau says little"))
        rec.value(f"final-range-{setting}", {
            "plans": len(pool), "min": finite(min(finals)), "max": finite(max(finals)),
            "spread": finite(spread), "noise_plans": len(noise), "noise_mean": finite(typical),
            "noise_max": finite(max(noise, default=math.nan)), "apart": apart})
        provenance.print_table(
            f"proxies-{setting}", ["proxy", "Kendall tau", "mean metric", "s/plan"],
            [[name, f"{kendall_tau(values, finals):.2f}", f"{statistics.mean(values):.4f}",
              f"{seconds[name] / len(pool):.1f}"] for name, values in scores.items()],
            right=(1, 2, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["search", "proxies"])
    p.add_argument("--settings", default=SETTINGS, help=f"default: {SETTINGS}")
    p.add_argument("--methods", default="default,nsga2,random,uniform",
                   help="search part: default, nsga2, random, uniform, random-steered, "
                        "per-layer-criteria, nsga2-pN")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--finetune-steps", type=int, default=20, help="the search's proxy")
    p.add_argument("--plans", type=int, default=12, help="proxies part: plans per setting")
    p.add_argument("--pool-trials", type=int, default=24, help="proxies part: pool search")
    p.add_argument("--noise-plans", type=int, default=4,
                   help="proxies part: plans fine-tuned with a second seed")
    p.add_argument("--out", default="runs/bench_search_quality")
    args = p.parse_args()
    import torch

    # One thread: on a shared 2-core machine torch's spinning worker threads make these small
    # models many times slower, and the latency targets time one thread anyway.
    torch.set_num_threads(1)
    with provenance.recorded("search-quality" if args.part == "search" else "proxies") as rec:
        print(f"args:    {vars(args)}\n", flush=True)
        if args.part == "search":
            search_part(args, rec)
        else:
            proxy_part(args, rec)


if __name__ == "__main__":
    main()
