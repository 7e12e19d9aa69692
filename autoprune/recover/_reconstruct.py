"""Layer-wise reconstruction: after channels or heads are removed, refit each layer that read
them so that its outputs match the dense layer's on calibration data (ThiNet, He et al. 2017,
Kwon et al. 2022's least-squares mask tuning, FLAP's bias compensation).

Layers are refit one at a time in forward order, each on the inputs the pruned model itself
feeds it once the layers before it were refit, so later layers absorb earlier errors. Each fit
is ridge regression toward the pruned weights, ``min ||A theta - Y||^2 + lam ||W - W0||^2``
with ``A = [X, 1]``: it never needs the activations stored, only ``A^T A``, ``A^T Y`` and
``|Y|^2``. Every fourth calibration sample is held back; the ridge strength is the one with the
least error on it, among a grid, the bias alone refit, and the pruned layer unchanged, so a
fit never makes a layer worse on held-back data. The result is folded into ordinary weights and
biases: the exported model is a plain model.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from autoprune.augment import with_augmented
from autoprune.nested import tensors
from autoprune.task._contract import _model_device, _to_device, iterate_seeded

__all__ = ["LayerFit", "ReconstructionReport", "reconstruct_", "reconstruct_plan_",
           "calibration_batches"]

# Ridge strengths tried, relative to the mean diagonal of the inputs' Gram matrix.
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
HOLDOUT_EVERY = 4  # every 4th calibration sample is held back to choose the ridge
_KEEP, _BIAS = "keep", "bias"  # candidates besides a ridge: unchanged; bias refit only


@dataclass
class LayerFit:
    """What reconstruction did to one layer. Errors are held-back squared errors against the
    dense layer's outputs, relative to those outputs' squared norm."""

    name: str  # the layer
    error_before: float  # the pruned layer as it was
    error_after: float  # after the refit (equal to error_before if it was kept)
    choice: str  # the ridge chosen ("0.01"), "bias" (bias refit only) or "keep"
    residual: bool = False  # fitted to the dense norm input the layer adds to (see below)


@dataclass
class ReconstructionReport:
    """Every layer reconstruction looked at, and what it cost."""

    fits: list[LayerFit] = field(default_factory=list)  # refit layers, in forward order
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was left alone
    samples: int = 0  # calibration samples (fit and held back)
    seconds: float = 0.0  # wall-clock time


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer's input is captured."""


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}


def _why_not(module: nn.Module) -> str | None:
    if parametrize.is_parametrized(module):
        return "its weights are masked (unstructured) or parametrized"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1:
            return "grouped or depthwise convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} ({module.padding_mode})"
    return None


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(samples, positions, features): the layer's input as regression rows (im2col for a
    convolution, in the order of its flattened weight)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    m = module
    if isinstance(m, nn.Conv1d):  # as a 2-D convolution over a height of one
        return F.unfold(x.unsqueeze(2), (1, m.kernel_size[0]), dilation=(1, m.dilation[0]),
                        padding=(0, m.padding[0]), stride=(1, m.stride[0])).transpose(1, 2)
    return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding,
                    stride=m.stride).transpose(1, 2)


def _out_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """(samples, positions, channels): a layer's output as regression targets."""
    if isinstance(module, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2)


class _Moments:
    """Sums of ``A^T A``, ``A^T Y`` and ``|Y|^2`` over rows, in float64."""

    def __init__(self) -> None:
        self.gram = self.cross = None
        self.yy = 0.0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a, y = a.reshape(-1, a.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        if self.gram is None:
            self.gram, self.cross = a.T @ a, a.T @ y
        else:
            self.gram += a.T @ a
            self.cross += a.T @ y
        self.yy += float(y.square().sum())

    def error(self, theta: torch.Tensor) -> float:
        """``|A theta - Y|^2`` from the moments."""
        return float((theta * (self.gram @ theta)).sum() - 2 * (theta * self.cross).sum()
                     + self.yy)


def _with_bias(a: torch.Tensor, bias: bool) -> torch.Tensor:
    if not bias:
        return a
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)], -1)


def _solve(fit: _Moments, theta0: torch.Tensor, bias: bool, choice: str) -> torch.Tensor | None:
    """Ridge solution toward ``theta0`` (the bias row, if any, is not pulled)."""
    n = fit.gram.shape[0]
    if choice == _KEEP:
        return theta0
    if choice == _BIAS:  # weights kept, bias = mean residual
        theta = theta0.clone()
        rows = fit.gram[-1, -1]
        theta[-1] = (fit.cross[-1] - fit.gram[-1, :-1] @ theta0[:-1]) / rows
        return theta
    lam = float(choice) * float(fit.gram.diagonal()[: n - bias].mean().clamp(min=1e-12))
    reg = torch.full((n,), lam, dtype=torch.float64, device=fit.gram.device)
    if bias:
        reg[-1] = 0.0
    lhs = fit.gram + torch.diag(reg)
    chol, info = torch.linalg.cholesky_ex(lhs)
    if info.item() != 0:
        return None
    return torch.cholesky_solve(fit.cross + reg[:, None] * theta0, chol)


def _fit_layer(name: str, module: nn.Module, fit: _Moments, held: _Moments) -> LayerFit:
    bias = module.bias is not None
    w = module.weight.detach()
    theta0 = w.reshape(w.shape[0], -1).T.double()
    if bias:
        theta0 = torch.cat([theta0, module.bias.detach().double()[None]], 0)
    norm = max(held.yy, 1e-30)
    before = held.error(theta0) / norm
    best = (before, _KEEP, theta0)
    for choice in ((_BIAS,) if bias else ()) + tuple(str(r) for r in RIDGES):
        theta = _solve(fit, theta0, bias, choice)
        if theta is not None and (err := held.error(theta) / norm) < best[0]:
            best = (err, choice, theta)
    after, choice, _ = best
    if choice != _KEEP:
        both = _Moments()
        both.gram, both.cross, both.yy = fit.gram + held.gram, fit.cross + held.cross, 0.0
        theta = _solve(both, theta0, bias, choice)
        if theta is None:  # cannot happen for a ridge that solved on fewer rows; be safe
            return LayerFit(name, before, before, _KEEP)
        with torch.no_grad():
            module.weight.copy_(theta[: theta.shape[0] - bias].T.reshape(w.shape).to(w.dtype))
            if bias:
                module.bias.copy_(theta[-1].to(module.bias.dtype))
    return LayerFit(name, before, after, choice)


def _forward(model: nn.Module, inputs: object) -> None:
    model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, or an RMSNorm by its class name (Llama's, T5's ``T5LayerNorm``)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm"))


class _Capture:
    """While open, :meth:`run` runs the pruned model only as far as it must: to ``layer``'s
    input, or, with a ``sink`` norm, to the sink's input, returning the layer's input and what
    the model adds to the layer's output before the sink (``sink input - layer output``)."""

    def __init__(self, layer: nn.Module, sink: nn.Module | None) -> None:
        self.layer, self.sink, self.handles = layer, sink, []
        self.x = self.y = None

    def __enter__(self) -> _Capture:
        def take_x(_m: nn.Module, args: tuple) -> None:
            self.x = args[0].detach().float()
            if self.sink is None:
                raise _Stop()

        def take_y(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self.y = out.detach().float()

        def stop(_m: nn.Module, args: tuple) -> None:
            raise _Stop(args[0].detach().float())

        self.handles = [self.layer.register_forward_pre_hook(take_x)]
        if self.sink is not None:
            self.handles += [self.layer.register_forward_hook(take_y),
                             self.sink.register_forward_pre_hook(stop)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def run(self, model: nn.Module, inputs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            _forward(model, inputs)
            raise RuntimeError(f"{type(self.layer).__name__} {self.layer} was not reached")
        except _Stop as stop:
            if self.sink is None or stop.args[0].shape != self.y.shape:
                return self.x, None
            return self.x, stop.args[0] - self.y


def _adds_to(model: nn.Module, layer: nn.Module, sink: nn.Module, inputs: object) -> bool:
    """Whether ``sink``'s input is ``layer``'s output plus a term that does not depend on it:
    doubling the layer's output must move the sink's input by exactly that output."""
    with torch.no_grad(), _Capture(layer, sink) as cap:
        _, rest = cap.run(model, inputs)
        y = cap.y
        handle = layer.register_forward_hook(lambda _m, _a, out: out * 2)
        try:
            _, rest2 = cap.run(model, inputs)
        finally:
            handle.remove()
    if rest is None or rest.shape != y.shape:
        return False
    # _Capture saw y before the doubling hook ran, so the sink's input rest + 2y gives rest + y
    return bool(((rest2 - rest - y).norm() <= 1e-4 * (y.norm() + rest.norm())).item())


def reconstruct_(
    pruned: nn.Module,
    dense: nn.Module,
    kept_in: dict[str, list[int]],
    kept_out: dict[str, list[int]],
    batches: Iterable[tuple],
) -> ReconstructionReport:
    """Refit, in place, every layer of ``pruned`` that lost input channels (``kept_in``, from
    :class:`~autoprune.prune.PruneReport`) to match ``dense`` on calibration ``batches`` of
    ``(inputs, targets)``.

    Example:
        >>> report = prune_model_(pruned, plan, inputs)  # doctest: +SKIP
        >>> reconstruct_(pruned, dense, report.kept_in, report.kept_out, batches)  # doctest: +SKIP
    """
    start = time.perf_counter()
    device = _model_device(pruned)
    batches = [_to_device(b[0], device) for b in batches]
    result = ReconstructionReport()
    layers, dense_layers = _layers(pruned), _layers(dense)
    todo = {}
    for name in kept_in:
        if name not in layers:
            continue
        why = _why_not(layers[name])
        if why:
            result.skipped[name] = why
        else:
            todo[name] = layers[name]
    if not todo:
        result.seconds = time.perf_counter() - start
        return result

    # The dense layers' outputs, the channels the pruned layers keep, in forward order (the
    # pruned model runs its layers in the dense model's order); a layer called twice in one
    # pass (shared weights) is left alone. A layer whose output is added to a residual stream
    # just before a normalization (a transformer's attention output and FFN down projection)
    # is fitted to the dense normalization's input instead: it then also absorbs the drift
    # the residual stream carries from earlier layers.
    targets: dict[str, list[torch.Tensor]] = {n: [] for n in todo}
    sums: dict[str, list[torch.Tensor]] = {}  # layer -> the dense norm inputs it feeds
    sink_of: dict[str, str] = {}  # layer -> the norm it feeds
    order: list[str] = []
    calls: dict[str, int] = {}
    last: list[str | None] = [None]  # the last layer that ran, until a norm runs

    def keep_target(name: str):
        def hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            last[0] = name
            if name not in todo:
                return
            calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
            y = _out_rows(module, out.detach().float())
            targets[name].append(y[..., kept_out[name]] if name in kept_out else y)
        return hook

    def see_norm(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            layer, last[0] = last[0], None
            if layer in todo and layer not in kept_out and sink_of.setdefault(layer, name) == name:
                sums.setdefault(layer, []).append(args[0].detach().float())
        return hook

    was = pruned.training, dense.training
    pruned.eval(), dense.eval()
    handles = [m.register_forward_hook(keep_target(n)) for n, m in dense_layers.items()]
    handles += [m.register_forward_pre_hook(see_norm(n))
                for n, m in dense.named_modules() if _is_norm(m)]
    try:
        with torch.no_grad():
            for inputs in batches:
                _forward(dense, inputs)
        for n in list(todo):
            if calls.get(n, 0) != len(batches):
                result.skipped[n] = ("not called in a forward pass" if not calls.get(n) else
                                     "called more than once per forward pass (shared weights)")
                del todo[n]
    finally:
        for h in handles:
            h.remove()

    result.samples = sum(t.shape[0] for t in next(iter(targets.values()))) if targets else 0
    pruned_modules = dict(pruned.named_modules())
    for name in [n for n in order if n in todo]:
        module = todo[name]
        sink = sink_of.get(name)
        if sink is not None and (len(sums[name]) != len(batches) or sink not in pruned_modules
                                 or not _adds_to(pruned, module, pruned_modules[sink],
                                                 batches[0])):
            sink = None
        fit, held = _Moments(), _Moments()
        seen = 0
        dense_y = sums.pop(name) if sink else targets.pop(name)
        with _Capture(module, pruned_modules[sink] if sink else None) as cap:
            with torch.no_grad():
                for inputs, y in zip(batches, dense_y):
                    x, rest = cap.run(pruned, inputs)
                    if sink:  # the residual the pruned model adds, moved to the target
                        y = _out_rows(module, y) - _out_rows(module, rest)
                    a = _with_bias(_rows(module, x), module.bias is not None)
                    index = torch.arange(seen, seen + a.shape[0], device=a.device)
                    held_rows = index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
                    fit.add(a[~held_rows], y[~held_rows])
                    if held_rows.any():
                        held.add(a[held_rows], y[held_rows])
                    seen += a.shape[0]
        targets.pop(name, None), sums.pop(name, None)
        if held.gram is None or fit.gram is None:
            result.skipped[name] = f"too few calibration samples ({seen}) to hold some back"
            continue
        layer_fit = _fit_layer(name, module, fit, held)
        layer_fit.residual = sink is not None
        result.fits.append(layer_fit)
    pruned.train(was[0]), dense.train(was[1])
    result.seconds = time.perf_counter() - start
    return result



def calibration_batches(task: Any, samples: int, seed: int = 0) -> list[tuple]:
    """The task's first training batches, in a seeded order, that hold ``samples`` samples."""
    batches, seen = [], 0
    for batch in iterate_seeded(task.train_data, seed):
        batches.append(batch)
        first = tensors(batch[0])
        seen += first[0].shape[0] if first else 1
        if seen >= samples:
            break
    return batches


def reconstruct_plan_(task: Any, dense: nn.Module, pruned: nn.Module, report: Any,
                      recovery: Any, seed: int = 0) -> ReconstructionReport | None:
    """What a plan's ``recovery`` asks of reconstruction, on ``task``'s calibration samples
    and an augmented copy of each if the task has an ``augment_fn``; None if it is off or no
    layer lost input channels (``report``: the PruneReport)."""
    if not recovery.reconstruct or not report.kept_in:
        return None
    batches = with_augmented(calibration_batches(task, recovery.calibration_samples, seed),
                             task.augment_fn, seed)
    return reconstruct_(pruned, dense, report.kept_in, report.kept_out, batches)
