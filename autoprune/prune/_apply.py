"""apply_plan: structured removal through the dependency graph, then unstructured masks."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from autoprune.augment import Augment, with_augmented
from autoprune.criteria import get_criterion
from autoprune.data_importance import InputStatistics, collect_statistics
from autoprune.errors import PlanError
from autoprune.fingerprint import architecture_signature, first_difference
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune._depth import drop_blocks_
from autoprune.prune._groups import HEAD_COUNT_ATTRS, PrunableGroup, build_groups

__all__ = [
    "PruneReport", "WeightMask", "apply_plan", "prune_model_", "bake_masks_", "baked_copy",
    "has_masks", "count_kept", "group_rule",
]

_WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Calibration = Iterable[tuple]  # (inputs, targets) batches; inputs a tensor or tuple of tensors


@dataclass
class PruneReport:
    """What ``prune_model_`` did, group by group and layer by layer."""

    structured: dict[str, tuple[int, int]] = field(default_factory=dict)  # group: (before, after)
    unstructured: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer: (zeroed, n)
    notes: list[str] = field(default_factory=list)  # fallbacks and other remarks
    # the criterion that ranked each structured group (l1 where the plan's could not score it)
    criteria: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # group: "bn_scale -> l1"
    # Conv/Linear layers that lost output (input) channels: the dense model's indices of the
    # channels they keep, in order (what reconstruction matches against the dense model)
    kept_out: dict[str, list[int]] = field(default_factory=dict)
    kept_in: dict[str, list[int]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # blocks replaced by a pass-through


def count_kept(units: int, sparsity: float, round_to: int | None = None) -> int:
    """Units kept after pruning ``sparsity`` of ``units``: round half up, at least one unit.

    Example:
        >>> count_kept(16, 0.5), count_kept(9, 0.5), count_kept(20, 0.3, round_to=8)
        (8, 4, 8)
    """
    keep = units - math.floor(sparsity * units + 0.5)
    if round_to and keep > round_to:
        keep -= keep % round_to
    return max(1, keep)


def _check_fingerprint(plan: PruningPlan, model: nn.Module) -> None:
    if plan.fingerprint is None:
        return
    diff = first_difference(plan.fingerprint, architecture_signature(model))
    if diff:
        raise PlanError(
            f"this plan was made for a different model ({diff}). Apply it to the model it was "
            f"searched on, or drop its 'fingerprint' field to apply it by layer names anyway."
        )


def _check_rule_names(plan: PruningPlan, model: nn.Module) -> None:
    names = {n for n, _ in model.named_modules()}
    for key in plan.rules:
        if not key.startswith("re:") and key not in names:
            close = [n for n in names if key.split(".")[-1] in n][:3]
            hint = f" (similar: {', '.join(sorted(close))})" if close else ""
            raise PlanError(
                f"rules[{key!r}]: the model has no layer named {key!r}{hint}. "
                f"`autoprune layers --task TASK` lists the names."
            )


def group_rule(plan: PruningPlan, group: PrunableGroup) -> LayerRule:
    """The rule ``plan`` applies to a structured group (anything with name and producers)."""
    # Exact names win, for the leading layer and then any layer producing the same channels;
    # patterns see the leading layer only, so one pattern never hits a group twice.
    for name in [group.name, *group.producers]:
        if name in plan.rules:
            return plan.rules[name]
    for key, rule in plan.rules.items():
        if key.startswith("re:") and re.fullmatch(key[3:], group.name):
            return rule
    return plan.default


def _named_rule(plan: PruningPlan, group: PrunableGroup) -> LayerRule | None:
    """The rule naming the group's leading layer or a producer exactly, if any (opt-in groups)."""
    return next((plan.rules[n] for n in [group.name, *group.producers] if n in plan.rules), None)


def _calibrate(
    model: nn.Module,
    criteria: set[str],
    calibration: Calibration | None,
    loss_fn: Callable | None,
    seed: int,
    augment: Augment | None = None,
) -> InputStatistics | None:
    """Run what ``criteria`` need from calibration batches: weight gradients of the task's
    loss (taylor), input statistics (activation, fisher; on augmented copies too). None if no
    statistics are needed."""
    needs = {get_criterion(c).calibration for c in criteria} - {"none"}
    if not needs:
        return None
    if calibration is None or ("gradients" in needs and loss_fn is None):
        names = ", ".join(sorted(c for c in criteria if get_criterion(c).calibration != "none"))
        raise PlanError(
            f"criterion {names} needs calibration data: pass calibration batches and the "
            "task's loss (apply_plan(..., calibration=task.calibration_batches(4), "
            "loss_fn=task.loss_fn))"
        )
    if "gradients" in needs:
        _run_backward(model, calibration, loss_fn)
    if needs & {"activations", "fisher"}:
        return collect_statistics(model, with_augmented(calibration, augment, seed),
                                  fisher="fisher" in needs, seed=seed)
    return None


def _run_backward(model: nn.Module, calibration: Calibration, loss_fn: Callable) -> None:
    model.zero_grad()
    was_training = model.training
    model.eval()  # keep BatchNorm statistics untouched
    with torch.enable_grad():
        for inputs, targets in calibration:
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            loss_fn(model(*inputs), targets).backward()
    model.train(was_training)


def _pick(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    # Stable sort: equal scores are pruned in index order, so pruning is deterministic.
    return torch.sort(scores, stable=True).indices[:n_remove]


def _prune_structured(
    model: nn.Module,
    plan: PruningPlan,
    example_inputs: tuple,
    calibration: Calibration | None,
    loss_fn: Callable | None,
    seed: int,
    report: PruneReport,
    augment: Augment | None,
) -> None:
    dg, inspection = build_groups(model, example_inputs)
    work = [(g, group_rule(plan, g)) for g in inspection.groups]
    work += [(g, r) for g in inspection.hidden if (r := _named_rule(plan, g)) is not None]
    work = [(g, r) for g, r in work if r.mode == "structured" and r.sparsity > 0]
    whole = {g.name for g, r in work if r.whole_groups and g.whole_groups}
    for g, r in work:
        if r.whole_groups and not g.whole_groups:
            report.notes.append(f"{g.name}: whole_groups applies to a grouped conv's output "
                                f"channels only (`autoprune layers` lists them); pruned by "
                                f"channels")
    # A grouped conv losing whole groups decides what the group feeding it loses.
    fed = {g.whole_groups[1] for g, _ in work if g.name in whole}
    work = [(g, r) for g, r in work if g.name not in fed]
    if not work:
        return
    stats = _calibrate(model, {r.criterion for _, r in work}, calibration, loss_fn, seed, augment)
    # Score every group first, then prune: scores are not disturbed by earlier removals.
    chosen = []
    for group, rule in work:
        crit = rule.criterion
        scores = get_criterion(crit).group_importance(stats)(group.tp_group)
        if scores is None:  # e.g. bn_scale on a group without BatchNorm
            report.notes.append(f"{group.name}: {crit} cannot score this group, used l1")
            report.fallbacks[group.name] = f"{crit} -> l1"
            crit = "l1"
            scores = get_criterion(crit).group_importance(None)(group.tp_group)
        report.criteria[group.name] = crit
        scores = scores.detach().cpu().float()
        if group.num_heads:  # whole heads, scored by their mean (as Torch-Pruning does)
            per_head = scores.numel() // group.num_heads  # or by the criterion's own score
            keep = count_kept(group.num_heads, rule.sparsity)
            head_fn = get_criterion(crit).head_scores
            by_head = head_fn(stats, group.tp_group, group.num_heads) if head_fn else None
            if by_head is None:
                by_head = scores.view(group.num_heads, per_head).mean(1)
            heads = _pick(by_head.detach().cpu().float(), group.num_heads - keep)
            idxs = (heads[:, None] * per_head + torch.arange(per_head)).flatten()
        elif group.name in whole:  # whole conv groups, scored by their channels' mean
            n = group.channel_groups
            size = group.channels // n
            keep = count_kept(n, rule.sparsity)
            gone = _pick(scores.view(n, size).mean(1), n - keep)
            idxs = (gone[:, None] * size + torch.arange(size)).flatten()
            keep *= size
        elif group.channel_groups > 1:  # the same positions in every group (Torch-Pruning's
            n = group.channel_groups  # channel groups): grouped convs stay grouped
            size = group.channels // n
            keep = count_kept(size, rule.sparsity, rule.round_to and rule.round_to
                              // math.gcd(rule.round_to, n))
            pos = _pick(scores.view(n, size).mean(0), size - keep)
            idxs = (torch.arange(n)[:, None] * size + pos).flatten()
            keep *= n
        else:
            keep = count_kept(group.channels, rule.sparsity, rule.round_to)
            idxs = _pick(scores, group.channels - keep)
        chosen.append((group, sorted(idxs.tolist()), keep))
    names = {m: n for n, m in model.named_modules()}
    for group, idxs, keep in chosen:
        if idxs:
            root = group.tp_group[0].dep
            removal = dg.get_pruning_group(root.target.module, root.handler, idxs)
            _record_kept(removal, dg, names, report)
            removal.prune(record_history=False)
            if group.name in whole:
                _remove_conv_inputs(model, dg, inspection.group(group.whole_groups[1]),
                                    group, idxs, names, report)
        report.structured[group.name] = (group.units, keep)
    modules = dict(model.named_modules())
    for group, _, keep in chosen:
        for owner_name in group.head_owners:
            _set_head_count(modules[owner_name], keep, group.channels // group.num_heads)
    model.zero_grad(set_to_none=True)


def _remove_conv_inputs(model: nn.Module, dg: object, feeding: PrunableGroup,
                        outputs: PrunableGroup, removed: list[int],
                        names: dict[nn.Module, str], report: PruneReport) -> None:
    """After a grouped conv lost the output channels ``removed`` (whole conv groups), remove
    the input channels of those groups: from the layers of ``feeding`` through Torch-Pruning,
    and from the conv itself by lowering its group count (its weights' input slice per group
    is unchanged; Torch-Pruning's conv pruner would cut the same positions in every group)."""
    conv = dict(model.named_modules())[outputs.whole_groups[0]]
    out_size = outputs.channels // outputs.channel_groups
    in_size = feeding.channels // feeding.channel_groups
    gone = sorted({i // out_size for i in removed})
    idxs = [j * in_size + c for j in gone for c in range(in_size)]
    root = feeding.tp_group[0].dep
    removal = dg.get_pruning_group(root.target.module, root.handler, idxs)
    removal._group = [item for item in removal  # Group.prune runs every item of this list
                      if not (item.dep.target.module is conv
                              and not dg.is_out_channel_pruning_fn(item.dep.handler))]
    _record_kept(removal, dg, names, report)
    removal.prune(record_history=False)
    conv.in_channels -= len(idxs)
    conv.groups -= len(gone)
    gone_in = set(idxs)
    report.kept_in[names[conv]] = [i for i in range(feeding.channels) if i not in gone_in]
    report.structured[feeding.name] = (feeding.units, feeding.channels - len(idxs))


def _record_kept(removal: object, dg: object, names: dict[nn.Module, str],
                 report: PruneReport) -> None:
    """Note which of the dense model's channels each Conv/Linear layer keeps after
    ``removal`` (a Torch-Pruning group whose indices are relative to the current widths)."""
    for item in removal:
        module = item.dep.target.module
        if not isinstance(module, _WEIGHT_TYPES):
            continue
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        kept_by_layer = report.kept_out if out else report.kept_in
        width = module.weight.shape[0] if out else (
            module.in_features if isinstance(module, nn.Linear) else module.in_channels)
        kept = kept_by_layer.setdefault(names[module], list(range(width)))
        gone = set(item.idxs)
        kept_by_layer[names[module]] = [k for i, k in enumerate(kept) if i not in gone]


def _set_head_count(attn: nn.Module, heads: int, head_dim: int) -> None:
    """Attention modules cache head counts as ints (Torch-Pruning leaves them): update them."""
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, heads)
    if hasattr(attn, "all_head_size"):  # BERT-style
        attn.all_head_size = heads * head_dim


def _prune_unstructured(
    model: nn.Module,
    plan: PruningPlan,
    calibration: Calibration | None,
    loss_fn: Callable | None,
    seed: int,
    report: PruneReport,
    augment: Augment | None,
) -> None:
    work = [
        (name, m, plan.rule_for(name))
        for name, m in model.named_modules()
        if isinstance(m, _WEIGHT_TYPES)
    ]
    work = [(n, m, r) for n, m, r in work if r.mode == "unstructured" and r.sparsity > 0]
    stats = _calibrate(model, {r.criterion for _, _, r in work}, calibration, loss_fn, seed,
                       augment)
    for name, module, rule in work:
        weight = module.weight
        scores = get_criterion(rule.criterion).weight_scores(module, stats).detach().flatten()
        n_zero = math.floor(rule.sparsity * scores.numel() + 0.5)
        mask = torch.ones_like(scores)
        mask[_pick(scores, n_zero)] = 0
        parametrize.register_parametrization(module, "weight", WeightMask(mask.view_as(weight)))
        report.unstructured[name] = (n_zero, scores.numel())
    model.zero_grad(set_to_none=True)


def prune_model_(
    model: nn.Module,
    plan: PruningPlan,
    example_inputs: tuple,
    *,
    calibration: Calibration | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    augment: Augment | None = None,
) -> PruneReport:
    """Apply ``plan`` to ``model`` in place and report what was removed.

    The plan's ``drop_blocks`` are replaced by pass-throughs first (depth); then structured
    groups are removed (physically, through Torch-Pruning's dependency graph) from the blocks
    left; then unstructured layers get masks, which stay applied
    through fine-tuning (a :class:`WeightMask` parametrization) until :func:`bake_masks_`.
    ``augment`` (a task's ``augment_fn``) adds a varied copy of each calibration batch to the
    statistics of the activation and fisher criteria (:mod:`autoprune.augment`).
    """
    _check_fingerprint(plan, model)
    _check_rule_names(plan, model)
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    calibration = list(calibration) if calibration is not None else None
    report = PruneReport()
    drop_blocks_(model, plan.drop_blocks, example_inputs)
    report.dropped = list(plan.drop_blocks)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the random criterion; everything else is deterministic
        _prune_structured(model, plan, example_inputs, calibration, loss_fn, seed, report,
                          augment)
        _prune_unstructured(model, plan, calibration, loss_fn, seed, report, augment)
    return report


def apply_plan(
    model: nn.Module,
    plan: PruningPlan,
    example_inputs: tuple,
    *,
    calibration: Calibration | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    augment: Augment | None = None,
) -> nn.Module:
    """Return a pruned copy of ``model``; the original is not changed.

    Example:
        >>> from autoprune.testing import create_test_model
        >>> m = create_test_model("resnet_tiny")
        >>> pruned = apply_plan(m, PruningPlan.uniform(0.5), m.example_inputs())
        >>> pruned.stages[0].conv1.out_channels
        4
    """
    pruned = copy.deepcopy(model)
    prune_model_(pruned, plan, example_inputs, calibration=calibration, loss_fn=loss_fn,
                 seed=seed, augment=augment)
    return pruned


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask``: masked weights stay zero whatever the
    optimizer does to ``original``. (A parametrization, unlike ``torch.nn.utils.prune``'s
    hooks, keeps the model deep-copyable after a forward pass.)"""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _masked(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules()
        if parametrize.is_parametrized(m, "weight")
        and any(isinstance(p, WeightMask) for p in m.parametrizations.weight)
    ]


def has_masks(model: nn.Module) -> bool:
    """True if unstructured masks are still attached (not yet baked)."""
    return bool(_masked(model))


def bake_masks_(model: nn.Module) -> nn.Module:
    """Make unstructured masks permanent: zeros written into ``weight``, masks removed."""
    for module in _masked(model):
        # A deep copy shares torch's generated Parametrized* class with the original, and
        # removing the parametrization edits that class: give this module its own first.
        cls = type(module)
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        # Removal re-registers `weight` after `bias`: restore the order, so a baked model has
        # the same architecture signature and state_dict order as a dense one.
        params = module._parameters
        module._parameters = {"weight": params["weight"]} | {
            k: v for k, v in params.items() if k != "weight"}
    return model


def baked_copy(model: nn.Module) -> nn.Module:
    """``model`` itself if it has no masks, else a deep copy with masks baked."""
    return bake_masks_(copy.deepcopy(model)) if has_masks(model) else model
