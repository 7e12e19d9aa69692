"""Importance criteria: which channels (structured) or weights (unstructured) to remove first.

Channel scores come from Torch-Pruning's importance classes, evaluated over a whole dependency
group; the data-aware ones (activation, fisher) from calibration statistics
(:mod:`autoprune.data_importance`). Weight scores are elementwise; criteria that only score
whole channels (fpgm, bn_scale, fisher) have none. Lower score = pruned first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from autoprune.data_importance import (
    ActivationImportance,
    FisherImportance,
    InputStatistics,
    activation_weight_scores,
    fisher_head_scores,
)

__all__ = ["Criterion", "CALIBRATION", "register_criterion", "get_criterion", "list_criteria"]

# What a criterion needs from calibration batches: nothing; weight gradients of the task's loss
# (taylor); input statistics of every layer (activation); per-sample mask gradients (fisher).
CALIBRATION = ("none", "gradients", "activations", "fisher")


@dataclass(frozen=True)
class Criterion:
    """A named importance criterion.

    Example:
        >>> get_criterion("fisher").calibration
        'fisher'
    """

    name: str  # the name plans use
    # factory of a Torch-Pruning scorer, given the calibration statistics (None if not needed)
    group_importance: Callable[[InputStatistics | None], tp.importance.Importance]
    # (layer, statistics) -> one score per weight, same shape; None: whole channels only
    weight_scores: Callable[[nn.Module, InputStatistics | None], torch.Tensor] | None
    calibration: str = "none"  # what it needs from calibration batches, one of CALIBRATION
    # (statistics, group, heads) -> one score per head; None: the mean of its channels' scores
    head_scores: Callable[[InputStatistics, tp.Group, int], torch.Tensor | None] | None = None


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


def _elementwise(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    return lambda module, _stats: fn(module.weight)


def _taylor_scores(weight: torch.Tensor) -> torch.Tensor:
    if weight.grad is None:
        raise RuntimeError("taylor needs gradients: run calibration batches backward first")
    return (weight * weight.grad).abs()


def _random_scores(weight: torch.Tensor) -> torch.Tensor:
    return torch.rand(weight.shape)  # seeded by the caller


# Group reduction "mean" and normalizer None: scores stay comparable inside one group, which is
# all a per-group ratio needs.
register_criterion(Criterion(
    "l1", lambda _: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None),
    _elementwise(torch.abs)))
register_criterion(Criterion(
    "l2", lambda _: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
    _elementwise(torch.square)))
register_criterion(Criterion(
    "taylor", lambda _: tp.importance.GroupTaylorImportance(normalizer=None),
    _elementwise(_taylor_scores), calibration="gradients"))
class _FPGM(tp.importance.FPGMImportance):
    """Torch-Pruning's FPGM, with a grouped conv's input slice left out of the score (its
    handling of one fails: ``repeat`` of a 2-D tensor by the group count); the rest of the
    group (the layer producing those channels, its norm) still scores them."""

    def __call__(self, group: tp.Group, **kwargs) -> torch.Tensor | None:
        kept = tp.dependency.Group()
        kept._DG = group._DG
        for item in group:
            m = item.dep.target.module
            if not (isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels
                    and item.dep.handler == tp.prune_conv_in_channels):
                kept._group.append(item)
        return super().__call__(kept, **kwargs)


register_criterion(Criterion("fpgm", lambda _: _FPGM(normalizer=None), None))
register_criterion(Criterion(
    "bn_scale", lambda _: tp.importance.BNScaleImportance(normalizer=None), None))
# Inside one layer LAMP's ordering is the magnitude ordering; it differs only across layers.
register_criterion(Criterion(
    "lamp", lambda _: tp.importance.LAMPImportance(), _elementwise(torch.square)))
register_criterion(Criterion(
    "random", lambda _: tp.importance.RandomImportance(), _elementwise(_random_scores)))
register_criterion(Criterion(
    "activation", ActivationImportance, activation_weight_scores, calibration="activations"))
register_criterion(Criterion("fisher", FisherImportance, None, calibration="fisher",
                             head_scores=fisher_head_scores))
