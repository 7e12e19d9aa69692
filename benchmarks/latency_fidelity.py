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

The output goes to ``benchmarks/results/latency-fidelity-<date>.txt`` and its tables (``speedup``,
``repeatability``, ``screening``, ``int8``, with ``--sequential`` also ``sequential``) and values
to ``latency-fidelity-<date>.json`` (see ``provenance.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402

from autoprune.latency import (  # noqa: E402
    Target,
    export_onnx,
    load_target,
    measure_interleaved,
    measure_latency,
    measure_onnx,
    prepare_inputs,
)
from autoprune.plan import PruningPlan  # noqa: E402
from autoprune.prune import apply_plan, baked_copy  # noqa: E402
from autoprune.testing import create_test_model  # noqa: E402

CONFIGS = [
    ("dense", None),
    ("unstructured 50 %", PruningPlan.uniform(0.5, "unstructured")),
    ("unstructured 80 %", PruningPlan.uniform(0.8, "unstructured")),
    ("structured 25 %", PruningPlan.uniform(0.25, "structured")),
    ("structured 50 %", PruningPlan.uniform(0.5, "structured")),
    ("structured 75 %", PruningPlan.uniform(0.75, "structured")),
]
# INT8 rows (``--int8-task``): the task's trained model, dense and structured 50 %.
INT8_CONFIGS = [("dense", None), ("structured 50 %", PruningPlan.uniform(0.5, "structured"))]
# Rows of a second model with grouped 3x3 convolutions (``--grouped-model``, ResNeXt-style with
# squeeze-excite), measured in the same interleaved run against its own dense row.
GROUPED = [
    ("grouped dense", None),
    ("grouped 50 %", PruningPlan.uniform(0.5, "structured")),
    ("grouped 75 %", PruningPlan.uniform(0.75, "structured")),
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
    with provenance.recorded("latency-fidelity") as rec, busy_loops(args.load):
        run(args, rec)


def pct(x: float) -> str:
    """A spread in percent as the docs print it: ``+-1.7 %``."""
    return f"+-{x:.1f} %"


def run(args: argparse.Namespace, rec: provenance.Record) -> None:
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
    rows = []
    for name, runs in results.items():
        row = info[name]
        flops_ratio = info[base_of[name]]["macs"] / row["macs"]
        speedup = p50[base_of[name]] / p50[name]
        cv = float(np.median([s.cv for s in runs]))
        rows.append([name, f"{row['params'] / 1e6:.2f} M", f"{row['macs'] / 1e6:.1f} M",
                     f"{p50[name]:.3f}", f"{100 * cv:.1f} %", f"{flops_ratio:.2f}x",
                     f"{speedup:.2f}x", f"{speedup / flops_ratio:.2f}", f"{row['diff']:.1e}",
                     f"{100 * row['nonzero'] / row['params']:.0f} %"])
    print("speed-up against FLOPs: p50 and CV are medians over the sessions; FLOPs ratio and "
          "speed-up are against the model's dense row; nonzero: share of nonzero parameters")
    provenance.print_table(
        "speedup", ["model", "params", "MACs", "p50 ms", "CV", "FLOPs ratio", "speed-up",
                    "speed-up / FLOPs ratio", "max abs ORT-PT", "nonzero"],
        rows, right=tuple(range(1, 10)))

    print(f"repeatability: medians of {args.repeats} fresh sessions each, interleaved "
          f"({elapsed:.0f} s); spread: +-(max - min) / 2 of the medians, relative to their "
          "median; runs: timed runs per session")
    rows = []
    for name, runs in results.items():
        medians = [s.p50_ms for s in runs]
        speedups = [a.p50_ms / b.p50_ms for a, b in zip(results[base_of[name]], runs)]
        rows.append([name, " ".join(f"{m:.4f}" for m in medians), pct(spread(medians)),
                     f"{min(s.runs for s in runs)}-{max(s.runs for s in runs)}",
                     pct(spread(speedups))])
    provenance.print_table("repeatability", ["model", "medians ms", "spread", "runs",
                                             "speed-up spread"], rows, right=(1, 2, 3, 4))
    worst = max(spread([s.p50_ms for s in runs]) for runs in results.values())
    print(f"worst spread of medians: {pct(worst)} (goal +-3 %)")
    rec.value("repeatability_worst_pct", round(worst, 1))
    rec.value("interleaved_seconds", round(elapsed))
    rec.value("repeats", args.repeats)

    print(f"\nscreening protocol (search trials) vs full protocol (fronts, apply): "
          f"{args.repeats} fresh sessions each, alternating; screen / full ms: median p50, "
          "screen / full s: mean wall time of one measurement")
    worst, busy, measured, escalated = 0.0, 0, 0, 0
    rows = []
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
        rows.append([name, f"{a:.4f}", f"{b:.4f}", f"{100 * (a / b - 1):+.1f} %",
                     f"{np.mean(seconds['screen']):.2f}", f"{np.mean(seconds['full']):.2f}",
                     pct(spread(medians["screen"]))])
    provenance.print_table("screening", ["model", "screen ms", "full ms", "difference",
                                         "screen s", "full s", "screen spread"],
                           rows, right=tuple(range(1, 7)))
    print(f"worst difference of medians: {100 * worst:.1f} % (goal +-5 %); {busy} of {measured} "
          f"measurements flagged busy (p90 > 1.5x p50), {escalated} busy screening measurements "
          f"taken again in full; {args.load} busy-loop process(es); load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rec.value("screening_worst_pct", round(100 * worst, 1))
    rec.value("busy_measurements", busy)
    rec.value("measurements", measured)
    rec.value("rerun_in_full", escalated)
    rec.value("busy_loops", args.load)

    if args.int8_task:
        int8_rows(args.int8_task, target, args.repeats)

    if args.sequential:
        print(f"\nfor contrast, {args.repeats} fresh sessions per model back to back "
              "(not interleaved):")
        rows = []
        for name, onnx_model in onnx_models.items():
            medians = [measure_onnx(onnx_model, arrays, target)[0].p50_ms
                       for _ in range(args.repeats)]
            rows.append([name, " ".join(f"{m:.4f}" for m in medians), pct(spread(medians))])
        provenance.print_table("sequential", ["model", "medians ms", "spread"], rows,
                               right=(1, 2))


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
    rows = []
    for name in onnx_models:
        own = fp32_of[name]
        rows.append([name, f"{len(onnx_models[name]) / 1e3:.1f}", f"{p50[name]:.3f}",
                     f"{p50[base] / p50[name]:.2f}x", f"{p50[own] / p50[name]:.2f}x",
                     f"{metric[name]:.4f}", f"{100 * (metric[name] - metric[own]):+.2f} pt"])
    provenance.print_table("int8", ["model", "size KB", "p50 ms", "vs dense fp32",
                                    "vs own fp32", task.metric.name,
                                    f"{task.metric.name} vs own fp32"],
                           rows, right=tuple(range(1, 7)))


if __name__ == "__main__":
    main()
