"""What a digits trial costs besides fine-tuning, piece by piece, measured side by side.

Prints the mean time of: building and pruning the model with Torch-Pruning plus the MAC count
(the trial's "prune" phase), the ONNX export a new architecture needs before it is timed, a
screening and a full latency measurement, the final evaluation on the 360 validation images,
a garbage collection over the whole process against one after ``gc.freeze`` (what
``run_trial`` does), and one trial's Optuna bookkeeping (ask, 10 suggestions, 9 attributes,
tell) with the default SQLite storage, with autoprune's WAL-mode storage and in memory.

Run: ``.venv/bin/python benchmarks/trial_overhead.py [--repeats 10]``

The output goes to ``benchmarks/results/trial-overhead-<date>.txt``, its table (``overhead``) to
``trial-overhead-<date>.json`` (see ``provenance.py``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402

from autoprune.latency import (  # noqa: E402
    export_onnx,
    load_target,
    measure_latency,
    prepare_inputs,
)
from autoprune.plan import PruningPlan  # noqa: E402
from autoprune.prune import apply_plan  # noqa: E402
from autoprune.search._optuna import _storage  # noqa: E402
from autoprune.stats import model_stats  # noqa: E402
from autoprune.task import load_task  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


def bookkeeping(storage: object, trials: int) -> float:
    """Mean seconds of one trial's study traffic, over ``trials`` trials."""
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=0))
    start = time.perf_counter()
    for i in range(trials):
        trial = study.ask()
        for j in range(10):
            trial.suggest_float(f"s{j}", 0.0, 0.9, step=0.05)
        for j in range(9):
            trial.set_user_attr(f"a{j}", "x" * 200)
        study.tell(trial, [0.5 + i * 1e-3, 1.0 - i * 1e-3])
    return (time.perf_counter() - start) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with provenance.recorded("trial-overhead") as rec:
        run(args, rec)


def run(args: argparse.Namespace, rec: provenance.Record) -> None:
    task = load_task("digits")
    target = load_target("cpu-1t")
    plan = PruningPlan.uniform(0.4)
    inputs = prepare_inputs(task.example_inputs, target)
    pruned = apply_plan(task.build_model(), plan, task.example_inputs)
    full_repeats = max(2, args.repeats // 3)

    def prune() -> None:
        model = apply_plan(task.build_model(), plan, task.example_inputs)
        model_stats(model, task.example_inputs)

    rows = [
        ("prune phase (build, Torch-Pruning, MAC count)", timed(prune, args.repeats)),
        ("ONNX export (with the ORT check)", timed(lambda: export_onnx(pruned, inputs),
                                                   args.repeats)),
        ("screening latency measurement (export included)",
         timed(lambda: measure_latency(pruned, inputs, target, screen=True), args.repeats)),
        ("full latency measurement (export included)",
         timed(lambda: measure_latency(pruned, inputs, target), full_repeats)),
        ("final evaluation (360 images)", timed(lambda: task.evaluate(pruned), args.repeats)),
        ("gc.collect() over the whole process", timed(gc.collect, args.repeats)),
    ]
    gc.freeze()
    rows.append(("gc.collect() after gc.freeze()", timed(gc.collect, args.repeats)))
    gc.unfreeze()
    with tempfile.TemporaryDirectory() as tmp:
        trials = 40
        rows += [
            ("study traffic per trial, SQLite default",
             bookkeeping(f"sqlite:///{Path(tmp) / 'default.db'}", trials)),
            ("study traffic per trial, SQLite WAL (autoprune)",
             bookkeeping(_storage(Path(tmp) / "wal.db"), trials)),
            ("study traffic per trial, in memory", bookkeeping(None, trials)),
        ]

    print(f"digits, cpu-1t, uniform structured 40 % plan; mean of {args.repeats} runs "
          f"({full_repeats} for the full latency measurement, each after one untimed run); "
          f"study traffic: mean over {trials} trials")
    provenance.print_table("overhead", ["piece", "ms"],
                           [[name, f"{1000 * seconds:.1f}"] for name, seconds in rows],
                           right=(1,))
    rec.value("repeats", args.repeats)


if __name__ == "__main__":
    main()
