"""What pruning heads and FFN channels of a `transformers` encoder buys on ONNX Runtime.

Loads ``examples/hf_encoder_task.py`` (``--family bert|distilbert|vit``, all-MiniLM-L6-v2's
shape: 6 layers, 12 heads of 32, FFN 1536; random weights, which latency does not depend on;
nothing is downloaded) and prints, for the dense model and uniform structured plans on the
head groups only, the FFN groups only and both: parameters, MACs (Torch-Pruning's counter),
measured p50 and the speed-up over dense, all measured interleaved in one run
(``autoprune.latency.compare_latency``).

Run: ``.venv/bin/python benchmarks/hf_encoder_latency.py [--family bert] [--seq-len 128]
[--target cpu-1t] [--repeats 3]``. Output: ``benchmarks/results/hf-encoder-latency-<date>.txt``
and ``.json`` (``provenance.recorded``): table ``latency``, one row per model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from autoprune.latency import compare_latency, load_target
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import apply_plan, inspect_model
from autoprune.task import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_encoder_task.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="bert", choices=["bert", "distilbert", "vit"])
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per text input")
    parser.add_argument("--target", default="cpu-1t")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparsities", default="0.25,0.5,0.75")
    args = parser.parse_args()
    with provenance.recorded("hf-encoder-latency"):
        run(args)


def run(args: argparse.Namespace) -> None:
    task = load_task(f"{EXAMPLE}:make_task", family=args.family, n_train=1, n_val=1,
                     seq_len=args.seq_len)
    dense = task.build_model()
    inputs = task.example_inputs
    info = inspect_model(dense, inputs)
    heads = [g.name for g in info.groups if g.num_heads]
    ffn = [g.name for g in info.groups if not g.num_heads]
    models = {"dense": dense}
    for s in (float(v) for v in args.sparsities.split(",")):
        for label, names in (("heads", heads), ("ffn", ffn), ("heads+ffn", heads + ffn)):
            plan = PruningPlan(rules={n: LayerRule("structured", s) for n in names})
            models[f"{label} {s:.0%}"] = apply_plan(dense, plan, inputs)

    print(f"{task.name}: {task.description}; input {[tuple(t.shape) for t in inputs]}")
    print(f"{len(heads)} head groups ({info.groups[0].describe_units()} each), {len(ffn)} FFN "
          f"groups; hidden width left alone")
    target = load_target(args.target)
    start = time.perf_counter()
    rows = compare_latency(models, inputs, target, repeats=args.repeats)
    print(f"target {target.name}, {args.repeats} fresh sessions per model, interleaved "
          f"({time.perf_counter() - start:.0f} s)")
    dense_macs = rows[0].macs
    provenance.print_table(
        "latency", ["model", "params M", "nonzero", "MACs M", "p50 ms", "p90 ms", "CV", "runs",
                    f"speed-up ({target.statistic})", "speed-up / FLOPs"],
        [[r.name, f"{r.params / 1e6:.2f}", f"{100 * r.nonzero_fraction:.0f}%",
          f"{r.macs / 1e6:.1f}", f"{r.stats.p50_ms:.3f}", f"{r.stats.p90_ms:.3f}",
          f"{100 * r.stats.cv:.1f}%", r.stats.runs, f"{r.speedup:.2f}x",
          f"{r.speedup / (dense_macs / r.macs):.2f}"] for r in rows],
        right=tuple(range(1, 10)))


if __name__ == "__main__":
    main()
