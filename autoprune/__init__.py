"""autoprune: search pruning plans for PyTorch models against measured ONNX Runtime latency.

Example:
    >>> import autoprune
    >>> result = autoprune.search("digits", "per_layer_structured", ["latency<1.5ms"],
    ...                           trials=20, output="runs/demo")  # doctest: +SKIP
    >>> plan = result.front[0].plan  # doctest: +SKIP
    >>> pruned = autoprune.apply_plan(model, plan, example_inputs)  # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from autoprune.budget import Budget, parse_budget, parse_budgets
from autoprune.errors import AutopruneError, UsageError
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import apply_plan, bake_masks_, inspect_model
from autoprune.stats import model_stats
from autoprune.task import Metric, Task, accuracy, load_task

try:
    __version__ = version("autoprune")  # the installed distribution's (pyproject.toml)
except PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0+unknown"

__all__ = [
    "AutopruneError",
    "Budget",
    "LayerRule",
    "Metric",
    "PruningPlan",
    "Task",
    "UsageError",
    "accuracy",
    "apply_plan",
    "bake_masks_",
    "finalize_plan",
    "inspect_model",
    "load_task",
    "measure_latency",
    "model_stats",
    "parse_budget",
    "parse_budgets",
    "run_trial",
    "search",
]


def __getattr__(name: str) -> Any:
    # Optuna, ONNX Runtime and Ray load only when a search or a measurement needs them.
    if name == "search":  # the package autoprune.search is callable: search(...)
        import autoprune.search

        return autoprune.search
    if name == "measure_latency":
        from autoprune.latency import measure_latency

        return measure_latency
    if name == "run_trial":
        from autoprune.trial import run_trial

        return run_trial
    if name == "finalize_plan":
        from autoprune.finalize import finalize_plan

        return finalize_plan
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
