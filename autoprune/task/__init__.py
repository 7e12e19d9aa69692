"""Tasks: the contract (``Task``, ``Metric``) and loading one from a spec (``load_task``).

Tasks come from a Python file (``path/to/file.py:make_task``), an importable module
(``package.module:make_task``) or the built-in registry (``digits``, ``autoprune.tasks``).
"""

from autoprune.task._contract import (
    TASK_EXAMPLE,
    Metric,
    Task,
    accuracy,
    call_model,
    iterate_seeded,
)
from autoprune.task._loader import load_task

__all__ = ["Metric", "Task", "accuracy", "call_model", "iterate_seeded", "load_task",
           "TASK_EXAMPLE"]
