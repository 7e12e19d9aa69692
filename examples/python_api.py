"""The Python API end to end on the quick synthetic task: search, pick a plan, apply, ship.

Run: python examples/python_api.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import autoprune

TASK = "autoprune.testing.tasks:synthetic_task"


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="autoprune-example-"))
    result = autoprune.search(TASK, "per_layer_structured", ["params<12k"], trials=8,
                              finetune_steps=12, output=out / "run", progress=False)
    print(result.summary)
    best = result.front[0]  # best accuracy among the plans that meet the budget
    print(f"chosen: trial {best.number}, accuracy {best.metrics['accuracy']:.3f}, "
          f"{best.metrics['params']:.0f} params")

    task = autoprune.load_task(TASK)
    model = task.build_model()
    pruned = autoprune.apply_plan(model, best.plan, task.example_inputs)
    print("before:", autoprune.model_stats(model, task.example_inputs))
    print("after: ", autoprune.model_stats(pruned, task.example_inputs))

    metrics = autoprune.finalize_plan(task, best.plan, out / "ship", finetune_steps=24)
    print(f"shipped {out / 'ship' / 'model.onnx'}: accuracy {metrics['accuracy']:.3f}, "
          f"{metrics['speedup@cpu-1t']:.2f}x faster than dense on cpu-1t")


if __name__ == "__main__":
    main()
