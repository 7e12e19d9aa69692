"""Why a layer is missing from Torch-Pruning's dependency graph, naming the op that stopped it.

Torch-Pruning builds its graph by following autograd back from the model's outputs. A layer
is missing when it is never called as a module, or when everything it computes reaches the
outputs only through ops without a gradient (``argmax``, ``detach``, comparisons, ``item``)
or not at all. One traced forward pass finds which.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from autoprune.nested import tensors

__all__ = ["tensors", "why_unreached"]

_ESCAPES = ("item", "tolist", "numpy")  # ops taking a tensor's values out of autograd


def _op_name(func: object) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    qualname = getattr(func, "__qualname__", "") or ""
    module = getattr(func, "__module__", None) or ""
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if module.startswith("torch._C._nn"):
        return f"torch.nn.functional.{name}"
    return f"{module}.{name}" if module else name


class _Follow(TorchFunctionMode):
    """Follows the outputs of ``layers`` op by op and records where gradients stop."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.weights = {id(m.weight): m for m in layers if isinstance(m.weight, torch.Tensor)}
        self.followed: dict[int, tuple[torch.Tensor, set[nn.Module]]] = {}  # id -> (t, layers)
        self.stopped: dict[nn.Module, str] = {}  # layer -> first op its outputs lose gradients in
        self.weight_users: dict[nn.Module, str] = {}  # layer -> first op using its weight
        self.called: set[nn.Module] = set()  # layers called as modules
        self.no_grad: set[nn.Module] = set()  # layers whose output has no autograd history

    def follow(self, module: nn.Module, output: object) -> None:
        self.called.add(module)
        for t in tensors(output):
            if t.grad_fn is None:
                self.no_grad.add(module)
            else:
                self.followed[id(t)] = (t, {module})

    def origins(self, tensors: Iterable[torch.Tensor]) -> set[nn.Module]:
        found: set[nn.Module] = set()
        for t in tensors:
            entry = self.followed.get(id(t))
            if entry is not None and entry[0] is t:
                found |= entry[1]
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = tensors((args, kwargs))
        for t in inputs:
            if id(t) in self.weights:
                self.weight_users.setdefault(self.weights[id(t)], _op_name(func))
        origins = self.origins(inputs)
        if origins:
            outputs = tensors(result)
            with_grad = [t for t in outputs if t.grad_fn is not None]
            for t in with_grad:
                self.followed[id(t)] = (t, origins | self.followed.get(id(t), (t, set()))[1])
            escapes = not outputs and getattr(func, "__name__", "") in _ESCAPES
            if (outputs and not with_grad) or escapes:
                for layer in origins:
                    self.stopped.setdefault(layer, _op_name(func))
        return result


def why_unreached(
    model: nn.Module, example_inputs: tuple, layers: list[nn.Module]
) -> dict[nn.Module, str]:
    """For each layer, why Torch-Pruning's graph does not reach it (one traced forward pass)."""
    mode = _Follow(layers)
    handles = [m.register_forward_hook(lambda m, _i, out: mode.follow(m, out)) for m in layers]
    try:
        with torch.enable_grad(), mode:
            outputs = tensors(model(*example_inputs))
    finally:
        for h in handles:
            h.remove()
    reaching = mode.origins(outputs)
    reasons = {}
    for layer in layers:
        if layer not in mode.called:
            used = mode.weight_users.get(layer)
            reasons[layer] = (
                f"never called as a module: its weight is used directly by {used}; call the "
                "module instead" if used else
                "never called in forward on the example inputs (unused, or skipped by a branch)")
        elif layer in mode.no_grad:
            reasons[layer] = ("its output has no gradient (computed under torch.no_grad() or "
                              "with frozen weights and inputs); Torch-Pruning follows autograd")
        elif layer in mode.stopped and layer not in reaching:
            reasons[layer] = (f"its output reaches the model's outputs only through "
                              f"{mode.stopped[layer]}, which has no gradient (Torch-Pruning "
                              "follows autograd)")
        elif layer not in reaching:
            reasons[layer] = "its output is not used by the model's outputs"
        else:
            reasons[layer] = ("reached by autograd, but Torch-Pruning built no group for it "
                              "(please report the model)")
    return reasons
