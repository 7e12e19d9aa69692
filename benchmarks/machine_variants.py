"""The main job (`make search`) on machines of other speeds, emulated with target variants.

A relative budget asks the same of every machine, but machines differ in more than speed: the
balance between ONNX Runtime's fixed cost per op and the compute decides how far pruning can
speed a model up. One machine cannot be made uniformly slower (a CFS CPU quota throttles in
slices of 1 ms or more, so a 0.2 ms run is either not slowed or slowed 3x: the median barely
moves while the spread explodes), so this script shifts that balance with target variants,
each a profile of the ``cpu-1t`` target:

- ``cpu-1t``: the shipped default;
- ``noopt``: graph optimizations off (no fused ops, no blocked NCHWc layout): slower kernels,
  the dense digits model ~1.8x slower;
- ``2threads``: each op split over both cores, the fixed costs not: the dense model ~1.5x
  faster, the most pruned plans hardly faster than on one thread.

For each variant it runs the main job's search (digits, ``latency<20%``, 40 trials, 40
fine-tuning steps, ``--verify 2``) and prints: the dense model's latency, the share of searched
plans inside the budget, the recommended plan's speed-up (timed side by side with the dense
model), its accuracy after the search's fine-tuning and after the task's full one, each
against the best uniform plan at equal latency, and the cost model's median error after the
first 10 trials.

Usage:
    python benchmarks/machine_variants.py [--variants cpu-1t,noopt,2threads]
        [--trials 40] [--out runs/bench_machine_variants]

The output goes to ``benchmarks/results/machine-variants-<date>.txt`` and its table and values
to the ``.json`` beside it (see ``benchmarks/provenance.py``).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import provenance  # noqa: E402

from autoprune.budget import latency_key  # noqa: E402
from autoprune.errors import UsageError  # noqa: E402
from autoprune.metrics import SPEEDUP  # noqa: E402
from autoprune.results import (  # noqa: E402
    cost_model_errors,
    load_run,
    recommend,
    within_cost_budgets,
)
from autoprune.run.layout import VERIFY_JSON  # noqa: E402
from autoprune.search import run_search  # noqa: E402

VARIANTS = {
    "cpu-1t": "",
    "noopt": "graph_optimization_level: disable\n",
    "2threads": "intra_op_threads: 2\n",
}
BUDGET = "latency<20%"
COLUMNS = ["target variant", "dense p50 at the start", "searched plans inside",
           "recommended: speed-up side by side", "after 40 steps", "after the full fine-tuning",
           "cost model's error after 10 trials"]


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*provenance.load())


def run_variant(name: str, out: Path, trials: int) -> dict[str, object] | str:
    """The main job's search on one target variant (a finished one in ``out`` is reused), or
    why it could not run (a budget the variant's most pruned plan cannot reach)."""
    try:
        return _search_variant(name, out, trials)
    except UsageError as e:
        print(f"  {name}: not searched: {e}", flush=True)
        return str(e)


def _search_variant(name: str, out: Path, trials: int) -> dict[str, object]:
    run_dir = out / name
    finished = (run_dir / VERIFY_JSON).is_file() and load_run(run_dir)[0].trials == trials
    if not finished:  # none yet, one cut short, or one of another --trials
        profile = out / f"{name}.yaml"
        profile.write_text(f"base: cpu-1t\nname: {name}\n{VARIANTS[name]}")
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.time()
        run_search("digits", "per_layer_structured", [BUDGET], targets=[str(profile)],
                   trials=trials, finetune_steps=40, verify=2, output=run_dir, progress=False)
        print(f"  {name}: searched in {(time.time() - start) / 60:.1f} min ({load()})",
              flush=True)
    config, results = load_run(run_dir)
    verify = json.loads((run_dir / VERIFY_JSON).read_text())
    finals = {p["trial"]: p for p in verify["plans"]}
    lat = latency_key(config.primary)
    inside, searched = within_cost_budgets(results, config)
    best = recommend(results, config)
    errors = cost_model_errors(results, config.primary)[10:]
    mine, uniform = finals.get(verify["recommended"]), finals.get(verify["uniform"])
    metric = config.metric
    return {
        "dense_ms": config.reference.get(lat, math.nan),
        "inside": inside,
        "searched": searched,
        "speedup": best.metrics.get(SPEEDUP + config.primary, math.nan) if best else math.nan,
        "proxy": f"{mine['proxy']:.4f} / {uniform['proxy']:.4f}" if mine and uniform else
                 f"{best.metrics[metric]:.4f} / none" if best else "n/a",
        "final": f"{mine['final']:.4f} / {uniform['final']:.4f}" if mine and uniform else "n/a",
        "uniform": uniform["baseline"] if uniform else "none",
        "noise": verify.get("noise", math.nan),
        "error": statistics.median(errors) if errors else math.nan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_machine_variants"))
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    with provenance.recorded("machine-variants") as rec:
        print(f"args:    {vars(args)}\n", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        rows = {name: run_variant(name, args.out, args.trials) for name in names}
        print(f"\n### the main job ({BUDGET}, {args.trials} trials, --verify 2) per target "
              "variant")
        print("accuracy: the recommended plan / the best uniform plan at equal latency, after "
              "the search's fine-tuning and after the task's full one")
        searched = {name: r for name, r in rows.items() if isinstance(r, dict)}
        provenance.print_table("variants", COLUMNS, [
            [f"`{name}`", f"{r['dense_ms']:.3f} ms", f"{r['inside']} of {r['searched']}",
             f"{r['speedup']:.2f}x", r["proxy"], r["final"], f"{100 * r['error']:.1f} %"]
            if isinstance(r, dict) else
            [f"`{name}`", "", f"not searched: {BUDGET} out of reach", "", "", "", ""]
            for name, r in rows.items()], right=(1, 2, 3, 6))
        print("noise (the recommended plan's full fine-tuning, |seed - another seed|): "
              + ", ".join(f"{name} {r['noise']:.4f}" for name, r in searched.items()))
        print("best uniform plan at equal latency: "
              + ", ".join(f"{name} {r['uniform']}" for name, r in searched.items()))
        rec.value("noise", {name: r["noise"] if math.isfinite(r["noise"]) else None
                            for name, r in searched.items()})
        rec.value("uniform-plan", {name: r["uniform"] for name, r in searched.items()})
        rec.value("not-searched", {name: r for name, r in rows.items() if isinstance(r, str)})


if __name__ == "__main__":
    main()
