"""Attention modules Torch-Pruning cannot trace head by head, pruned here as one unit.

Decoder attention (Llama, Qwen2, Mistral: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``;
Phi-3: one fused ``qkv_proj`` holding queries, then keys, then values) keeps ``head_dim`` and
``num_key_value_groups`` (query heads per key/value head) and applies rotary embeddings, whose
slices and concatenations Torch-Pruning follows forever. Swin's window attention adds a relative
position bias table with one column per head. T5 attention shares one relative position bias,
computed by the first layer, across every layer.

Each such module is one unit of the dependency graph: while the graph is traced, the module
computes one element-wise op of its input, so the graph sees only its input and output width
(the model's hidden width). Heads are removed here: the unit is a key/value group, one key head,
one value head and the query heads sharing them, with their output-projection inputs and their
bias-table columns. ``head_dim``, the query heads per key/value head and the rotary dimension
stay as they were. T5 heads are left whole (the shared bias would have to lose the same heads in
every layer), and so are timm-style ``qkv``/``proj`` modules, whose forward reshapes the heads'
output to the input width (which therefore stays too); the reason is listed with the model's
unprunable layers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.node import Node

__all__ = ["AttentionLayout", "find_attention", "opaque_attention", "AttentionPruner",
           "add_head_dependencies"]

_SEPARATE = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED = ("qkv_proj", "o_proj")


@dataclass
class AttentionLayout:
    """Where the heads of one decoder attention module live."""

    module: nn.Module  # the attention module
    q: nn.Linear  # query projection (the fused projection for fused q/k/v)
    k: nn.Linear  # key projection (the same module as ``q`` when fused)
    v: nn.Linear  # value projection (the same module as ``q`` when fused)
    out: nn.Linear  # output projection: loses the input features of removed heads
    offsets: tuple[int, int, int]  # first output channel of queries, keys, values in q, k, v
    heads: int  # query heads
    kv_heads: int  # key/value heads (= heads without grouped-query attention)
    head_dim: int  # channels per head
    tables: list[tuple[nn.Module, str]] = field(default_factory=list)  # (owner, parameter name)
    # of per-head bias tables: one column (last dim) per query head
    whole: str | None = None  # why the heads are left whole, if they are
    fixed_width: bool = False  # its forward also needs its input width unchanged

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def _heads(q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear, head_dim: int,
           group_size: int) -> tuple[int, int] | None:
    """(query heads, key/value heads) of separate projections, or None if they do not fit."""
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    fits = (q.out_features == heads * head_dim == out.in_features
            and v.out_features == k.out_features == kv_heads * head_dim)
    return (heads, kv_heads) if fits and kv_heads >= 1 and heads == kv_heads * group_size else None


def _decoder_layout(module: nn.Module) -> AttentionLayout | None:
    """Llama/Qwen2/Mistral (separate) and Phi-3 (fused) attention; Swin's window attention."""
    head_dim = getattr(module, "head_dim", None)
    groups = getattr(module, "num_key_value_groups", None)
    bias = getattr(module, "relative_position_bias", None)
    table = getattr(bias, "relative_position_bias_table", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        return None
    if not (isinstance(groups, int) and groups > 0):
        if not isinstance(table, nn.Parameter):  # no rotary and no bias table: TP traces it
            return None
        groups = 1
    tables = [(bias, "relative_position_bias_table")] if isinstance(table, nn.Parameter) else []
    children = dict(module.named_children())
    if all(isinstance(children.get(n), nn.Linear) for n in _SEPARATE):
        q, k, v, out = (children[n] for n in _SEPARATE)
        counts = _heads(q, k, v, out, head_dim, groups)
        if counts is None:
            return None
        return AttentionLayout(module, q, k, v, out, (0, 0, 0), *counts, head_dim, tables)
    if all(isinstance(children.get(n), nn.Linear) for n in _FUSED):
        q = children["qkv_proj"]
        out = children["o_proj"]
        heads = out.in_features // head_dim
        kv_heads = heads // groups
        if q.out_features != (heads + 2 * kv_heads) * head_dim or heads != kv_heads * groups:
            return None
        offsets = (0, heads * head_dim, (heads + kv_heads) * head_dim)
        return AttentionLayout(module, q, q, q, out, offsets, heads, kv_heads, head_dim, tables)
    return None


def _t5_layout(module: nn.Module) -> AttentionLayout | None:
    """T5 attention: one unit, heads left whole (the relative position bias is shared)."""
    heads, head_dim = getattr(module, "n_heads", None), getattr(module, "key_value_proj_dim", None)
    if not (hasattr(module, "has_relative_attention_bias") and isinstance(heads, int)
            and isinstance(head_dim, int)):
        return None
    children = dict(module.named_children())
    if not all(isinstance(children.get(n), nn.Linear) for n in "qkvo"):
        return None
    q, k, v, out = (children[n] for n in "qkvo")
    if _heads(q, k, v, out, head_dim, 1) != (heads, heads):
        return None
    return AttentionLayout(
        module, q, k, v, out, (0, 0, 0), heads, heads, head_dim,
        whole="heads left whole: T5's relative position bias is computed by the first layer and "
              "added in every layer, so one layer's heads cannot be removed alone")


def _thirds_layout(module: nn.Module) -> AttentionLayout | None:
    """GPT-2 attention (``c_attn`` as ``nn.Linear``: queries, keys, values in thirds; ``c_proj``;
    ``num_heads``, ``head_dim`` and ``split_size``)."""
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    qkv, out = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if not (isinstance(heads, int) and isinstance(head_dim, int)
            and isinstance(getattr(module, "split_size", None), int)
            and isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear)):
        return None
    width = heads * head_dim
    if qkv.out_features != 3 * width or out.in_features != width:
        return None  # e.g. cross-attention (keys and values only)
    return AttentionLayout(module, qkv, qkv, qkv, out, (0, width, 2 * width), heads, heads,
                           head_dim)


def _timm_layout(module: nn.Module) -> AttentionLayout | None:
    """timm-style attention (``qkv``: queries, keys, values in thirds; ``proj``; ``num_heads``):
    one unit left whole, hidden width included. Its forward reshapes the heads' output to its
    input width (``reshape(B, N, C)``), so it breaks when either changes."""
    heads, qkv, out = (getattr(module, n, None) for n in ("num_heads", "qkv", "proj"))
    if not (isinstance(heads, int) and heads > 0 and isinstance(qkv, nn.Linear)
            and isinstance(out, nn.Linear)):
        return None
    width = out.in_features
    head_dim = getattr(module, "head_dim", width // heads)
    if (not isinstance(head_dim, int) or width != heads * head_dim
            or qkv.out_features != 3 * width):
        return None
    return AttentionLayout(
        module, qkv, qkv, qkv, out, (0, width, 2 * width), heads, heads, head_dim,
        whole="heads left whole: this attention module (timm's layout: fused qkv, proj) "
              "reshapes its heads' output to its input width, so it cannot lose heads",
        fixed_width=True)


def _layout(module: nn.Module) -> AttentionLayout | None:
    return (_decoder_layout(module) or _thirds_layout(module) or _timm_layout(module)
            or _t5_layout(module))


def find_attention(model: nn.Module) -> dict[nn.Module, AttentionLayout]:
    """Every attention module of ``model`` handled here (see the module docstring), in order."""
    found = {}
    for module in model.modules():
        layout = _layout(module)
        if layout is not None:
            found[module] = layout
    return found


@contextmanager
def opaque_attention(model: nn.Module, example_inputs: tuple,
                     layouts: dict[nn.Module, AttentionLayout]) -> Iterator[None]:
    """While tracing, each attention module returns one element-wise op of its input in place
    of its output (the rest of what it returns, e.g. attention weights or a position bias, as
    one real forward pass of ``example_inputs`` gave it, detached), so Torch-Pruning sees it as
    a single node from the hidden width to the hidden width."""
    rest: dict[nn.Module, tuple] = {}

    def record(module: nn.Module, _inputs, output) -> None:
        rest[module] = tuple(o.detach() if isinstance(o, torch.Tensor) else o
                             for o in output[1:]) if isinstance(output, tuple) else None

    handles = [m.register_forward_hook(record) for m in layouts]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()

    def stand_in(module: nn.Module):
        def forward(hidden_states, *args, **kwargs):
            out = hidden_states * 0.0
            return out if rest[module] is None else (out, *rest[module])
        return forward

    for module in layouts:
        module.forward = stand_in(module)
    try:
        yield
    finally:
        for module in layouts:
            del module.forward  # the class's forward again


class AttentionPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for an opaque attention module: its input channels are the q/k/v
    inputs, its output channels the output projection's outputs (the model's hidden width)."""

    TARGET_MODULES = None

    def __init__(self, layouts: dict[nn.Module, AttentionLayout]):
        super().__init__()
        self.layouts = layouts

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        tp.prune_linear_out_channels(self.layouts[layer].out, idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        lay = self.layouts[layer]
        for proj in dict.fromkeys((lay.q, lay.k, lay.v)):
            tp.prune_linear_in_channels(proj, idxs)
        return layer

    def prune_heads(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        """The root of a key/value-group group: ``idxs`` are the query channels of whole
        key/value groups. The projections lose their channels through the group's other
        dependencies (:func:`add_head_dependencies`); here the bias tables lose the removed
        heads' columns and the head counts are updated."""
        lay = self.layouts[layer]
        width = lay.group_size * lay.head_dim  # query channels per key/value group
        gone = sorted({i // width for i in idxs})
        if sorted(idxs) != [g * width + c for g in gone for c in range(width)]:
            raise ValueError(f"prune_heads takes the query channels of whole key/value groups "
                             f"({width} each), got {idxs}")
        if len(gone) >= lay.kv_heads:
            raise ValueError(f"prune_heads cannot remove all {lay.kv_heads} key/value groups")
        keep = [h for h in range(lay.heads) if h // lay.group_size not in set(gone)]
        for owner, name in lay.tables:
            table = getattr(owner, name)
            setattr(owner, name, nn.Parameter(table.data[..., keep].contiguous(),
                                              requires_grad=table.requires_grad))
        _set_heads(lay, lay.kv_heads - len(gone))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.layouts[layer].out.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.layouts[layer].q.in_features


class _FromQueries:
    """Index mapping from a unit's query channels (root indices) to a projection's channels:
    the same channel (queries, output-projection inputs), or the channel of the key/value head
    the query head shares (keys, values)."""

    def __init__(self, offset: int, head_dim: int, group_size: int, shared: bool):
        self.offset, self.head_dim, self.group_size = offset, head_dim, group_size
        self.shared = shared  # keys and values: one head per group_size query heads

    def __call__(self, idxs: list) -> list:
        mapped = {}  # each channel once (Torch-Pruning counts repeats as removed channels),
        for i in idxs:  # credited to the first query channel that maps to it
            c = i.idx
            if self.shared:
                head, d = divmod(c, self.head_dim)
                c = head // self.group_size * self.head_dim + d
            mapped.setdefault(self.offset + c, i.root_idx)
        return [_helpers._HybridIndex(idx=c, root_idx=r) for c, r in mapped.items()]


def add_head_dependencies(dg: tp.DependencyGraph, pruner: AttentionPruner,
                          names: dict[nn.Module, str]) -> None:
    """Let ``dg`` build the key/value-group group of every attention unit: rooted at the unit
    with :meth:`AttentionPruner.prune_heads` on its query channels, it reaches the output
    projection's inputs, the query channels and the channels of the key and value heads they
    share.

    ``dg.get_pruning_group(unit, pruner.prune_heads, idxs)`` then returns a Torch-Pruning group
    its scorers work on (the output projection comes first, with one entry per root index, as
    they expect) and whose ``prune()`` removes them and updates the head counts. These
    dependencies are triggered only by ``prune_heads``, so no other group reaches them.
    """
    out_fn, in_fn = tp.prune_linear_out_channels, tp.prune_linear_in_channels
    for module, lay in pruner.layouts.items():
        if lay.whole:
            continue
        source = dg.module2node[module]
        targets: dict[nn.Module, Node] = {}  # one node per module: fused parts are merged
        roles = ((lay.out, in_fn, 0, False), (lay.q, out_fn, lay.offsets[0], False),
                 (lay.k, out_fn, lay.offsets[1], True), (lay.v, out_fn, lay.offsets[2], True))
        for proj, fn, offset, shared in roles:
            target = targets.setdefault(proj, Node(proj, None, names.get(proj)))
            dep = Dependency(pruner.prune_heads, fn, source=source, target=target)
            dep.index_mapping[0] = _FromQueries(offset, lay.head_dim, lay.group_size, shared)
            source.dependencies.append(dep)


def _set_heads(lay: AttentionLayout, kv_heads: int) -> None:
    """Record the new head counts on the layout, the module and the module's own config."""
    heads = kv_heads * lay.group_size
    attn = lay.module
    for attr, value in (("num_heads", heads), ("num_attention_heads", heads),
                        ("num_key_value_heads", kv_heads), ("split_size", heads * lay.head_dim)):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
    config = getattr(attn, "config", None)
    if isinstance(getattr(config, "num_attention_heads", None), int):
        attn.config = copy.copy(config)  # layers differ now: Phi-3 reads its heads from here
        attn.config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            attn.config.num_key_value_heads = kv_heads
    lay.heads, lay.kv_heads = heads, kv_heads
