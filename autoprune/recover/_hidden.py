"""Hidden-state distillation (TinyBERT, Jiao et al. 2020; CoFi, Xia et al. 2022): each block's
output pulled toward the dense model's, next to the task's own loss.

The blocks are the children of the model's main stack: the ``ModuleList`` or ``Sequential`` of
two or more modules of one class that holds the most parameters (a transformer's layers, a
CNN's stages), dropped blocks (:class:`autoprune.prune.PassThrough`) included. Only blocks
whose outputs keep the dense model's shape are distilled; a CNN block whose output channels
were pruned is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from autoprune.nested import tensors

__all__ = ["main_blocks", "capture_blocks", "hidden_loss"]


def main_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of ``model``'s main stack ([] if it has none).

    Example:
        >>> from autoprune.testing import create_test_model
        >>> main_blocks(create_test_model("transformer_tiny"))[:1]
        ['layers.0']
    """
    best, best_params = [], 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        kinds = {type(c) for _, c in children if not getattr(c, "dropped_block", False)}
        if len(children) < 2 or len(kinds) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            prefix = f"{name}." if name else ""
            best, best_params = [prefix + n for n, _ in children], params
    return best


@contextmanager
def capture_blocks(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, every forward pass of ``model`` leaves the first tensor output of each named
    block in the yielded dict."""
    found: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def keep(name: str):
        def hook(_module: nn.Module, _args: tuple, out: object) -> None:
            first = tensors(out)
            if first:
                found[name] = first[0]
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names if n in modules]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def hidden_loss(student: dict[str, torch.Tensor],
                teacher: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean over blocks of the squared error to the dense block's output, relative to that
    output's mean square (each block weighs the same); None if no block has a like-shaped
    output."""
    losses = [
        (s.float() - t.float()).square().mean() / t.float().square().mean().clamp(min=1e-12)
        for name, s in student.items()
        if (t := teacher.get(name)) is not None and t.shape == s.shape
    ]
    return torch.stack(losses).mean() if losses else None
