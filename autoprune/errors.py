"""Exceptions. Usage errors (bad budgets, plans, task files, options) exit the CLI with code 2."""

from __future__ import annotations

__all__ = [
    "unknown_fields",
    "AutopruneError",
    "UsageError",
    "PlanError",
    "BudgetError",
    "TaskError",
    "SearchSpaceError",
    "TargetError",
    "ExportError",
    "AnalysisError",
    "TrialFailure",
    "NonFiniteLossError",
    "MeasurementWarning",
]


class AutopruneError(Exception):
    """Base class of every error autoprune raises on purpose."""


class UsageError(AutopruneError):
    """The user gave something malformed; the message says what and how to fix it."""


class PlanError(UsageError):
    """A pruning plan is malformed, or does not fit the model it is applied to."""


class BudgetError(UsageError):
    """A budget string such as ``latency<10ms`` could not be parsed or names an unknown target."""


class TaskError(UsageError):
    """A task file or task factory is missing, fails to import or returns the wrong thing."""


class SearchSpaceError(UsageError):
    """A search-space YAML file is malformed."""


class TargetError(UsageError):
    """A deployment target profile is malformed or unknown."""


class ExportError(AutopruneError):
    """A model could not be exported to ONNX; the message names the failing op or module."""


class AnalysisError(AutopruneError):
    """Dependency analysis of a model could not finish; the message names the module."""


class TrialFailure(AutopruneError):
    """A trial could not finish; ``reason`` is recorded with the trial and the search goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # short human-readable cause, stored in trials.csv


class NonFiniteLossError(TrialFailure):
    """Fine-tuning produced a NaN or infinite loss."""


class MeasurementWarning(UserWarning):
    """A trial ran, but not as configured (timing left unpinned, early stopping lost): the
    trial records it (``warnings`` in trials.jsonl) and the summary lists it."""


def unknown_fields(data: dict, allowed: set[str]) -> str:
    """``"unknown field(s) a, b; allowed: x, y"`` for keys of ``data`` not in ``allowed``,
    or ``""``: the tail of the error a file's reader raises, with its own field path."""
    unknown = sorted(set(data) - allowed)
    if not unknown:
        return ""
    return f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
