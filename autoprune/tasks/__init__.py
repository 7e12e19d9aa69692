"""Built-in tasks, registered by name: ``load_task("digits")``, ``--task digits``.

- ``digits``: scikit-learn's handwritten digits at 32x32, a ~1 M-parameter residual CNN.
- ``sequences``: generated motif sequences, a small transformer encoder.

Trained weights are cached in ``$AUTOPRUNE_CACHE_DIR`` (default ``~/.cache/autoprune``).
"""

from autoprune.tasks._registry import get_task, list_tasks, register_task

# Imported for their @register_task side effect; heavy imports inside them are lazy.
from autoprune.tasks import digits, sequences  # noqa: E402, F401  isort: skip

__all__ = ["register_task", "get_task", "list_tasks"]
