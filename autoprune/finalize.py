"""Turn a chosen plan into a shippable model: prune, fine-tune longer, export ONNX, re-measure."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from statistics import fmean
from typing import Any

from autoprune.metrics import DENSE, SPEEDUP, latency_key, latency_metrics
from autoprune.plan import PruningPlan

__all__ = ["finalize_plan"]


def finalize_plan(
    task: Any,
    plan: PruningPlan,
    output: str | Path,
    *,
    finetune_steps: int | None = None,
    targets: list[str] | None = None,
    token_file: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Apply ``plan`` to the task's model, fine-tune, export and measure; write ``output/``.

    Writes ``model.onnx`` (masks baked, quantized if the plan says so), ``plan.json`` and
    ``metrics.json`` (task metric, latency per target, params, MACs, size). Returns the metrics.
    The metric and the latency are those of ``model.onnx``: for a quantizing plan, the metric
    of the quantized model run by ONNX Runtime, with the fp32 value as ``<metric>_fp32``.
    Reconstruction and fine-tuning run on ``device`` (a resolved torch device); pruning,
    export and latency on the CPU.
    """
    from autoprune.finetune import finetune_
    from autoprune.latency import (
        SIDE_BY_SIDE_ROUNDS,
        compare_latency,
        export_onnx,
        load_target,
    )
    from autoprune.prune import bake_masks_, prune_model_
    from autoprune.quantize import evaluate_shipped, quantize_model
    from autoprune.recover import reconstruct_plan_
    from autoprune.stats import model_stats

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model = task.build_model()
    dense_stats = model_stats(model, task.example_inputs)
    calibration = task.calibration_batches(4)
    pruned = copy.deepcopy(model)
    report = prune_model_(pruned, plan, task.example_inputs, calibration=calibration,
                          loss_fn=task.loss_fn, seed=seed, augment=task.augment_fn)
    model.to(device), pruned.to(device)
    phase = time.time()
    fitted = reconstruct_plan_(task, model, pruned, report, plan.recovery, seed)
    seconds = {"reconstruct": time.time() - phase}
    settings = task.finetune.with_overrides(plan.finetune).replace(seed=seed)
    if finetune_steps is not None:
        settings = settings.replace(steps=finetune_steps)
    phase = time.time()
    finetune_(pruned, task, settings, teacher=model,
              hidden_distill=plan.recovery.hidden_distill)
    seconds["finetune"] = time.time() - phase
    model.cpu(), bake_masks_(pruned.cpu().eval())
    exported = export_onnx(pruned, task.example_inputs, dynamic_batch=True)
    shipped = None if plan.quantize == "none" else quantize_model(task, pruned, plan.quantize)
    onnx_bytes = shipped or exported.onnx_bytes
    (output / "model.onnx").write_bytes(onnx_bytes)
    plan.save(output / "plan.json")
    stats = model_stats(pruned, task.example_inputs)
    metrics: dict[str, Any] = {
        **evaluate_shipped(task, pruned, shipped), "finetune_steps": settings.steps,
        "params": stats.params, "nonzero_params": stats.nonzero_params, "macs": stats.macs,
        "size_bytes": len(onnx_bytes), DENSE + "params": dense_stats.params,
        DENSE + "macs": dense_stats.macs, "onnx_max_abs_diff": exported.max_abs_diff,
        **{f"{phase}_seconds": t for phase, t in seconds.items()},
    }
    if report.dropped:
        metrics["dropped_blocks"] = report.dropped
    if report.criteria:  # per group, the criterion that ranked it (l1 where the plan's cannot)
        metrics["criteria"] = report.criteria
    if report.fallbacks:
        metrics["criterion_fallbacks"] = report.fallbacks
    if fitted is not None and fitted.fits:
        metrics["reconstruction_error_before"] = fmean(f.error_before for f in fitted.fits)
        metrics["reconstruction_error"] = fmean(f.error_after for f in fitted.fits)
    for spec in targets or ["cpu-1t"]:  # model.onnx and the dense model, side by side
        target = load_target(spec, token_file=token_file)
        dense_row, shipped_row = compare_latency({"dense": model, "shipped": pruned},
                                                 task.example_inputs, target,
                                                 onnx_models={"shipped": onnx_bytes},
                                                 repeats=SIDE_BY_SIDE_ROUNDS)
        metrics.update(latency_metrics(target.name, shipped_row.stats))
        metrics[DENSE + latency_key(target.name)] = dense_row.stats.p50_ms
        metrics[SPEEDUP + target.name] = shipped_row.speedup
    metrics["seconds"] = time.time() - started
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
