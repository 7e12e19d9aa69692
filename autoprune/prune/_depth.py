"""Depth: whole residual blocks of a model's main stack replaced by a pass-through.

A transformer layer (or a residual CNN block that keeps its input's shape) adds its output to
the residual stream, so the model still runs without it: the block's input goes on unchanged.
Removing one also removes what width pruning cannot touch (a layer's softmax, norms and
reshapes), which is most of an INT8 encoder's time. The blocks are those of the main stack
(:func:`autoprune.recover.main_blocks`); which ones go is ranked on calibration data by how
little the model's outputs move without them (ShortGPT's block influence, measured on the
outputs instead of one block's input and output, and greedily: each next block is scored with
the ones before it already gone).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from autoprune.errors import PlanError
from autoprune.nested import tensors

__all__ = ["PassThrough", "droppable_blocks", "drop_blocks_", "rank_blocks"]


class PassThrough(nn.Module):
    """Stands in for a dropped block: returns the block's hidden-state input, in the form the
    block returned its output (a tensor, or a tuple whose first element it is).

    Example:
        >>> PassThrough(arg=0, tuple_len=0)(torch.ones(2), "mask").shape
        torch.Size([2])
    """

    dropped_block = True  # main_blocks() still counts it in its stack

    def __init__(self, arg: int | str, tuple_len: int, block: str = ""):
        super().__init__()
        self.arg = arg  # positional index or keyword of the hidden states
        self.tuple_len = tuple_len  # 0: the block returned a tensor
        self.block = block  # the class of the block it replaced (shown by print(model))

    def forward(self, *args: object, **kwargs: object) -> object:
        hidden = kwargs[self.arg] if isinstance(self.arg, str) else args[self.arg]
        if not self.tuple_len:
            return hidden
        return (hidden,) + (None,) * (self.tuple_len - 1)

    def extra_repr(self) -> str:
        return f"dropped {self.block}" if self.block else "dropped"


def _calls(model: nn.Module, blocks: dict[str, nn.Module], example_inputs: tuple
           ) -> dict[str, tuple[tuple, dict, object]]:
    """Each block's (args, kwargs, output) on one forward pass of ``example_inputs``."""
    seen: dict[str, tuple[tuple, dict, object]] = {}

    def keep(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            seen.setdefault(name, (args, kwargs, out))
        return hook

    handles = [m.register_forward_hook(keep(n), with_kwargs=True) for n, m in blocks.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen


def _pass_through(call: tuple[tuple, dict, object] | None, block: nn.Module
                  ) -> PassThrough | str:
    """The pass-through for a block, or why the block cannot be dropped."""
    if call is None:
        return "not called in a forward pass"
    args, kwargs, out = call
    first = tensors(out)
    if not first:
        return "returns no tensor"
    if not isinstance(out, (torch.Tensor, tuple)):
        return f"returns a {type(out).__name__}, not a tensor or a tuple"
    if isinstance(out, tuple) and out[0] is not first[0]:
        return "its first output is not a tensor"
    candidates = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
    arg = next((k for k, a in candidates if isinstance(a, torch.Tensor)
                and a.shape == first[0].shape and a.dtype == first[0].dtype), None)
    if arg is None:
        return (f"changes its input's shape (output {tuple(first[0].shape)}): the model does "
                "not run without it")
    return PassThrough(arg, len(out) if isinstance(out, tuple) else 0, type(block).__name__)


def _made(model: nn.Module, names: list[str], example_inputs: Sequence[torch.Tensor]
          ) -> dict[str, PassThrough | str]:
    """A pass-through, or why there is none, for each named block."""
    modules = dict(model.named_modules())
    blocks = {n: modules[n] for n in names}
    calls = _calls(model, blocks, tuple(example_inputs))
    return {n: _pass_through(calls.get(n), b) for n, b in blocks.items()}


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name``; return what was there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old


def droppable_blocks(model: nn.Module, example_inputs: Sequence[torch.Tensor]
                     ) -> dict[str, str | None]:
    """The main stack's blocks, each with None if it can be dropped or the reason it cannot.

    Example:
        >>> from autoprune.testing import create_test_model
        >>> m = create_test_model("transformer_tiny")
        >>> droppable_blocks(m, m.example_inputs())
        {'layers.0': None, 'layers.1': None}
    """
    from autoprune.recover import main_blocks

    made = _made(model, main_blocks(model), example_inputs)
    return {n: m if isinstance(m, str) else None for n, m in made.items()}


def drop_blocks_(model: nn.Module, names: Iterable[str],
                 example_inputs: Sequence[torch.Tensor]) -> None:
    """Replace the named blocks of ``model``'s main stack by pass-throughs, in place.

    Raises:
        PlanError: a name is not a block of the main stack, or the block cannot be dropped
            (the message says why), or no block would be left.
    """
    from autoprune.recover import main_blocks

    names = list(names)
    if not names:
        return
    stack = main_blocks(model)
    for name in names:
        if name not in stack:
            raise PlanError(
                f"drop_blocks: {name!r} is not a block of the model's main stack; its blocks "
                f"are {', '.join(stack) or 'none'} (`autoprune layers` lists them)")
    if len(set(names)) >= len(stack):
        raise PlanError(f"drop_blocks: all {len(stack)} blocks of the main stack would go; "
                        "keep at least one")
    made = _made(model, names, example_inputs)
    for name, module in made.items():
        if isinstance(module, str):
            raise PlanError(f"drop_blocks: block {name!r} cannot be dropped: {module}")
    for name, module in made.items():
        _swap(model, name, module)


def rank_blocks(model: nn.Module, batches: Sequence[tuple], most: int) -> list[str]:
    """Up to ``most`` droppable blocks of the main stack, in the order they should go: each the
    one whose removal (with those before it) moves the model's outputs least, in relative
    squared error over calibration ``batches`` of ``(inputs, targets)``. ``model`` is left as
    it was."""
    from autoprune.recover import main_blocks

    def args(b: tuple) -> tuple:
        return tuple(b[0]) if isinstance(b[0], (tuple, list)) else (b[0],)

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            return [tensors(model(*args(b)))[0].float() for b in batches]

    was = model.training
    model.eval()
    made = {n: m for n, m in _made(model, main_blocks(model), args(batches[0])).items()
            if not isinstance(m, str)}
    dense = outputs()
    scale = max(sum(float(d.pow(2).sum()) for d in dense), 1e-12)
    order: list[str] = []
    try:
        while len(order) < min(most, len(made) - 1):
            errors = {}
            for name, through in made.items():
                if name in order:
                    continue
                block = _swap(model, name, through)
                try:
                    got = outputs()
                finally:
                    _swap(model, name, block)
                errors[name] = sum(float((g - d).pow(2).sum()) for g, d in zip(got, dense)) / scale
            best = min(errors, key=errors.get)
            order.append(best)
            made[best] = _swap(model, best, made[best])  # gone while the next one is scored
    finally:
        for name in order:  # put the dropped blocks back
            made[name] = _swap(model, name, made[name])
        model.train(was)
    return order
