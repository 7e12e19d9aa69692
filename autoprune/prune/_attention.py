"""Decoder attention (grouped-query, rotary, fused q/k/v) pruned by whole key/value groups.

Llama, Qwen2, Mistral and Phi-3 attention modules keep ``head_dim`` and
``num_key_value_groups`` (query heads per key/value head) and project with ``q_proj``,
``k_proj``, ``v_proj`` (or one fused ``qkv_proj``: queries, then keys, then values) and
``o_proj``. Torch-Pruning cannot follow channels through their rotary embeddings (it never
finishes), so each such module is one unit of its dependency graph: the graph sees only its
input and output width (the model's hidden width), and this module removes heads inside it.
The unit removed is a key/value group: one key head, one value head and the
``num_key_value_groups`` query heads that share them, with their ``o_proj`` inputs. The number
of query heads per key/value head, ``head_dim`` and the rotary dimension stay as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.node import Node

__all__ = ["AttentionLayout", "find_decoder_attention", "opaque_attention", "AttentionPruner",
           "HeadGroup"]

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

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def _layout(module: nn.Module) -> AttentionLayout | None:
    head_dim = getattr(module, "head_dim", None)
    groups = getattr(module, "num_key_value_groups", None)
    if not (isinstance(head_dim, int) and isinstance(groups, int) and head_dim > 0 and groups > 0):
        return None
    children = dict(module.named_children())
    if all(isinstance(children.get(n), nn.Linear) for n in _SEPARATE):
        q, k, v, out = (children[n] for n in _SEPARATE)
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        offsets = (0, 0, 0)
        sizes_ok = q.out_features == heads * head_dim and v.out_features == k.out_features
    elif all(isinstance(children.get(n), nn.Linear) for n in _FUSED):
        q = k = v = children["qkv_proj"]
        out = children["o_proj"]
        heads = out.in_features // head_dim
        kv_heads = (q.out_features - heads * head_dim) // (2 * head_dim)
        offsets = (0, heads * head_dim, (heads + kv_heads) * head_dim)
        sizes_ok = q.out_features == (heads + 2 * kv_heads) * head_dim
    else:
        return None
    if not sizes_ok or kv_heads < 1 or heads != kv_heads * groups:
        return None
    return AttentionLayout(module, q, k, v, out, offsets, heads, kv_heads, head_dim)


def find_decoder_attention(model: nn.Module) -> dict[nn.Module, AttentionLayout]:
    """Every decoder attention module of ``model`` (see the module docstring), in model order."""
    found = {}
    for module in model.modules():
        layout = _layout(module)
        if layout is not None:
            found[module] = layout
    return found


@contextmanager
def opaque_attention(layouts: dict[nn.Module, AttentionLayout]) -> Iterator[None]:
    """While tracing, each attention module computes one element-wise op of its input (same
    shape as its output), so Torch-Pruning sees it as a single node from the hidden width to
    the hidden width and never walks its rotary embeddings."""

    def stand_in(hidden_states, *args, **kwargs):
        return hidden_states * 0.0, None

    for module in layouts:
        module.forward = stand_in
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

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.layouts[layer].out.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.layouts[layer].q.in_features


class HeadGroup(tp.Group):
    """The key/value groups of one attention module as a Torch-Pruning group.

    Its units (root indices) are the key channels, ``kv_heads * head_dim``; the query channels
    and output-projection inputs of the query heads sharing a key head map onto that head's key
    channels, so Torch-Pruning's importance scorers sum them in. ``prune(idxs)`` takes key
    channels that make up whole key heads.
    """

    def __init__(self, layout: AttentionLayout, names: dict[nn.Module, str]):
        super().__init__()
        self.layout = layout
        lay, hd = layout, layout.head_dim
        kv_units = range(lay.kv_heads * hd)
        q_roots = [(h // lay.group_size) * hd + d for h in range(lay.heads) for d in range(hd)]
        out_fn, in_fn = tp.prune_linear_out_channels, tp.prune_linear_in_channels
        self._add(lay.k, out_fn, [lay.offsets[1] + i for i in kv_units], list(kv_units), names)
        self._add(lay.v, out_fn, [lay.offsets[2] + i for i in kv_units], list(kv_units), names)
        self._add(lay.q, out_fn, [lay.offsets[0] + i for i in range(len(q_roots))], q_roots, names)
        self._add(lay.out, in_fn, list(range(len(q_roots))), q_roots, names)

    def _add(self, module: nn.Module, fn, idxs: list[int], roots: list[int],
             names: dict[nn.Module, str]) -> None:
        node = Node(module, None, names.get(module))
        item = _helpers.GroupItem(Dependency(fn, fn, source=node, target=node), idxs)
        item.root_idxs = roots
        self._group.append(item)

    def prune(self, idxs: list[int] | None = None, record_history: bool = False) -> None:
        """Remove the key/value groups whose key channels ``idxs`` lists (whole heads)."""
        lay, hd = self.layout, self.layout.head_dim
        idxs = list(range(lay.kv_heads * hd)) if idxs is None else idxs
        gone = sorted({i // hd for i in idxs})
        if sorted(idxs) != [g * hd + d for g in gone for d in range(hd)]:
            raise ValueError(f"HeadGroup.prune takes whole key heads of {hd} channels, got {idxs}")
        if len(gone) >= lay.kv_heads:
            raise ValueError("HeadGroup.prune cannot remove every key/value group")
        gone_set = set(gone)
        per_module: dict[nn.Module, tuple] = {}
        for item in self._group:
            dep, local = item
            cut = [i for i, r in zip(local, item.root_idxs) if r // hd in gone_set]
            fn, seen = per_module.get(dep.target.module, (dep.handler, []))
            per_module[dep.target.module] = (fn, seen + cut)
        for module, (fn, cut) in per_module.items():
            fn(module, sorted(cut))
        _set_heads(lay, lay.kv_heads - len(gone))

    def __repr__(self) -> str:
        return f"HeadGroup({self.layout.kv_heads} key/value groups of {self.layout.group_size})"


def _set_heads(lay: AttentionLayout, kv_heads: int) -> None:
    """Record the new head counts on the layout, the module and the module's own config."""
    heads = kv_heads * lay.group_size
    attn = lay.module
    for attr, value in (("num_heads", heads), ("num_attention_heads", heads),
                        ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
    config = getattr(attn, "config", None)
    if config is not None and hasattr(config, "num_attention_heads"):
        attn.config = copy.copy(config)  # layers differ now: Phi-3 reads its heads from here
        attn.config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            attn.config.num_key_value_heads = kv_heads
    lay.heads, lay.kv_heads = heads, kv_heads
