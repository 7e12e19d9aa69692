"""Dependency analysis that stops with a clear error instead of hanging.

Torch-Pruning grows a group by following dependencies until every (layer, indices) pair in it
is already known. Index mappings that never settle (slices and concatenations that shift
channel indices around a cycle, as rotary embeddings do when traced op by op) make that walk
endless. A group can legitimately hold each dependency of the graph a few times at most, so a
group larger than a small multiple of the graph's dependency count is stuck: analysis stops
there and names the layer it started from and the modules it kept revisiting.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import graph as tp_graph

from autoprune.errors import AnalysisError

__all__ = ["bounded_analysis", "group_size_limit"]

_PER_DEPENDENCY = 4  # group entries allowed per dependency of the graph


def group_size_limit(dg: tp.DependencyGraph) -> int:
    """The most entries one group may reach: linear in the size of the graph."""
    edges = sum(len(node.dependencies) for node in dg.module2node.values())
    return _PER_DEPENDENCY * edges + 64


def _stuck_message(group: tp.Group, names: dict[nn.Module, str], limit: int) -> str:
    root = group[0].dep.target.module
    visits = Counter(d.target.module for d, _ in group)
    named = [names[m] for m, _ in visits.most_common() if isinstance(m, nn.Module) and m in names]
    where = ", ".join(named[:4]) or "unnamed ops"
    return (f"dependency analysis of {names.get(root, type(root).__name__)} did not finish: its "
            f"group grew past {limit} entries (linear in the model's size) while revisiting "
            f"{where} with ever-different channel indices. Torch-Pruning cannot follow the "
            f"channels through this module's ops (slices and concatenations in a cycle, e.g. "
            f"rotary embeddings traced op by op), so this model cannot be pruned structurally "
            f"as it is. Report the class of the module holding these layers, so that autoprune "
            f"can handle it as a unit (as it does for the attention modules listed in "
            f"docs/transformers.md).")


@contextmanager
def bounded_analysis(dg: tp.DependencyGraph, names: dict[nn.Module, str]) -> Iterator[None]:
    """Within this context, building a group of ``dg`` larger than :func:`group_size_limit`
    raises :class:`~autoprune.errors.AnalysisError` naming the module where it stuck.

    Example:
        >>> from autoprune.testing import create_test_model
        >>> m = create_test_model("resnet_tiny")
        >>> dg = tp.DependencyGraph().build_dependency(m, example_inputs=m.example_inputs())
        >>> with bounded_analysis(dg, {mod: n for n, mod in m.named_modules()}):
        ...     groups = list(dg.get_all_groups())
    """
    limit = group_size_limit(dg)

    class BoundedGroup(tp.dependency.group.Group):
        def add_dep(self, dep, idxs) -> None:
            super().add_dep(dep, idxs)
            if len(self._group) > limit:
                raise AnalysisError(_stuck_message(self, names, limit))

    with mock.patch.object(tp_graph, "Group", BoundedGroup):
        yield
