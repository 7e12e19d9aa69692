"""Discovery of prunable groups with Torch-Pruning's dependency graph."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from autoprune.errors import UsageError
from autoprune.prune._attention import (
    AttentionLayout,
    AttentionPruner,
    add_head_dependencies,
    find_attention,
    opaque_attention,
)
from autoprune.prune._bounded import bounded_analysis
from autoprune.prune._conv1d import is_conv1d
from autoprune.prune._diagnose import tensors, why_unreached

__all__ = ["PrunableGroup", "Unprunable", "ModelInspection", "inspect_model", "build_groups",
           "layer_costs", "grouped_advice"]

_ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Python-int head counts attention modules keep (timm/ours, BERT/RoBERTa/ViT, DistilBERT).
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads")


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
    channel_groups: int = 1  # grouped conv / GroupNorm groups: each loses the same channels
    heads_per_unit: int = 1  # query heads per unit: grouped-query attention prunes whole
    # key/value groups (num_heads counts them), each with this many query heads
    # (grouped conv, group feeding its inputs) when these are the outputs of a grouped conv
    # whose conv groups a rule with whole_groups may remove whole
    whole_groups: tuple[str, str] | None = None
    tp_group: object = field(default=None, repr=False)  # the Torch-Pruning group (internal)

    @property
    def units(self) -> int:
        """What a sparsity ratio is applied to: heads for attention groups, else channels."""
        return self.num_heads or self.channels

    def describe_units(self) -> str:
        """``12 heads``, ``64 ch`` or ``64 ch in 8 groups of 8`` (what ``autoprune layers``
        shows; a grouped conv's group width decides its kernel path, see
        docs/benchmarks.md#grouped-convolutions)."""
        if self.num_heads and self.heads_per_unit > 1:
            return f"{self.num_heads} kv groups of {self.heads_per_unit} heads"
        if self.num_heads:
            return f"{self.num_heads} heads"
        if self.channel_groups > 1:
            return (f"{self.channels} ch in {self.channel_groups} groups of "
                    f"{self.channels // self.channel_groups}")
        return f"{self.channels} ch"


def grouped_advice(width: int) -> str:
    """Which way of shrinking a grouped conv with ``width`` channels per group pays on ONNX
    Runtime's CPU convs, which run on blocks of 16 channels (AVX-512; 8 with AVX2) only when
    every group's channels are whole blocks (benchmarks/grouped_conv.py measures both ways)."""
    if width % 8:
        return (f"groups of {width} ch miss the blocked kernels already: channels inside "
                f"groups pay (they remove about twice the MACs of whole groups)")
    if width % 16:
        return (f"groups of {width} ch run on the blocked kernels of AVX2 CPUs (blocks of 8), "
                f"not of AVX-512 ones (16): whole groups pay on AVX2, channels inside groups "
                f"on AVX-512")
    if width == 16:
        return ("groups of 16 ch run on the blocked kernels; channels removed inside groups "
                "leave them on AVX-512 CPUs: whole groups pay")
    return (f"groups of {width} ch run on the blocked kernels; channels inside groups stay on "
            f"them only if every group keeps a multiple of 16 ch (8 on AVX2), whole groups "
            f"always")


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
    hidden: list[PrunableGroup] = field(default_factory=list)  # a transformers model's hidden
    # width: pruned only by a plan rule naming the group (or a producer) exactly

    def group(self, name: str) -> PrunableGroup:
        for g in self.groups + self.hidden:
            if g.name == name:
                return g
        raise KeyError(name)

    def table(self) -> str:
        """The human-readable table ``autoprune layers`` prints."""
        rows = [("group (leading layer)", "units", "params", "MACs %", "coupled layers")]
        for g in self.groups + self.hidden:
            coupled = ", ".join(c for c in g.coupled if c != g.name)
            rows.append((g.name, g.describe_units(), f"{g.params:,}",
                         f"{100 * g.flops_share:.1f}",
                         coupled if len(coupled) < 60 else coupled[:57] + "..."))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        if self.hidden:
            lines.insert(len(self.groups) + 1, "hidden width, pruned only by a rule naming it:")
        lines.insert(1, "-" * len(lines[0]))
        grouped = [g for g in self.groups if g.whole_groups]
        if grouped:
            lines += ["", "grouped convolutions (a rule's whole_groups: true removes whole conv "
                          "groups and the input channels feeding them):"]
            lines += [f"  {g.name}: {grouped_advice(g.channels // g.channel_groups)}"
                      for g in grouped]
        if self.unprunable:
            lines += ["", "not prunable structurally (unstructured rules still apply):"]
            lines += [f"  {u.name}: {u.reason}" for u in self.unprunable]
        lines += ["", f"model: {self.total_params:,} params, {self.total_macs / 1e6:.2f} M MACs"]
        return "\n".join(lines)


def layer_costs(model: nn.Module, example_inputs: tuple) -> dict[nn.Module, tuple[int, int]]:
    """(MACs, output elements) per sample of every Conv/Linear layer in one forward pass."""
    costs: dict[nn.Module, tuple[int, int]] = {}

    def hook(module: nn.Module, _inp, out) -> None:
        per_out = module.weight[0].numel()  # in_channels/groups * kernel, or in_features
        n_out = out.numel() // out.shape[0]
        macs, outputs = costs.get(module, (0, 0))
        costs[module] = (macs + n_out * per_out, outputs + n_out)

    layers = [m for m in model.modules() if isinstance(m, _ROOT_TYPES)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return costs


def head_count(module: nn.Module) -> int | None:
    """The number of heads an attention module keeps as a Python int, or None."""
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _attention_linears(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Map each q/k/v-style Linear to its attention module (a module with an int head count)."""
    owners = {}
    for module in model.modules():
        heads = head_count(module)
        if heads is None or isinstance(module, nn.MultiheadAttention):
            continue
        for child in module.children():
            if isinstance(child, nn.Linear) and child.out_features % heads == 0:
                owners[child] = module
    return owners


def _output_layers(dg: tp.DependencyGraph, output_fns: set) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach a model output without passing another such layer
    (directly, or through residual additions to the outputs).

    ``output_fns`` are the grad_fns of the model's outputs. The graph is traced back from the
    outputs, so a node without successors is an output too.
    """
    outputs = []
    for module, node in dg.module2node.items():
        if not isinstance(module, _ROOT_TYPES):
            continue
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if not n.outputs or n.grad_fn in output_fns:
                outputs.append(module)
                break
            for nxt in n.outputs:
                if id(nxt) not in seen and not isinstance(nxt.module, _ROOT_TYPES):
                    seen.add(id(nxt))
                    stack.append(nxt)
    return outputs


def _channel_groups(dg: tp.DependencyGraph, group: tp.Group) -> int:
    """Equal-size channel groups the group's channels form: the least common multiple of
    Torch-Pruning's per-layer channel groups (grouped convolutions, GroupNorm); 1 if none."""
    counts = [1]
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
            continue  # depthwise: pruned channel by channel, as Torch-Pruning does
        pruner = dg.get_pruner_of_module(m)
        if pruner is not None:
            out = dg.is_out_channel_pruning_fn(dep.handler)
            counts.append(pruner.get_out_channel_groups(m) if out
                          else pruner.get_in_channel_groups(m))
    return math.lcm(*counts, _self_coupling(dg, group))


def _self_coupling(dg: tp.DependencyGraph, group: tp.Group) -> int:
    """k for a fused Linear whose output is split into k equal parts combined channel by
    channel (Phi-3's ``gate_up_proj``: gate * up): removing channel i removes i + C/k, ... too,
    so the k parts are channel groups. 1 for every other layer."""
    root, fn = group[0].dep.target.module, group[0].dep.handler
    if not isinstance(root, nn.Linear):
        return 1
    probe = dg.get_pruning_group(root, fn, [0])
    hit = sorted({i for d, idxs in probe if d.target.module is root
                  and dg.is_out_channel_pruning_fn(d.handler) for i in idxs})
    size = len(group[0].idxs)
    k = len(hit)
    return k if k > 1 and size % k == 0 and hit == [j * size // k for j in range(k)] else 1


def _shared_owners(dg: tp.DependencyGraph, group: tp.Group, attn: dict[nn.Module, nn.Module],
                   outputs: bool) -> list[nn.Module]:
    """Attention modules with two or more projections in the group, on their outputs (a head
    group: q/k/v) or on their inputs (the hidden width feeding q/k/v)."""
    count: dict[nn.Module, int] = {}
    for m in dict.fromkeys(d.target.module for d, _ in group
                           if dg.is_out_channel_pruning_fn(d.handler) == outputs):
        if m in attn:
            count[attn[m]] = count.get(attn[m], 0) + 1
    return [o for o, n in count.items() if n >= 2]


def _make_group(dg: tp.DependencyGraph, g: tp.Group, names: dict[nn.Module, str],
                macs: dict[nn.Module, int], total_macs: int,
                attn: dict[nn.Module, nn.Module],
                layouts: dict[nn.Module, AttentionLayout]) -> PrunableGroup:
    root = g[0].dep.target.module
    outs = [d.target.module for d, _ in g if dg.is_out_channel_pruning_fn(d.handler)]
    layers = [d.target.module for d, _ in g if isinstance(d.target.module, nn.Module)]
    uniq = list(dict.fromkeys(m for m in layers if m in names))
    owners = _shared_owners(dg, g, attn, outputs=True)
    touched: dict[nn.Module, tuple[int, int]] = {}  # layer: (dim, channels) losing params
    for d, idxs in g:
        m, dim = d.target.module, (0 if dg.is_out_channel_pruning_fn(d.handler) else 1)
        if m in layouts:  # an attention unit: its projections lose the channels
            lay = layouts[m]
            for proj in ([lay.out] if dim == 0 else dict.fromkeys((lay.q, lay.k, lay.v))):
                touched[proj] = (dim, len(idxs))
        elif m in uniq:
            touched[m] = (dim, len(idxs))
    params = 0
    for m, (dim, g_dim) in touched.items():
        size = _dim_size(m, dim)
        if size:
            params += sum(p.numel() for p in m.parameters(recurse=False)) * g_dim // size
    return PrunableGroup(
        name=names[root],
        coupled=[names[m] for m in uniq],
        producers=[names[m] for m in dict.fromkeys(outs) if isinstance(m, _ROOT_TYPES)],
        channels=len(g[0].idxs),
        params=params,
        flops_share=sum(macs.get(m, 0) for m in touched) / total_macs,
        num_heads=head_count(owners[0]) if owners else None,
        head_owners=[names[o] for o in owners],
        channel_groups=1 if owners else _channel_groups(dg, g),
        tp_group=g,
    )


def _output_coupled(dg: tp.DependencyGraph, output_layers: list[nn.Module],
                    names: dict[nn.Module, str]) -> dict[nn.Module, str]:
    """Layers whose output channels are tied to a model output layer's, and why."""
    reasons = {}
    for out in output_layers:
        pruner = dg.get_pruner_of_module(out)
        g = dg.get_pruning_group(out, pruner.prune_out_channels,
                                 list(range(pruner.get_out_channels(out))))
        for d, _ in g:
            m = d.target.module
            if isinstance(m, _ROOT_TYPES) and m is not out and dg.is_out_channel_pruning_fn(
                    d.handler):
                reasons.setdefault(m, f"its output channels are tied to those of {names[out]}, "
                                      "a model output layer: removing them would change the "
                                      "model's outputs")
    return reasons


def build_groups(
    model: nn.Module, example_inputs: tuple
) -> tuple[tp.DependencyGraph, ModelInspection]:
    """Build the dependency graph and the groups structured pruning may remove."""
    names = {m: n for n, m in model.named_modules()}
    conv1d = [n for m, n in names.items() if is_conv1d(m)]
    if conv1d:
        raise UsageError(
            f"{type(model).__name__} has transformers Conv1D layers ({', '.join(conv1d[:3])}"
            f"{', ...' if len(conv1d) > 3 else ''}), which Torch-Pruning cannot prune. Convert "
            f"them to nn.Linear (same outputs) where the model is built: "
            f"autoprune.prune.conv1d_to_linear_(model).")
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []

    def forward(model: nn.Module, inputs: tuple) -> object:
        out = model(*inputs)
        outputs.extend(tensors(out))
        return out

    layouts = find_attention(model)
    pruner = AttentionPruner(layouts)
    with warnings.catch_warnings(), opaque_attention(model, example_inputs, layouts):
        warnings.simplefilter("ignore")  # TP warns about unwrapped parameters it handles fine
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, forward_fn=forward,
            output_transform=tensors,  # dicts (e.g. a transformers ModelOutput) flattened
            customized_pruners={type(m): pruner for m in layouts})
    add_head_dependencies(dg, pruner, names)
    macs = {m: c[0] for m, c in layer_costs(model, example_inputs).items()}
    total_macs = sum(macs.values()) or 1
    attn = _attention_linears(model)
    output_layers = _output_layers(dg, {t.grad_fn for t in outputs if t.grad_fn is not None})
    with bounded_analysis(dg, names):
        groups, hidden, unprunable, covered = _find_groups(
            dg, model, example_inputs, names, macs, total_macs, attn, output_layers, pruner)
    _mark_whole_groups(groups, dict(model.named_modules()))
    order = {n: i for i, n in enumerate(names.values())}
    for found in (groups, hidden):
        found.sort(key=lambda gr: order[gr.name])
    unprunable.sort(key=lambda u: order[u.name])
    model.train(was_training)
    inspection = ModelInspection(
        groups, unprunable, sum(p.numel() for p in model.parameters()), int(total_macs), hidden)
    return dg, inspection


def _find_groups(dg: tp.DependencyGraph, model: nn.Module, example_inputs: tuple,
                 names: dict[nn.Module, str], macs: dict[nn.Module, int], total_macs: int,
                 attn: dict[nn.Module, nn.Module], output_layers: list[nn.Module],
                 pruner: AttentionPruner) -> tuple[list, list, list, set]:
    """Groups, hidden-width groups, unprunable layers and the layers they cover."""
    groups, hidden, covered, unprunable = [], [], set(), []
    layouts = pruner.layouts
    groups += [_head_group(dg, pruner, lay, names, macs, total_macs)
               for lay in layouts.values() if not lay.whole]
    unprunable += [Unprunable(names[lay.module], lay.whole) for lay in layouts.values()
                   if lay.whole]
    for g in dg.get_all_groups(ignored_layers=output_layers, root_module_types=_ROOT_TYPES):
        group = _make_group(dg, g, names, macs, total_macs, attn, layouts)
        producers = [m for d, _ in g if dg.is_out_channel_pruning_fn(d.handler)
                     and isinstance(m := d.target.module, _ROOT_TYPES)]
        covered.update(producers)
        partial = _partial_copies(dg, g, names)
        fixed = [m for d, _ in g if (m := d.target.module) in layouts and layouts[m].fixed_width]
        if fixed:
            why = (f"its channels are the input width of {names[fixed[0]]}, whose forward "
                   f"reshapes its output to that width: removing them would break it")
            unprunable += [Unprunable(names[m], why) for m in dict.fromkeys(producers)]
        elif partial:
            unprunable += [Unprunable(names[m], partial) for m in dict.fromkeys(producers)]
        elif group.channels % group.channel_groups:
            unprunable += [Unprunable(names[m], f"its {group.channels} channels do not split "
                                                f"into {group.channel_groups} equal groups")
                           for m in dict.fromkeys(producers)]
        elif any(type(o).__module__.startswith("transformers.")
                 for o in _shared_owners(dg, g, attn, outputs=False)
                 + [d.target.module for d, _ in g if d.target.module in layouts]):
            hidden.append(group)
        else:
            groups.append(group)
    for m in output_layers:
        unprunable.append(Unprunable(names[m], "model output layer: its output channels are "
                                               "(or are added into) the model's outputs"))
        covered.add(m)
    tied = _output_coupled(dg, output_layers, names)
    unprunable += [Unprunable(names[m], why) for m, why in tied.items() if m not in covered]
    covered.update(tied)
    for m in dg.module2node:  # pruned as one unit, e.g. nn.MultiheadAttention's out_proj
        if isinstance(m, nn.Module) and not isinstance(m, _ROOT_TYPES):
            covered.update(m.modules())
    missing = [m for m in names if isinstance(m, _ROOT_TYPES) and m not in covered]
    if missing:
        reasons = why_unreached(model, example_inputs, missing)
        unprunable += [Unprunable(names[m], "not reached by the dependency graph: " + reasons[m])
                       for m in missing]
    return groups, hidden, unprunable, covered


def _mark_whole_groups(groups: list[PrunableGroup], modules: dict[str, nn.Module]) -> None:
    """Set ``whole_groups`` on each group made of a grouped conv's outputs whose conv groups can
    go whole: the conv is its only grouped layer, and one group (with no other grouped layer)
    holds all of the conv's inputs, so removing conv group j removes input channels j and
    output channels j and nothing else changes shape."""
    feeding = {}  # grouped conv -> the group holding its input channels
    for g in groups:
        for name in g.coupled:
            m = modules[name]
            if _grouped(m) and name not in g.producers:
                feeding.setdefault(name, []).append(g)
    for g in groups:
        convs = [n for n in g.producers if _grouped(modules[n])]
        if len(convs) != 1 or g.num_heads:
            continue
        conv = modules[convs[0]]
        inputs = feeding.get(convs[0], [])
        if (len(inputs) == 1 and g.channels == conv.out_channels
                and g.channel_groups == conv.groups == inputs[0].channel_groups
                and inputs[0].channels == conv.in_channels and not inputs[0].num_heads
                and not any(_grouped(modules[n]) for n in inputs[0].coupled + g.coupled
                            if n != convs[0])):
            g.whole_groups = (convs[0], inputs[0].name)


def _grouped(m: nn.Module) -> bool:
    """A grouped (not depthwise) convolution."""
    return isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels


def _partial_copies(dg: tp.DependencyGraph, group: tp.Group,
                    names: dict[nn.Module, str]) -> str | None:
    """Why pruning ``group`` would break a layer that takes copies of its channels, or None.

    A layer reached with more indices than the group has channels takes several copies of them
    (a concatenation of the same tensor, e.g. Swin's patch merging); every input of such a
    layer is a copy, so the group must reach all of them. Torch-Pruning sometimes follows only
    some of the copies.
    """
    channels = len(group[0].idxs)
    for dep, idxs in group:
        m = dep.target.module
        if not isinstance(m, nn.Module) or len(idxs) <= channels:
            continue
        size = _dim_size(m, 0 if dg.is_out_channel_pruning_fn(dep.handler) else 1)
        if size and len(idxs) < size:
            return (f"Torch-Pruning follows its {channels} channels into only {len(idxs)} of the "
                    f"{size} channels of {names.get(m, type(m).__name__)}, which concatenates "
                    f"copies of them (e.g. a patch merging): removing them would break that layer")
    return None


def _head_group(dg: tp.DependencyGraph, pruner: AttentionPruner, lay: AttentionLayout,
                names: dict[nn.Module, str], macs: dict[nn.Module, int],
                total_macs: int) -> PrunableGroup:
    """The key/value groups of an attention unit (see ``_attention``): a Torch-Pruning group
    rooted at the unit, which ``dg`` rebuilds for any whole key heads."""
    projections = list(dict.fromkeys((lay.q, lay.k, lay.v)))
    layers = projections + [lay.out]
    params = sum(p.numel() for m in projections for p in m.parameters())
    params += lay.out.weight.numel()  # the output projection's bias stays (hidden width)
    return PrunableGroup(
        name=names[lay.q], coupled=[names[m] for m in layers],
        producers=[names[m] for m in projections], channels=lay.heads * lay.head_dim,
        params=params, flops_share=sum(macs.get(m, 0) for m in layers) / total_macs,
        num_heads=lay.kv_heads, heads_per_unit=lay.group_size,
        tp_group=dg.get_pruning_group(lay.module, pruner.prune_heads,
                                      list(range(lay.heads * lay.head_dim))))


def _dim_size(module: nn.Module, dim: int | None) -> int:
    w = getattr(module, "weight", None)
    if dim is None or w is None:
        return 0
    if w.dim() == 1:  # norm layers: one value per channel
        return w.shape[0]
    if isinstance(module, nn.Embedding):  # its channels are the embedding width, whatever dim
        return w.shape[1]
    if isinstance(module, nn.modules.conv._ConvNd) and dim == 1:
        return w.shape[1] * module.groups
    return w.shape[dim]


def inspect_model(model: nn.Module, example_inputs: tuple) -> ModelInspection:
    """List prunable groups and the layers that cannot be pruned structurally (and why).

    The model is not changed.
    """
    return build_groups(model, example_inputs)[1]
