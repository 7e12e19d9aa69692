"""Latency on a deployment target: ONNX export, ONNX Runtime timing, target profiles, cache,
and a remote measurement server/client.

Latency is measured, never assumed: a pruned model is exported to ONNX (output checked against
PyTorch), timed in a fresh ONNX Runtime session configured by a :class:`Target`, and cached by
architecture signature (latency does not depend on weight values).

``onnxruntime`` is imported lazily, inside the functions that need it.

Example:
    >>> from autoprune.latency import LatencyCache, load_target, measure_latency
    >>> from autoprune.testing import create_test_model
    >>> model = create_test_model("resnet_tiny")
    >>> stats = measure_latency(model, model.example_inputs(), load_target("cpu-1t"),
    ...                         cache=LatencyCache("runs/latency_cache.json"))  # doctest: +SKIP
    >>> stats.value("p50")  # doctest: +SKIP
    0.071
"""

from __future__ import annotations

from autoprune.latency._cache import LatencyCache
from autoprune.latency._client import RemoteTarget, measure_remote
from autoprune.latency._compare import (
    SIDE_BY_SIDE_ROUNDS,
    LatencyRow,
    compare_latency,
    format_latency_table,
    measure_interleaved,
)
from autoprune.latency._export import ExportResult, export_onnx, onnx_digest
from autoprune.latency._measure import (
    create_session,
    measure_latency,
    measure_onnx,
    prepare_inputs,
    time_session,
)
from autoprune.latency._server import LatencyServer, serve, serve_latency
from autoprune.latency._stats import LatencyStats, median_ci, median_ci_rel, summarize
from autoprune.latency._target import (
    BUILTIN_TARGETS,
    TOKEN_ENV_VAR,
    Target,
    list_targets,
    load_target,
    resolve_token,
)

__all__ = [
    # export
    "ExportResult",
    "export_onnx",
    "onnx_digest",
    # targets
    "Target",
    "BUILTIN_TARGETS",
    "TOKEN_ENV_VAR",
    "load_target",
    "list_targets",
    "resolve_token",
    # measurement
    "LatencyStats",
    "measure_latency",
    "measure_onnx",
    "create_session",
    "time_session",
    "prepare_inputs",
    "summarize",
    "median_ci",
    "median_ci_rel",
    "LatencyCache",
    # comparison (CLI `bench`)
    "LatencyRow",
    "SIDE_BY_SIDE_ROUNDS",
    "compare_latency",
    "measure_interleaved",
    "format_latency_table",
    # remote
    "LatencyServer",
    "serve",
    "serve_latency",
    "RemoteTarget",
    "measure_remote",
]
