"""Apply a saved plan file to a model, check what changed, and export it to ONNX.

Run: python examples/apply_saved_plan.py [PLAN.json|PLAN.yaml]
Without an argument it writes and applies a small mixed plan for the synthetic task.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import autoprune
from autoprune import LayerRule, PruningPlan
from autoprune.latency import export_onnx


def main(plan_path: str | None = None) -> None:
    task = autoprune.load_task("autoprune.testing.tasks:synthetic_task")
    model = task.build_model()
    if plan_path is None:
        plan_path = str(Path(tempfile.mkdtemp()) / "plan.yaml")
        PruningPlan(
            default=LayerRule("skip"),
            rules={"re:stages\\.2\\..*": LayerRule("structured", 0.5, "l2"),
                   "stages.1.conv1": LayerRule("unstructured", 0.7, "l1")},
        ).save(plan_path)
    plan = PruningPlan.load(plan_path)
    pruned = autoprune.apply_plan(model, plan, task.example_inputs)
    print(autoprune.inspect_model(pruned, task.example_inputs).table())
    print("accuracy before fine-tuning:", task.evaluate(pruned))
    onnx_path = Path(plan_path).with_suffix(".onnx")
    result = export_onnx(pruned, task.example_inputs, onnx_path)  # masks are baked first
    print(f"wrote {onnx_path} (ONNX Runtime vs PyTorch max diff {result.max_abs_diff:.2e})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
