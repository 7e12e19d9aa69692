"""Timing ONNX Runtime sessions on a target, with a stopping rule on the median's CI."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from autoprune.errors import MeasurementWarning, TargetError
from autoprune.latency import _client
from autoprune.latency._export import DEFAULT_OPSET, export_onnx, onnx_digest
from autoprune.latency._stats import (
    LatencyStats,
    median_ci,
    median_ci_rel,
    summarize,
)
from autoprune.latency._target import Target, load_target
from autoprune.prune import baked_copy

if TYPE_CHECKING:
    import onnxruntime as ort

    from autoprune.latency._cache import LatencyCache

__all__ = [
    "measure_latency",
    "measure_onnx",
    "prepare_inputs",
    "create_session",
    "time_session",
]

_BLOCKS = 5  # consecutive blocks of timed runs whose medians must agree (see _stop)
# Screened and full medians agree within this (benchmarks/latency_fidelity.py); a screened
# value closer than this to the budget it decides is measured again with the full protocol.
SCREENING_TOLERANCE = 0.05


def prepare_inputs(
    example_inputs: Sequence[torch.Tensor | np.ndarray] | torch.Tensor, target: Target
) -> tuple[torch.Tensor, ...]:
    """The inputs a target measures with: explicit ``input_shapes``, else the example inputs
    with dim 0 set to ``batch_size``. Values are random (latency does not depend on them)."""
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    tensors = tuple(
        torch.as_tensor(t).detach().cpu() if not isinstance(t, torch.Tensor) else t.detach()
        for t in example_inputs
    )
    if target.input_shapes is not None:
        if len(target.input_shapes) != len(tensors):
            raise TargetError(
                f"target {target.name!r} gives {len(target.input_shapes)} input shape(s) but "
                f"the model takes {len(tensors)} input(s)"
            )
        shapes = [tuple(s) for s in target.input_shapes]
    elif target.batch_size is not None:
        shapes = [(target.batch_size, *t.shape[1:]) if t.dim() else () for t in tensors]
    else:
        return tensors
    out = []
    generator = torch.Generator().manual_seed(0)
    for t, shape in zip(tensors, shapes):
        if tuple(t.shape) == shape:
            out.append(t)
        elif t.is_floating_point():
            out.append(torch.randn(shape, generator=generator, dtype=t.dtype))
        else:  # ids, masks: zeros are valid indices
            out.append(torch.zeros(shape, dtype=t.dtype))
    return tuple(out)


_OPT_LEVEL_NAMES = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def create_session(onnx_model: bytes, target: Target) -> ort.InferenceSession:
    """A fresh ONNX Runtime session configured as ``target`` says."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in target.providers if p not in available]
    if missing:
        raise TargetError(
            f"target {target.name!r} needs execution provider(s) {', '.join(missing)}, which "
            f"this onnxruntime does not have (available: {', '.join(available)})"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = target.intra_op_threads
    options.inter_op_num_threads = target.inter_op_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_SEQUENTIAL
        if target.inter_op_threads <= 1
        else ort.ExecutionMode.ORT_PARALLEL
    )
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _OPT_LEVEL_NAMES[target.graph_optimization_level]
    )
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_model, options, providers=list(target.providers))


def _feeds(
    session: ort.InferenceSession, arrays: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    return input_feeds([i.name for i in session.get_inputs()], arrays)


def input_feeds(graph_inputs: Sequence[str], arrays: Sequence[np.ndarray]
                ) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds: the model's positional input arrays by graph input name."""
    named = {f"input_{i}": a for i, a in enumerate(arrays)}
    if all(n in named for n in graph_inputs):  # our own exports (unused inputs dropped)
        return {n: named[n] for n in graph_inputs}
    if len(graph_inputs) != len(arrays):
        raise TargetError(
            f"the ONNX model has {len(graph_inputs)} input(s) ({', '.join(graph_inputs)}) but "
            f"{len(arrays)} input array(s) were given"
        )
    return dict(zip(graph_inputs, arrays))


_PIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _pinned(target: Target) -> Iterator[None]:
    """Pin the calling thread to one core while timing a single-threaded target.

    A fixed core keeps caches warm and stops the scheduler from migrating the thread between
    runs. The last allowed core is used (core 0 takes most interrupts).
    """
    can_pin = (
        target.pin_threads
        and target.intra_op_threads == 1
        and hasattr(os, "sched_setaffinity")
    )
    if not can_pin:
        yield
        return
    previous = os.sched_getaffinity(0)
    core = max(previous)
    try:
        os.sched_setaffinity(0, {core})
    except OSError as e:  # not permitted here (a container's cpuset): time unpinned, say so
        warnings.warn(MeasurementWarning(
            f"timing ran unpinned: pinning to core {core} was refused ({e.strerror}); set "
            f"pin_threads: false in the target profile where pinning is not allowed"),
            stacklevel=2)
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def time_session(
    session: ort.InferenceSession,
    arrays: Sequence[np.ndarray],
    target: Target,
    limit_ms: float | None = None,
) -> list[float]:
    """Warm up, then time runs (ms) until the median's relative CI < ``target.target_ci``.

    Stops early at ``max_runs`` or after ``max_seconds`` (but never before ``min_runs``).
    The runs are also split in 5 consecutive blocks whose medians must agree within twice the
    CI wanted: load that comes and goes while timing keeps it going, so the timing lasts as long
    as the observed spread needs, on a quiet machine as on a busy one.
    ``limit_ms`` is a latency budget the measurement must decide: once ``min_runs`` and
    ``min_seconds`` are done, timing stops as soon as the median's CI lies wholly above it
    (more runs would not change the verdict), and while the CI still holds it, timing goes on
    until the CI is three times narrower than ``target_ci`` (+-1 % for the screening protocol
    of the built-in targets, the precision of their full protocol).
    Inputs and outputs are bound once (IOBinding) so Python overhead stays out of the timings.
    """
    feeds = _feeds(session, arrays)
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    for out in session.get_outputs():
        binding.bind_output(out.name)
    session.run_with_iobinding(binding)  # first run allocates outputs; reuse them from now on
    for out, value in zip(session.get_outputs(), binding.get_outputs()):
        binding.bind_ortvalue_output(out.name, value)
    run = session.run_with_iobinding
    clock = time.perf_counter_ns

    samples: list[float] = []
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        with _pinned(target):
            warm_start = time.perf_counter()
            warm_end = warm_start + target.warmup_seconds
            warm_cap = warm_start + max(target.warmup_seconds, target.max_seconds)
            done = 0
            while done < target.warmup_runs or time.perf_counter() < warm_end:
                run(binding)
                done += 1
                if time.perf_counter() > warm_cap:  # very slow model: warm-up is capped too
                    break
            start = time.perf_counter()
            deadline = start + target.max_seconds
            min_end = start + target.min_seconds
            while True:
                t0 = clock()
                run(binding)
                samples.append((clock() - t0) / 1e6)
                n = len(samples)
                if n >= target.max_runs:
                    break
                if n < target.min_runs:
                    continue
                now = time.perf_counter()
                if now > deadline:
                    break
                if now >= min_end and n % 5 == 0 and _stop(samples, target, limit_ms):
                    break
    finally:
        if gc_enabled:
            gc.enable()
    return samples


def _stop(samples: list[float], target: Target, limit_ms: float | None) -> bool:
    """The stopping rule of :func:`time_session`, checked every 5 runs once ``min_runs`` and
    ``min_seconds`` are done (a verdict on a budget needs as much timing as a value)."""
    low, high = median_ci(samples)
    if limit_ms is not None and low > limit_ms:
        return True
    wanted = target.target_ci
    if limit_ms is not None and low <= limit_ms <= high:
        wanted /= 3
    return median_ci_rel(samples) < wanted and _block_spread(samples) < 2 * wanted


def _block_spread(samples: list[float]) -> float:
    """Half the range of the medians of ``_BLOCKS`` consecutive blocks of runs, relative to the
    median of all: how much the machine's load changed while timing. The median's CI treats
    runs as independent; on a shared machine, runs close in time are slowed down together."""
    size = len(samples) // _BLOCKS
    if size < 2:  # too few runs to tell: the median's CI decides alone
        return 0.0
    medians = [float(np.median(samples[i * size:(i + 1) * size])) for i in range(_BLOCKS)]
    return (max(medians) - min(medians)) / 2 / float(np.median(samples))


def measure_onnx(
    onnx_model: bytes,
    arrays: Sequence[np.ndarray],
    target: Target,
    limit_ms: float | None = None,
) -> tuple[LatencyStats, list[float]]:
    """Measure an ONNX model locally in a fresh session: the stats and the raw samples (ms)."""
    session = create_session(onnx_model, target)
    samples = time_session(session, arrays, target, limit_ms)
    del session
    return summarize(samples), samples


def _onnx_bytes(model: bytes | str | Path | Any) -> bytes:
    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise TargetError(f"ONNX model file {str(path)!r} does not exist")
        return path.read_bytes()
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        return model.SerializeToString()
    raise TypeError(
        f"measure_latency takes an nn.Module, ONNX bytes, an .onnx path or an onnx.ModelProto, "
        f"got {type(model).__name__}"
    )


def input_shapes(inputs: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in t.shape) for t in inputs)


def measure_latency(
    model_or_onnx: nn.Module | bytes | str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    target: Target | str = "cpu-1t",
    cache: LatencyCache | None = None,
    *,
    screen: bool = False,
    limit_ms: float | None = None,
) -> LatencyStats:
    """Measure the latency of a (pruned) model on a target.

    A PyTorch model is exported to ONNX (masks baked, output checked against PyTorch) and
    timed in a fresh ONNX Runtime session, locally or on the target's remote server. With a
    ``cache``, models with the same architecture signature (same pruned shapes, any weights)
    on the same target and input shapes are measured once.

    Args:
        model_or_onnx: an ``nn.Module``, or an ONNX model (bytes, ``.onnx`` path, ModelProto).
        example_inputs: the tensors the model is called with (shapes are adapted to the
            target's ``batch_size`` / ``input_shapes``).
        target: a :class:`Target` or a spec for :func:`load_target`.
        cache: optional :class:`LatencyCache`.
        screen: time with the target's quick screening protocol (:meth:`Target.screening`)
            instead of the full one; a cached full measurement is still preferred.
        limit_ms: a latency budget (ms) the measurement must decide (see
            :func:`time_session`); the result counts as a screening measurement, unless its
            median lands within ``SCREENING_TOLERANCE`` (5 %) of the budget: then the full
            protocol measures again and decides. A busy screening measurement is measured
            again with the full protocol too.

    Returns:
        :class:`LatencyStats` (``cached=True`` when it came from the cache, ``screened=True``
        when it is a screening measurement).

    Raises:
        ExportError: the model does not export, or ORT disagrees with PyTorch.
        TargetError: bad target, or the remote server refused the request.
    """
    target = load_target(target) if not isinstance(target, Target) else target
    screen = screen or limit_ms is not None
    inputs = prepare_inputs(example_inputs, target)
    shapes = input_shapes(inputs)
    if isinstance(model_or_onnx, nn.Module):
        model = baked_copy(model_or_onnx)
        from autoprune.fingerprint import signature_digest

        arch = signature_digest(model)
        onnx_model = None
    else:
        onnx_model = _onnx_bytes(model_or_onnx)
        arch = "onnx:" + onnx_digest(onnx_model)

    if cache is not None:
        full_key = cache.key(arch, target, shapes)
        screen_key = cache.key(arch, target, shapes, screened=True, limit_ms=limit_ms)
        hit = cache.get(full_key, screen_key) if screen else cache.get(full_key)
        if hit is not None:
            return hit

    if onnx_model is None:  # exported as apply ships it (symbolic batch and sequence)
        onnx_model = export_onnx(model, inputs, opset=DEFAULT_OPSET,
                                 dynamic_batch=True).onnx_bytes
    arrays = [t.numpy() for t in inputs]
    protocol = target.screening() if screen else target
    stats = _measure_onnx_on_target(onnx_model, arrays, protocol, limit_ms)
    if screen and _needs_full(stats, limit_ms):
        screen = False
        stats = _measure_onnx_on_target(onnx_model, arrays, target)
    stats = replace(stats, screened=screen)
    if cache is not None:
        cache.put(screen_key if screen else full_key, stats)
    return stats


def _needs_full(stats: LatencyStats, limit_ms: float | None) -> bool:
    """A screening value the full protocol must decide: one within ``SCREENING_TOLERANCE`` of
    its budget, or one other work on the machine spread out (``LatencyStats.busy``; the short
    screening window may have caught a quiet or a busy moment), unless even its fastest run
    breaks the budget."""
    if limit_ms is None:
        return stats.busy
    if abs(stats.p50_ms / limit_ms - 1) < SCREENING_TOLERANCE:
        return True
    return stats.busy and stats.min_ms <= limit_ms


def _measure_onnx_on_target(
    onnx_model: bytes,
    arrays: Sequence[np.ndarray],
    target: Target,
    limit_ms: float | None = None,
) -> LatencyStats:
    if target.is_remote:
        return _client.measure_remote(onnx_model, arrays, target, limit_ms)
    return measure_onnx(onnx_model, arrays, target, limit_ms)[0]
