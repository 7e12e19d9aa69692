"""The registry of built-in tasks: ``@register_task("digits")`` on a task factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from autoprune.errors import TaskError
from autoprune.task._contract import Task

__all__ = ["register_task", "get_task", "list_tasks"]

_TASKS: dict[str, Callable[..., Any]] = {}


def register_task(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a task factory (keyword options -> Task) under ``name``.

    Example:
        >>> @register_task("my_digits")  # doctest: +SKIP
        ... def make_task(epochs: int = 10) -> Task: ...
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _TASKS and _TASKS[name] is not fn:
            raise ValueError(f"task {name!r} is already registered by {_TASKS[name]!r}")
        _TASKS[name] = fn
        return fn

    return decorate


def get_task(name: str, **overrides: Any) -> Any:
    """Build the built-in task ``name``; ``overrides`` are its factory's keyword options.

    Example:
        >>> task = get_task("digits", epochs=2)  # doctest: +SKIP
    """
    if name not in _TASKS:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(list_tasks())}")
    fn = _TASKS[name]
    try:
        inspect.signature(fn).bind(**overrides)
    except TypeError:
        options = ", ".join(p for p in inspect.signature(fn).parameters) or "none"
        raise TaskError(
            f"task {name!r} does not accept option(s) {', '.join(sorted(overrides))}; "
            f"its options: {options}"
        ) from None
    task = fn(**overrides)
    if not isinstance(task, Task):
        raise TaskError(f"built-in task {name!r} returned {type(task).__name__}, not a Task")
    return task


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_TASKS)
