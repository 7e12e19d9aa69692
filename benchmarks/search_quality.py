"""Search quality on the digits task: autoprune (NSGA-II) vs random search vs uniform plans.

Same trial budget for each method, same space (per-layer structured), same fine-tuning, same
target (cpu-1t). Prints, side by side: the best accuracy under two latency budgets and the
hypervolume of the accuracy/latency front; then the per-trial time breakdown (prune, latency,
fine-tune, evaluate, bookkeeping), how far the screened latencies of the re-measured plans were
from their full measurements, and the process's memory from trial 10 to the last trial.

Usage: python benchmarks/search_quality.py [--trials 40] [--finetune-steps 40] [--out DIR]
       [--methods nsga2,tpe,random,uniform]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from autoprune.budget import latency_key
from autoprune.search import run_search
from autoprune.task import load_task
from autoprune.trial import TrialResult

LAT = latency_key("cpu-1t")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def hypervolume(points: list[tuple[float, float]], ref_latency: float) -> float:
    """Area dominated by (accuracy up, latency down) points, from (acc 0, ref_latency)."""
    front = sorted((lat, acc) for acc, lat in points if lat < ref_latency)
    area, best_acc = 0.0, 0.0
    for i, (lat, acc) in enumerate(front):
        best_acc = max(best_acc, acc)
        next_lat = front[i + 1][0] if i + 1 < len(front) else ref_latency
        area += best_acc * (next_lat - lat)
    return area / ref_latency  # normalized: 1.0 = accuracy 1 at zero latency


def best_under(results: list[TrialResult], limit_ms: float) -> float:
    ok = [r.metrics["accuracy"] for r in results
          if r.status == "complete" and r.metrics.get(LAT, 1e9) < limit_ms]
    return max(ok, default=float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--finetune-steps", type=int, default=40, help="as in `make search`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_search_quality")
    p.add_argument("--methods", default="nsga2,tpe,random,uniform",
                   help="comma-separated subset of nsga2, tpe, random, uniform")
    args = p.parse_args()

    from autoprune.latency import measure_latency

    task = load_task("digits")
    dense_ms = measure_latency(task.build_model(), task.example_inputs, "cpu-1t").p50_ms
    loose, tight = 0.6 * dense_ms, 0.35 * dense_ms
    budget = f"latency<{loose:.3f}ms"
    print(f"dense p50 on cpu-1t: {dense_ms:.3f} ms; budgets: {loose:.3f} ms (60 %) and "
          f"{tight:.3f} ms (35 %); {args.trials} trials per method\n")

    import autoprune.search._optuna as backend

    choices = {"nsga2": ("autoprune (nsga2)", "per_layer_structured", "nsga2"),
               "tpe": ("autoprune (tpe)", "per_layer_structured", "tpe"),
               "random": ("random search", "per_layer_structured", "random"),
               "uniform": ("uniform structured", "uniform_structured", "random")}
    methods = {choices[m][0]: (*choices[m][1:], m) for m in args.methods.split(",")}
    rows, all_results = [], {}
    for name, (space, sampler, key) in methods.items():
        stamps: list[tuple[float, float]] = []
        original_tell = backend.OptunaBackend._tell

        def tell(self, study, trial, result, ctx, _s=stamps, _t=original_tell):
            _t(self, study, trial, result, ctx)
            _s.append((time.time(), rss_mb()))

        backend.OptunaBackend._tell = tell
        t0 = time.time()
        result = run_search("digits", space, [budget], targets=["cpu-1t"], trials=args.trials,
                            sampler=sampler, finetune_steps=args.finetune_steps,
                            output=Path(args.out) / key,
                            seed=args.seed,
                            progress=False)
        backend.OptunaBackend._tell = original_tell
        wall = time.time() - t0
        finished = time.time() - (stamps[-1][0] if stamps else t0)
        res = result.results
        points = [(r.metrics["accuracy"], r.metrics[LAT]) for r in res
                  if r.status == "complete" and LAT in r.metrics]
        rows.append((name, best_under(res, loose), best_under(res, tight),
                     hypervolume(points, dense_ms * 1.05), wall / 60))
        all_results[name] = (res, stamps, t0, finished, result.run_dir)

    print(f"{'method':<20} {'best acc <' + f'{loose:.2f}ms':>16} "
          f"{'best acc <' + f'{tight:.2f}ms':>16} {'hypervolume':>12} {'minutes':>8}")
    for name, a, b, hv, minutes in rows:
        print(f"{name:<20} {a:>16.4f} {b:>16.4f} {hv:>12.4f} {minutes:>8.1f}")

    first = next(iter(all_results))
    res, stamps, t0, finished, run_dir = all_results[first]
    feasible = [r for r in res if r.status == "complete"]
    infeasible = [r for r in res if r.status == "infeasible"]
    ends = [t0] + [t for t, _ in stamps]
    walls = {r.number: ends[i + 1] - ends[i] for i, r in enumerate(sorted(
        res, key=lambda r: r.number)) if i + 1 < len(ends)}

    def phase(trials: list[TrialResult], key: str) -> float:
        return statistics.mean(r.timings.get(key, 0.0) for r in trials) if trials else 0.0

    print(f"\nper-trial time, {first} run (seconds, mean):")
    print(f"{'':<12} {'prune':>7} {'latency':>8} {'finetune':>9} {'evaluate':>9} "
          f"{'bookkeep':>9} {'total':>7} {'n':>4}")
    for label, group in (("feasible", feasible), ("infeasible", infeasible)):
        if not group:
            print(f"{label:<12} (none)")
            continue
        total = statistics.mean(walls.get(r.number, 0.0) for r in group)
        parts = [phase(group, k) for k in ("prune", "latency", "finetune", "evaluate")]
        print(f"{label:<12} {parts[0]:>7.2f} {parts[1]:>8.2f} {parts[2]:>9.2f} {parts[3]:>9.2f} "
              f"{max(total - sum(parts), 0):>9.2f} {total:>7.2f} {len(group):>4}")
    if feasible:
        f_total = statistics.mean(walls.get(r.number, 0.0) for r in feasible)
        non_ft = f_total - phase(feasible, "finetune")
        print(f"\neverything but fine-tuning: {100 * non_ft / f_total:.1f} % of a feasible "
              f"trial (target <= 10 %)")
        if infeasible:
            i_total = statistics.mean(walls.get(r.number, 0.0) for r in infeasible)
            print(f"infeasible trial: {100 * i_total / f_total:.1f} % of a feasible trial "
                  f"(target <= 5 %)")
    print(f"after the last trial (full re-measurement of the fronts, run directory): "
          f"{finished:.1f} s, {finished / len(res):.2f} s per trial")
    # Screened vs full p50 of the plans re-measured after the last trial (both are cached).
    entries = json.loads((run_dir / "latency_cache.json").read_text())["entries"]
    diffs = [100 * (v["p50_ms"] / entries[k.partition("|screen")[0]]["p50_ms"] - 1)
             for k, v in entries.items()
             if "|screen" in k and k.partition("|screen")[0] in entries]
    if diffs:
        print(f"screened vs full p50 of the {len(diffs)} re-measured plan(s): "
              f"{min(diffs):+.1f} .. {max(diffs):+.1f} %")
    if len(stamps) >= 10:
        print(f"RSS after trial 10: {stamps[9][1]:.0f} MB, after trial {len(stamps)}: "
              f"{stamps[-1][1]:.0f} MB (target: flat)")


if __name__ == "__main__":
    main()
