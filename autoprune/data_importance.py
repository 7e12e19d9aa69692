"""Data-aware importance: what calibration data shows at every Conv/Linear layer's input, and
the two criteria built on it.

- ``activation`` (Wanda, Sun et al. 2023; FLAP, An et al. 2024): a channel's score is its
  expected squared contribution to the layers that read it, ``||W[:, j]||^2 * E[x_j^2]``
  summed over those layers; for single weights, ``|W_ij| * ||x_j||``.
- ``fisher`` (Molchanov et al. 2019, Michel et al. 2019, Kwon et al. 2022): the squared
  gradient of a mask on each channel or head, per sample, summed over samples. The loss is a
  random projection of the model's outputs, ``sum(outputs * noise)`` with Gaussian noise: its
  squared mask gradient is, in expectation, ``||d outputs / d mask||^2``, the Gauss-Newton
  (Fisher) curvature of the outputs' squared error to the dense model. It needs no labels and,
  unlike a loss that distils the model to itself (zero gradient at the dense model), is not at
  its minimum there.

A mask on channel ``j`` of a group multiplies it at the input of every layer that reads it,
so a group's score sums over its consumer layers (Torch-Pruning's in-channel dependencies).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from autoprune.nested import tensors
from autoprune.plan import within

__all__ = ["InputStatistics", "collect_statistics", "ActivationImportance", "FisherImportance",
           "activation_weight_scores", "fisher_head_scores", "fisher_unit_scores",
           "global_allocation", "allocate", "mask_gradients"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class InputStatistics:
    """Calibration statistics at the input of every Conv/Linear layer, by module."""

    sq_mean: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # E[x_j^2] per channel
    # (samples, channels): per sample, sum over positions of input x gradient of the Fisher loss
    fisher: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    samples: int = 0  # calibration samples seen


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _per_sample(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(samples, channels): ``x`` summed over every dimension but the first and the channel's."""
    x = x.movedim(_channel_dim(module), -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)


def collect_statistics(model: nn.Module, batches: Iterable[tuple], *, fisher: bool,
                       seed: int = 0) -> InputStatistics:
    """Run calibration ``batches`` of ``(inputs, targets)`` through ``model`` (eval mode, its
    weights and gradients untouched) and gather :class:`InputStatistics`.

    Example:
        >>> batches = task.calibration_batches(4)  # doctest: +SKIP
        >>> collect_statistics(model, batches, fisher=True).samples  # doctest: +SKIP
        64
    """
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    stats = InputStatistics()
    sq_sum: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}
    fisher_parts: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in layers}
    taps: list[tuple[nn.Module, torch.Tensor]] = []

    def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        flat = x.detach().movedim(_channel_dim(module), -1).reshape(-1, x.shape[
            _channel_dim(module)]).float()
        sq_sum[module] = sq_sum.get(module, 0) + flat.square().sum(0)
        counts[module] = counts.get(module, 0) + flat.shape[0]
        if fisher and x.requires_grad:
            tap = x * 1.0  # this layer's own copy: its gradient is through this layer only
            taps.append((module, tap))
            return (tap, *args[1:])
        return None

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(pre_hook) for m in layers]
    generator = torch.Generator().manual_seed(seed)
    try:
        for inputs, _ in batches:
            inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            taps.clear()
            with torch.enable_grad() if fisher else torch.no_grad():
                outputs = [t for t in tensors(model(*inputs)) if t.is_floating_point()]
                stats.samples += outputs[0].shape[0] if outputs else 0
                if not fisher or not taps:
                    continue
                loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)
                            .to(t.device)).sum() for t in outputs if t.requires_grad)
                grads = torch.autograd.grad(loss, [t for _, t in taps], allow_unused=True)
            for (module, tap), grad in zip(taps, grads):
                if grad is not None:
                    fisher_parts[module].append(_per_sample(tap.detach() * grad, module).float())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats.sq_mean = {m: (s / counts[m]).cpu() for m, s in sq_sum.items()}
    stats.fisher = {m: torch.cat(p).cpu() for m, p in fisher_parts.items() if p}
    return stats


def _consumers(group: tp.Group) -> Iterable[tuple[nn.Module, list[int], list[int]]]:
    """(layer, its input channel indices, the group's root indices) for each layer of
    ``group`` that reads the group's channels."""
    for item in group:
        dep = item.dep
        module = dep.target.module
        if isinstance(module, _LAYERS) and group._DG.is_in_channel_pruning_fn(dep.handler):
            yield module, list(item.idxs), list(item.root_idxs)


def _column_energy(module: nn.Module) -> torch.Tensor:
    """``||W[:, j]||^2`` per input channel ``j`` (grouped convs: within the channel's group)."""
    w = module.weight.detach().float()
    if isinstance(module, nn.Linear):
        return w.square().sum(0)
    per_group_out = w.shape[0] // module.groups
    energy = w.square().reshape(module.groups, per_group_out, w.shape[1], -1).sum((1, 3))
    return energy.flatten()  # group g's input channels follow group g-1's


def _width(group: tp.Group) -> int:
    """The number of channels of a full Torch-Pruning group (its root layer's)."""
    return len(group[0].idxs)


class _StatisticsImportance(tp.importance.Importance):
    def __init__(self, stats: InputStatistics):
        self.stats = stats


class ActivationImportance(_StatisticsImportance):
    """``sum over consumer layers of ||W[:, j]||^2 * E[x_j^2]``; None if no consumer layer
    was seen in calibration."""

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        scores, seen = torch.zeros(_width(group)), False
        for module, idxs, root in _consumers(group):
            if module not in self.stats.sq_mean:
                continue
            value = _column_energy(module).cpu() * self.stats.sq_mean[module]
            scores.index_add_(0, torch.tensor(root), value[idxs])
            seen = True
        return scores if seen else None


def mask_gradients(group: tp.Group, stats: InputStatistics) -> torch.Tensor | None:
    """(samples, channels): per sample, the gradient of a mask on each of the group's
    channels, summed over the layers that read it; None if none of them has gradients."""
    per_sample = None
    for module, idxs, root in _consumers(group):
        grads = stats.fisher.get(module)
        if grads is None:
            continue
        if per_sample is None:
            per_sample = torch.zeros(grads.shape[0], _width(group))
        per_sample.index_add_(1, torch.tensor(root), grads[:, idxs])
    return per_sample


class FisherImportance(_StatisticsImportance):
    """Per sample, the mask gradient summed over the consumer layers; squared, then summed
    over samples. None if no consumer layer has gradients."""

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        per_sample = mask_gradients(group, self.stats)
        return None if per_sample is None else per_sample.square().sum(0)


def fisher_head_scores(stats: InputStatistics, group: tp.Group, heads: int
                       ) -> torch.Tensor | None:
    """Each head's own Fisher score: per sample, the gradient of one mask on the whole head
    (the sum of its channels'), squared, summed over samples."""
    per_sample = mask_gradients(group, stats)
    if per_sample is None:
        return None
    return per_sample.view(per_sample.shape[0], heads, -1).sum(-1).square().sum(0)


def global_allocation(groups: list, stats: InputStatistics, sparsity: float,
                      high: float = 0.9) -> dict[str, float]:
    """Per-group sparsities that remove ``sparsity`` of all heads (across the head groups)
    and of all channels (across the other groups), those of least Fisher importance first
    (Kwon et al. 2022's global ranking). A head's score is its own mask's (the squared sum of
    its channels' per-sample gradients); no group loses more than ``high``.

    ``groups``: :class:`~autoprune.prune.PrunableGroup` objects; groups Fisher cannot score
    (and grouped-conv groups) are left out of the result.

    Example:
        >>> global_allocation(inspection.groups, stats, 0.5)  # doctest: +SKIP
        {'encoder.layer.0.attention.self.value': 0.25, ...}
    """
    return allocate(fisher_unit_scores(groups, stats), sparsity, high)


def fisher_unit_scores(groups: list, stats: InputStatistics
                       ) -> dict[str, tuple[torch.Tensor, bool]]:
    """Each group's Fisher score per unit (head or channel), and whether its units are
    heads: what :func:`allocate` ranks (computed once for any number of sparsities)."""
    scores: dict[str, tuple[torch.Tensor, bool]] = {}
    for g in groups:
        per_sample = mask_gradients(g.tp_group, stats) if g.channel_groups == 1 else None
        if per_sample is None:
            continue
        if g.num_heads:
            scores[g.name] = fisher_head_scores(stats, g.tp_group, g.num_heads), True
        else:
            scores[g.name] = per_sample.square().sum(0), False
    return scores


def allocate(scores: dict[str, tuple[torch.Tensor, bool]], sparsity: float,
             high: float = 0.9, dropped: tuple[str, ...] = ()) -> dict[str, float]:
    """:func:`global_allocation` from :func:`fisher_unit_scores`, over the groups outside the
    ``dropped`` blocks (a plan's ``drop_blocks``: what they hold is gone whole)."""
    scores = {name: v for name, v in scores.items() if not within(name, dropped)}
    out: dict[str, float] = {}
    for heads in (True, False):
        kind = [name for name, (_, is_heads) in scores.items() if is_heads == heads]
        if not kind:
            continue
        units = [(float(v), name) for name in kind for v in scores[name][0]]
        n_remove = int(sparsity * len(units) + 0.5)
        cap = {name: int(high * len(scores[name][0])) for name in kind}
        removed = dict.fromkeys(kind, 0)
        for _, name in sorted(units):  # least important first; a group at its cap is skipped
            if n_remove == 0:
                break
            if removed[name] < cap[name]:
                removed[name] += 1
                n_remove -= 1
        out.update((name, removed[name] / len(scores[name][0])) for name in kind)
    return out


def activation_weight_scores(module: nn.Module, stats: InputStatistics) -> torch.Tensor:
    """Wanda's unstructured score ``|W_ij| * ||x_j||`` (a conv weight's input channel ``j``
    across its kernel), same shape as the weight."""
    w = module.weight.detach()
    norm = stats.sq_mean[module].sqrt().to(w.device, w.dtype)
    if isinstance(module, nn.Linear):
        return w.abs() * norm
    per_group = w.shape[1]
    norm = norm.reshape(module.groups, 1, per_group).expand(
        module.groups, w.shape[0] // module.groups, per_group).reshape(w.shape[0], per_group)
    return w.abs() * norm.reshape(*norm.shape, *([1] * (w.dim() - 2)))
