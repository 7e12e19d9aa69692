"""Side-by-side latency of several models, measured interleaved in fresh sessions."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autoprune.latency._export import DEFAULT_OPSET, export_onnx
from autoprune.latency._measure import _feeds, create_session, prepare_inputs
from autoprune.latency._stats import LatencyStats, median_ci_rel, summarize
from autoprune.latency._target import Target, load_target
from autoprune.prune import baked_copy

__all__ = ["LatencyRow", "SIDE_BY_SIDE_ROUNDS", "compare_latency", "format_latency_table",
           "measure_interleaved"]


def measure_interleaved(
    onnx_models: Mapping[str, bytes],
    arrays: Sequence[np.ndarray],
    target: Target,
    *,
    repeats: int = 1,
    block_seconds: float = 0.02,
) -> dict[str, list[LatencyStats]]:
    """Measure several ONNX models ``repeats`` times each, in fresh sessions, interleaved.

    One session is created per (model, repeat). Timing then cycles through all sessions in
    blocks of about ``block_seconds``: every session sees the same background load, so
    comparisons (and repeated medians of one model) are not skewed by a burst of load that
    hits one of them. The first run of each block re-warms caches and is not recorded.

    Each session is timed until it has ``target.min_runs`` runs and ``target.min_seconds`` of
    timed runs and the relative CI of its median is below ``target.target_ci``, or it hits
    ``target.max_runs``; the whole call stops after ``target.max_seconds`` per session.

    Returns:
        For every model name, one :class:`LatencyStats` per repeat (in order).
    """
    if target.is_remote:
        raise ValueError("measure_interleaved measures locally; use compare_latency")
    sessions = []  # (name, session, binding, samples)
    for _ in range(repeats):
        for name, onnx_model in onnx_models.items():
            session = create_session(onnx_model, target)
            binding = session.io_binding()
            for input_name, array in _feeds(session, arrays).items():
                binding.bind_cpu_input(input_name, np.ascontiguousarray(array))
            for out in session.get_outputs():
                binding.bind_output(out.name)
            session.run_with_iobinding(binding)
            for out, value in zip(session.get_outputs(), binding.get_outputs()):
                binding.bind_ortvalue_output(out.name, value)
            sessions.append((name, session, binding, []))

    clock = time.perf_counter_ns
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        block_runs = []
        for _, session, binding, _ in sessions:  # warm-up; estimates each block's size
            start = time.perf_counter()
            done = 0
            cap = max(target.warmup_seconds, target.max_seconds)
            while done < target.warmup_runs or time.perf_counter() - start < target.warmup_seconds:
                session.run_with_iobinding(binding)
                done += 1
                if time.perf_counter() - start > cap:
                    break
            per_run = (time.perf_counter() - start) / done
            block_runs.append(max(2, math.ceil(block_seconds / per_run)))

        deadline = time.perf_counter() + target.max_seconds * len(sessions)
        active = list(range(len(sessions)))
        while active and time.perf_counter() < deadline:
            for i in active:
                _, session, binding, samples = sessions[i]
                run = session.run_with_iobinding
                run(binding)  # re-warm after the other sessions ran
                for _ in range(block_runs[i]):
                    t0 = clock()
                    run(binding)
                    samples.append((clock() - t0) / 1e6)
            active = [i for i in active if not _done(sessions[i][3], target)]
    finally:
        if gc_enabled:
            gc.enable()

    result: dict[str, list[LatencyStats]] = {name: [] for name in onnx_models}
    for name, _, _, samples in sessions:
        result[name].append(summarize(samples))
    return result


def _done(samples: list[float], target: Target) -> bool:
    n = len(samples)
    if n >= target.max_runs:
        return True
    if n < target.min_runs or sum(samples) / 1e3 < target.min_seconds:
        return False
    return median_ci_rel(samples) < target.target_ci


# Interleaved rounds of the final side-by-side timing, pooled by median. On the pretrained
# MiniLM one round put the recommended plan at 1.68x, five rounds after the run at 1.56-1.58x
# (benchmarks/results/recovery-default-20261207-1739.txt and -1802.txt): the search's verdict on a
# relative budget and apply's speed-up are made on this ratio.
SIDE_BY_SIDE_ROUNDS = 3


@dataclass(frozen=True)
class LatencyRow:
    """One model's line in a latency comparison.

    Example:
        >>> row = LatencyRow("dense", 1_000_000, 1.0, 60e6, summarize([2.0, 2.1, 2.0]), 1.0)
        >>> row.stats.p50_ms, row.speedup
        (2.0, 1.0)
    """

    name: str  # label given by the caller
    params: int  # parameter count (masks baked: zeros still count)
    nonzero_fraction: float  # fraction of parameters that are not zero
    macs: float  # multiply-accumulates per inference (dense count; zeros are computed too)
    stats: LatencyStats  # measured latency on the target
    speedup: float  # first row's statistic / this row's statistic


def compare_latency(
    models: Mapping[str, nn.Module],
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    target: Target | str = "cpu-1t",
    *,
    repeats: int = 1,
    onnx_models: Mapping[str, bytes] | None = None,
) -> list[LatencyRow]:
    """Latency of several models (e.g. dense and pruned) on one target, side by side.

    Local targets are measured interleaved in fresh sessions (:func:`measure_interleaved`);
    remote targets one after the other, ``repeats`` rounds, pooled by median. Speed-ups are
    relative to the first model, on the target's statistic. ``onnx_models`` names the ONNX
    model to time instead of a model's own export (e.g. the quantized model a plan ships);
    params and MACs are still counted on the PyTorch model.

    Example:
        >>> rows = compare_latency({"dense": dense, "pruned": pruned}, inputs)  # doctest: +SKIP
        >>> print(format_latency_table(rows))  # doctest: +SKIP
    """
    import torch_pruning as tp

    if not models:
        raise ValueError("compare_latency needs at least one model")
    target = load_target(target) if not isinstance(target, Target) else target
    inputs = prepare_inputs(example_inputs, target)
    arrays = [t.numpy() for t in inputs]
    baked = {name: baked_copy(m) for name, m in models.items()}
    given = onnx_models or {}
    onnx_models = {
        name: given.get(name) or export_onnx(m, inputs, opset=DEFAULT_OPSET,
                                             dynamic_batch=True).onnx_bytes
        for name, m in baked.items()  # exported as apply ships them
    }
    if target.is_remote:
        from autoprune.latency._client import measure_remote

        per_model: dict[str, list[LatencyStats]] = {name: [] for name in onnx_models}
        for _ in range(repeats):
            for name, onnx_model in onnx_models.items():
                per_model[name].append(measure_remote(onnx_model, arrays, target))
    else:
        per_model = measure_interleaved(onnx_models, arrays, target, repeats=repeats)

    rows: list[LatencyRow] = []
    for name, model in baked.items():
        stats = _pool(per_model[name])
        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        was_training = model.training
        model.eval()
        try:
            macs, _ = tp.utils.count_ops_and_params(model, inputs)
        finally:
            model.train(was_training)
        reference = rows[0].stats.value(target.statistic) if rows else None
        value = stats.value(target.statistic)
        rows.append(
            LatencyRow(
                name=name,
                params=params,
                nonzero_fraction=nonzero / params if params else 1.0,
                macs=float(macs),
                stats=stats,
                speedup=(reference / value) if reference is not None and value > 0 else 1.0,
            )
        )
    return rows


def _pool(stats: list[LatencyStats]) -> LatencyStats:
    """One summary of repeated measurements: medians of the statistics, total runs."""
    if len(stats) == 1:
        return stats[0]
    med = {k: float(np.median([getattr(s, k) for s in stats])) for k in stats[0].to_dict()}
    med["runs"] = sum(s.runs for s in stats)
    return LatencyStats(**med)


def format_latency_table(rows: Sequence[LatencyRow], *, statistic: str = "p50") -> str:
    """A plain-text table: name, params, nonzero, MACs, p50, p90, CV, runs, speed-up.

    ``statistic`` names the statistic the speed-up column was computed on.
    """
    header = (
        "model",
        "params",
        "nonzero",
        "MACs",
        "p50 ms",
        "p90 ms",
        "CV",
        "runs",
        f"speed-up ({statistic})",
    )
    lines = [
        (
            r.name,
            _si(r.params),
            f"{100 * r.nonzero_fraction:.0f}%",
            _si(r.macs),
            f"{r.stats.p50_ms:.3f}",
            f"{r.stats.p90_ms:.3f}",
            f"{100 * r.stats.cv:.1f}%",
            str(r.stats.runs),
            f"{r.speedup:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"
