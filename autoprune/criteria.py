"""Importance criteria: which channels (structured) or weights (unstructured) to remove first.

Channel scores come from Torch-Pruning's importance classes, evaluated over a whole dependency
group. Weight scores are elementwise; criteria that only score whole channels (fpgm, bn_scale)
have none. Lower score = pruned first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp

__all__ = ["Criterion", "register_criterion", "get_criterion", "list_criteria"]


@dataclass(frozen=True)
class Criterion:
    """A named importance criterion.

    Example:
        >>> get_criterion("l1").needs_gradients
        False
    """

    name: str  # the name plans use
    group_importance: Callable[[], tp.importance.Importance]  # factory of a Torch-Pruning scorer
    weight_scores: Callable[[torch.Tensor], torch.Tensor] | None  # weight -> scores, same shape
    needs_gradients: bool = False  # needs .grad from calibration batches (taylor)


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    _CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    if name not in _CRITERIA:
        raise KeyError(f"unknown criterion {name!r}; known: {', '.join(list_criteria())}")
    return _CRITERIA[name]


def list_criteria() -> list[str]:
    return list(_CRITERIA)


def _taylor_scores(weight: torch.Tensor) -> torch.Tensor:
    if weight.grad is None:
        raise RuntimeError("taylor needs gradients: run calibration batches backward first")
    return (weight * weight.grad).abs()


def _random_scores(weight: torch.Tensor) -> torch.Tensor:
    return torch.rand(weight.shape)  # seeded by the caller


# Group reduction "mean" and normalizer None: scores stay comparable inside one group, which is
# all a per-group ratio needs.
register_criterion(Criterion(
    "l1", lambda: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None), torch.abs))
register_criterion(Criterion(
    "l2", lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None), torch.square))
register_criterion(Criterion(
    "taylor", lambda: tp.importance.GroupTaylorImportance(normalizer=None), _taylor_scores,
    needs_gradients=True))
register_criterion(Criterion(
    "fpgm", lambda: tp.importance.FPGMImportance(normalizer=None), None))
register_criterion(Criterion(
    "bn_scale", lambda: tp.importance.BNScaleImportance(normalizer=None), None))
# Inside one layer LAMP's ordering is the magnitude ordering; it differs only across layers.
register_criterion(Criterion("lamp", lambda: tp.importance.LAMPImportance(), torch.square))
register_criterion(Criterion("random", lambda: tp.importance.RandomImportance(), _random_scores))
