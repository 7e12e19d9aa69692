"""Does measured ONNX Runtime latency follow pruning, and is it repeatable?

On ``resnet_1m`` (the ~1.05 M-parameter residual CNN, 1x1x32x32 input) this prints, for dense,
unstructured 50 % / 80 % and structured 25 % / 50 % / 75 % (uniform L1 plans), and
``--grouped-model`` (``resnext_1m``: grouped 3x3 convolutions) dense and structured 50 % / 75 %:

- measured p50 and CV, FLOPs ratio (dense MACs / model MACs, Torch-Pruning's counter),
  measured speed-up over dense and speed-up / FLOPs ratio;
- repeatability: every model measured ``--repeats`` times, each in a fresh ONNX Runtime session,
  all sessions interleaved in short blocks, and the spread of the medians, +-(max-min)/2 as a
  percentage of their median.

- the search's screening protocol (``Target.screening``, as a search's trial gets it from
  ``measure_latency(screen=True)``: a busy screening measurement is taken again in full) against
  the full one: each model measured ``--repeats`` times with each, alternating, in fresh
  sessions: median p50s, their difference and the wall time one measurement takes.

- INT8 (``--int8-task``, default ``digits``: the trained ``resnet_1m``), dense and structured
  50 % (fine-tuned with the task's settings), each as fp32, static INT8 (``int8``) and dynamic
  INT8 (``int8-dynamic``): p50, speed-up over dense fp32 and over the same model in fp32, and
  the task metric of each ONNX model run by ONNX Runtime over the validation data.

``--sequential`` also measures each model ``--repeats`` times back to back (no interleaving), to
show what interleaving buys on a busy machine. ``--load N`` runs N busy-loop processes beside the
measurements (a busy machine on demand); measurements the busy-machine guard flags are counted.

Run: ``.venv/bin/python benchmarks/latency_fidelity.py [--target cpu-1t] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch_pruning as tp

from autoprune.latency import (
    Target,
    export_onnx,
    load_target,
    measure_interleaved,
    measure_latency,
    measure_onnx,
    prepare_inputs,
)
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan, baked_copy
from autoprune.testing import create_test_model

CONFIGS = [
    ("dense", None),
    ("unstructured 50%", PruningPlan.uniform(0.5, "unstructured")),
    ("unstructured 80%", PruningPlan.uniform(0.8, "unstructured")),
    ("structured 25%", PruningPlan.uniform(0.25, "structured")),
    ("structured 50%", PruningPlan.uniform(0.5, "structured")),
    ("structured 75%", PruningPlan.uniform(0.75, "structured")),
]
# INT8 rows (``--int8-task``): the task's trained model, dense and structured 50 %.
INT8_CONFIGS = [("dense", None), ("structured 50%", PruningPlan.uniform(0.5, "structured"))]
# Rows of a second model with grouped 3x3 convolutions (``--grouped-model``, ResNeXt-style with
# squeeze-excite), measured in the same interleaved run against its own dense row.
GROUPED = [
    ("grouped dense", None),
    ("grouped 50%", PruningPlan.uniform(0.5, "structured")),
    ("grouped 75%", PruningPlan.uniform(0.75, "structured")),
]


def spread(values: list[float]) -> float:
    """+-(max - min) / 2 relative to the median, in percent."""
    return 100 * (max(values) - min(values)) / 2 / float(np.median(values))


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU while the block runs (or until this one dies)."""
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_1m")
    parser.add_argument("--target", default="cpu-1t")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grouped-model", default="resnext_1m",
                        help="model with grouped convolutions for the 'grouped' rows ('' = none)")
    parser.add_argument("--int8-task", default="digits",
                        help="task whose trained model the INT8 rows use ('' = none)")
    parser.add_argument(
        "--sequential", action="store_true", help="also measure back to back, not interleaved"
    )
    parser.add_argument("--load", type=int, default=0,
                        help="busy-loop processes running beside the measurements")
    args = parser.parse_args()
    with busy_loops(args.load):
        run(args)


def run(args: argparse.Namespace) -> None:

    target = load_target(args.target)
    dense = create_test_model(args.model).eval()
    inputs = prepare_inputs(dense.example_inputs(), target)
    arrays = [t.numpy() for t in inputs]

    rows = [(name, dense, plan, "dense") for name, plan in CONFIGS]
    if args.grouped_model:
        grouped = create_test_model(args.grouped_model).eval()
        rows += [(name, grouped, plan, "grouped dense") for name, plan in GROUPED]
    base_of = {name: base for name, _, _, base in rows}  # the dense row each row is compared to
    models, onnx_models, info = {}, {}, {}
    for name, source, plan, _ in rows:
        model = source if plan is None else apply_plan(source, plan, inputs)
        model = baked_copy(model).eval()
        macs, params = tp.utils.count_ops_and_params(model, inputs)
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        exported = export_onnx(model, inputs)
        models[name], onnx_models[name] = model, exported.onnx_bytes
        info[name] = {"macs": macs, "params": params, "nonzero": nonzero,
                      "diff": exported.max_abs_diff}

    print(f"model {args.model}: {info['dense']['params'] / 1e6:.2f} M params, "
          f"{info['dense']['macs'] / 1e6:.1f} M MACs, input {tuple(inputs[0].shape)}")
    if args.grouped_model:
        print(f"grouped rows: {args.grouped_model}, {info['grouped dense']['params'] / 1e6:.2f} M "
              f"params, {info['grouped dense']['macs'] / 1e6:.1f} M MACs, same input")
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"target {target.name}: intra_op_threads={target.intra_op_threads} "
          f"opt={target.graph_optimization_level} pin_threads={target.pin_threads} "
          f"warm-up {target.warmup_runs} runs + {target.warmup_seconds}s, "
          f">= {target.min_runs} runs and >= {target.min_seconds}s per session, "
          f"stop at CI(median) < {100 * target.target_ci:.0f}% or {target.max_runs} runs; "
          f"statistic {target.statistic}")
    print(f"{args.repeats} fresh sessions per model, interleaved in ~20 ms blocks\n")

    start = time.perf_counter()
    results = measure_interleaved(onnx_models, arrays, target, repeats=args.repeats)
    elapsed = time.perf_counter() - start

    p50 = {name: float(np.median([s.p50_ms for s in runs])) for name, runs in results.items()}
    header = (f"{'model':<17} {'params':>7} {'nonzero':>7} {'MACs':>7} {'p50 ms':>7} "
              f"{'CV':>6} {'FLOPs ratio':>11} {'speed-up':>8} {'speed-up/FLOPs':>14} "
              f"{'max|ORT-PT|':>11}")
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        row = info[name]
        flops_ratio = info[base_of[name]]["macs"] / row["macs"]
        speedup = p50[base_of[name]] / p50[name]
        cv = float(np.median([s.cv for s in runs]))
        print(f"{name:<17} {row['params'] / 1e6:>6.2f}M {row['nonzero'] / row['params']:>7.0%} "
              f"{row['macs'] / 1e6:>6.1f}M {p50[name]:>7.3f} {cv:>6.1%} {flops_ratio:>10.2f}x "
              f"{speedup:>7.2f}x {speedup / flops_ratio:>14.2f} {row['diff']:>11.1e}")

    print(f"\nrepeatability: medians of {args.repeats} fresh sessions each, interleaved "
          f"({elapsed:.0f} s)")
    for name, runs in results.items():
        medians = [s.p50_ms for s in runs]
        speedups = [a.p50_ms / b.p50_ms for a, b in zip(results[base_of[name]], runs)]
        print(f"  {name:<17} p50 ms {' '.join(f'{m:.4f}' for m in medians)}   "
              f"spread +-{spread(medians):.1f}%   runs {min(s.runs for s in runs)}-"
              f"{max(s.runs for s in runs)}   speed-up spread +-{spread(speedups):.1f}%")
    worst = max(spread([s.p50_ms for s in runs]) for runs in results.values())
    print(f"  worst spread of medians: +-{worst:.1f}% (goal +-3%)")

    print(f"\nscreening protocol (search trials) vs full protocol (fronts, apply): "
          f"{args.repeats} fresh sessions each, alternating")
    worst, busy, measured, escalated = 0.0, 0, 0, 0
    for name, onnx_model in onnx_models.items():
        medians: dict[str, list[float]] = {"screen": [], "full": []}
        seconds: dict[str, list[float]] = {"screen": [], "full": []}
        for _ in range(args.repeats):
            for label in ("screen", "full"):  # as a search's trial, then as its front
                t0 = time.perf_counter()
                stats = measure_latency(onnx_model, inputs, target, screen=label == "screen")
                seconds[label].append(time.perf_counter() - t0)
                medians[label].append(stats.p50_ms)
                busy, measured = busy + stats.busy, measured + 1
                escalated += label == "screen" and not stats.screened
        a, b = (float(np.median(medians[k])) for k in ("screen", "full"))
        worst = max(worst, abs(a / b - 1))
        print(f"  {name:<17} screen {a:.4f} ms in {np.mean(seconds['screen']):.2f} s   "
              f"full {b:.4f} ms in {np.mean(seconds['full']):.2f} s   "
              f"difference {100 * (a / b - 1):+.1f}%   screen spread "
              f"+-{spread(medians['screen']):.1f}%")
    print(f"  worst difference of medians: {100 * worst:.1f}% (goal +-5%); {busy} of {measured} "
          f"measurements flagged busy (p90 > 1.5x p50), {escalated} busy screening measurements "
          f"taken again in full; {args.load} busy-loop process(es); load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.int8_task:
        int8_rows(args.int8_task, target, args.repeats)

    if args.sequential:
        print(f"\nfor contrast, {args.repeats} fresh sessions per model back to back "
              "(not interleaved):")
        for name, onnx_model in onnx_models.items():
            medians = [measure_onnx(onnx_model, arrays, target)[0].p50_ms
                       for _ in range(args.repeats)]
            print(f"  {name:<17} p50 ms {' '.join(f'{m:.4f}' for m in medians)}   "
                  f"spread +-{spread(medians):.1f}%")


def int8_rows(task_name: str, target: Target, repeats: int) -> None:
    """fp32, static and dynamic INT8 of a trained model, dense and structured 50 %: speed-up and
    task metric side by side, both measured on the ONNX model that would ship."""
    from autoprune.finetune import finetune_
    from autoprune.quantize import CALIBRATION_BATCHES, evaluate_shipped, quantize_model
    from autoprune.task import load_task

    task = load_task(task_name)
    trained = task.build_model()
    onnx_models, metric, fp32_of = {}, {}, {}
    for label, plan in INT8_CONFIGS:
        model = trained
        if plan is not None:
            model = apply_plan(trained, plan, task.example_inputs)
            finetune_(model, task, task.finetune)
        model = baked_copy(model).eval()
        fp32 = export_onnx(model, task.example_inputs, dynamic_batch=True).onnx_bytes
        for scheme in ("fp32", "int8", "int8-dynamic"):
            name = f"{label} {scheme}"
            onnx_models[name] = fp32 if scheme == "fp32" else quantize_model(task, model, scheme)
            metric[name] = evaluate_shipped(task, model, onnx_models[name])[task.metric.name]
            fp32_of[name] = f"{label} fp32"
    arrays = [t.numpy() for t in prepare_inputs(task.example_inputs, target)]
    results = measure_interleaved(onnx_models, arrays, target, repeats=repeats)
    p50 = {name: float(np.median([s.p50_ms for s in runs])) for name, runs in results.items()}
    base = next(iter(p50))
    print(f"\nINT8 on task {task_name} ({task.description}); static int8: QDQ, per-channel "
          f"INT8 weights, UINT8 activations, calibrated on {CALIBRATION_BATCHES} training "
          f"batches; structured 50 % fine-tuned {task.finetune.steps} steps; "
          f"{task.metric.name} of each ONNX model run by ONNX Runtime; {repeats} fresh sessions "
          "per model, interleaved")
    header = (f"{'model':<28} {'size KB':>8} {'p50 ms':>7} {'vs dense fp32':>13} "
              f"{'vs own fp32':>11} {task.metric.name:>9} {'vs own fp32':>12}")
    print(header)
    print("-" * len(header))
    for name in onnx_models:
        own = fp32_of[name]
        print(f"{name:<28} {len(onnx_models[name]) / 1e3:>8.1f} {p50[name]:>7.3f} "
              f"{p50[base] / p50[name]:>12.2f}x {p50[own] / p50[name]:>10.2f}x "
              f"{metric[name]:>9.4f} {100 * (metric[name] - metric[own]):>+9.2f} pt")


if __name__ == "__main__":
    main()
