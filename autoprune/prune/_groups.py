"""Discovery of prunable groups with Torch-Pruning's dependency graph."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["PrunableGroup", "Unprunable", "ModelInspection", "inspect_model", "build_groups"]

_ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class PrunableGroup:
    """Channels that must be removed together (a Torch-Pruning dependency group)."""

    name: str  # leading layer: the name structured plan rules are keyed by
    coupled: list[str]  # every layer whose weights lose slices when this group is pruned
    producers: list[str]  # Conv/Linear layers whose outputs are these channels
    channels: int  # prunable units of the leading layer's output (channels or neurons)
    params: int  # parameters that belong to these channels (in every coupled layer)
    flops_share: float  # share of the model's MACs in layers this group touches
    num_heads: int | None = None  # set for attention groups: heads are removed whole
    head_owners: list[str] = field(default_factory=list)  # attention modules to update
    tp_group: object = field(default=None, repr=False)  # the Torch-Pruning group (internal)

    @property
    def units(self) -> int:
        """What a sparsity ratio is applied to: heads for attention groups, else channels."""
        return self.num_heads or self.channels


@dataclass
class Unprunable:
    """A Conv/Linear layer whose outputs cannot be removed structurally, and why."""

    name: str  # module name
    reason: str  # human-readable reason


@dataclass
class ModelInspection:
    """What ``inspect_model`` found: prunable groups and layers that cannot be pruned.

    Example:
        >>> from autoprune.testing import create_test_model
        >>> m = create_test_model("resnet_tiny")
        >>> [g.name for g in inspect_model(m, m.example_inputs()).groups][:2]
        ['stem.0', 'stages.0.conv1']
    """

    groups: list[PrunableGroup]  # in model order
    unprunable: list[Unprunable]  # layers structured pruning must leave alone
    total_params: int  # parameters of the whole model
    total_macs: int  # multiply-accumulates of one forward pass on the example input

    def group(self, name: str) -> PrunableGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def table(self) -> str:
        """The human-readable table ``autoprune layers`` prints."""
        rows = [("group (leading layer)", "units", "params", "MACs %", "coupled layers")]
        for g in self.groups:
            units = f"{g.num_heads} heads" if g.num_heads else f"{g.channels} ch"
            coupled = ", ".join(c for c in g.coupled if c != g.name)
            rows.append((g.name, units, f"{g.params:,}", f"{100 * g.flops_share:.1f}",
                         coupled if len(coupled) < 60 else coupled[:57] + "..."))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.unprunable:
            lines += ["", "not prunable structurally (unstructured rules still apply):"]
            lines += [f"  {u.name}: {u.reason}" for u in self.unprunable]
        lines += ["", f"model: {self.total_params:,} params, {self.total_macs / 1e6:.2f} M MACs"]
        return "\n".join(lines)


def _layer_macs(model: nn.Module, example_inputs: tuple) -> dict[nn.Module, int]:
    macs: dict[nn.Module, int] = {}

    def hook(module: nn.Module, _inp, out) -> None:
        w = module.weight
        per_out = w[0].numel()  # in_channels/groups * kernel, or in_features
        n_out = out.numel() // out.shape[0]
        macs[module] = macs.get(module, 0) + n_out * per_out

    layers = [m for m in model.modules() if isinstance(m, _ROOT_TYPES)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


def _attention_linears(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Map each q/k/v-style Linear to its attention module (a module with an int num_heads)."""
    owners = {}
    for module in model.modules():
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or isinstance(module, nn.MultiheadAttention):
            continue
        for child in module.children():
            if isinstance(child, nn.Linear) and child.out_features % heads == 0:
                owners[child] = module
    return owners


def _output_layers(dg: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach the model output without another such layer."""
    outputs = []
    for module, node in dg.module2node.items():
        if not isinstance(module, _ROOT_TYPES):
            continue
        seen, stack, feeds_layer = set(), list(node.outputs), False
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if isinstance(n.module, _ROOT_TYPES):
                feeds_layer = True
                break
            stack.extend(n.outputs)
        if not feeds_layer:
            outputs.append(module)
    return outputs


def build_groups(
    model: nn.Module, example_inputs: tuple
) -> tuple[tp.DependencyGraph, ModelInspection]:
    """Build the dependency graph and the groups structured pruning may remove."""
    was_training = model.training
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TP warns about unwrapped parameters it handles fine
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    macs = _layer_macs(model, example_inputs)
    total_macs = sum(macs.values()) or 1
    attn = _attention_linears(model)
    output_layers = _output_layers(dg)

    groups, covered, unprunable = [], set(), []
    for g in dg.get_all_groups(ignored_layers=output_layers, root_module_types=_ROOT_TYPES):
        root = g[0].dep.target.module
        outs = [d.target.module for d, _ in g if dg.is_out_channel_pruning_fn(d.handler)]
        layers = [d.target.module for d, _ in g if isinstance(d.target.module, nn.Module)]
        uniq = list(dict.fromkeys(m for m in layers if m in names))
        grouped = [m for m in uniq if isinstance(m, nn.modules.conv._ConvNd)
                   and 1 < m.groups != m.in_channels]
        if grouped:
            for m in outs:
                if isinstance(m, _ROOT_TYPES):
                    unprunable.append(Unprunable(
                        names[m], f"coupled with grouped convolution {names[grouped[0]]} "
                        f"(groups={grouped[0].groups}), which structured pruning does not split"))
                    covered.add(m)
            continue
        # q/k/v of one attention module share a group; its output projection alone does not.
        per_owner: dict[nn.Module, int] = {}
        for m in dict.fromkeys(outs):
            if m in attn:
                per_owner[attn[m]] = per_owner.get(attn[m], 0) + 1
        owners = [o for o, n in per_owner.items() if n >= 2]
        channels = len(g[0].idxs)
        params = 0
        for m in uniq:
            dim = g_dim = None
            for d, idxs in g:
                if d.target.module is m:
                    g_dim, dim = len(idxs), (0 if dg.is_out_channel_pruning_fn(d.handler) else 1)
            size = _dim_size(m, dim)
            if size:
                params += sum(p.numel() for p in m.parameters(recurse=False)) * g_dim // size
        touched = sum(macs.get(m, 0) for m in uniq)
        covered.update(outs)
        groups.append(PrunableGroup(
            name=names[root],
            coupled=[names[m] for m in uniq],
            producers=[names[m] for m in dict.fromkeys(outs) if isinstance(m, _ROOT_TYPES)],
            channels=channels,
            params=params,
            flops_share=touched / total_macs,
            num_heads=owners[0].num_heads if owners else None,
            head_owners=[names[o] for o in owners],
            tp_group=g,
        ))
    for m in output_layers:
        unprunable.append(Unprunable(names[m], "model output layer: its outputs are the "
                                               "model's outputs"))
        covered.add(m)
    for m, n in names.items():
        if isinstance(m, _ROOT_TYPES) and m not in covered:
            unprunable.append(Unprunable(n, "not reached by the dependency graph (unused in "
                                            "forward, or used through an unsupported op)"))
    order = {n: i for i, n in enumerate(names.values())}
    groups.sort(key=lambda gr: order[gr.name])
    unprunable.sort(key=lambda u: order[u.name])
    model.train(was_training)
    inspection = ModelInspection(
        groups, unprunable, sum(p.numel() for p in model.parameters()), int(total_macs))
    return dg, inspection


def _dim_size(module: nn.Module, dim: int | None) -> int:
    w = getattr(module, "weight", None)
    if dim is None or w is None:
        return 0
    if w.dim() == 1:  # norm layers: one value per channel
        return w.shape[0]
    if isinstance(module, nn.modules.conv._ConvNd) and dim == 1:
        return w.shape[1] * module.groups
    return w.shape[dim]


def inspect_model(model: nn.Module, example_inputs: tuple) -> ModelInspection:
    """List prunable groups and the layers that cannot be pruned structurally (and why).

    The model is not changed.
    """
    return build_groups(model, example_inputs)[1]
