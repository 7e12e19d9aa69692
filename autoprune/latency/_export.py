"""PyTorch -> ONNX export, validated against ONNX Runtime on the example input."""

from __future__ import annotations

import inspect
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.errors import ExportError
from autoprune.nested import tensors

__all__ = ["ExportResult", "export_onnx", "onnx_digest"]

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    """An exported ONNX model and how closely ONNX Runtime reproduces PyTorch on it.

    Example:
        >>> from autoprune.testing import create_test_model
        >>> model = create_test_model("resnet_tiny")
        >>> result = export_onnx(model, model.example_inputs())
        >>> result.ok, result.max_abs_diff < result.tolerance
        (True, True)
    """

    onnx_bytes: bytes = field(repr=False)  # the serialized ONNX model
    path: Path | None  # where the model was written, if a path was given
    opset: int  # ONNX opset the model was exported with
    input_names: tuple[str, ...]  # graph input names, in the order of the example inputs
    output_names: tuple[str, ...]  # graph output names
    max_abs_diff: float  # max |ORT - PyTorch| over all outputs on the example input
    tolerance: float  # the allowed max_abs_diff (atol + rtol * max |PyTorch output|)
    dynamic_batch: bool  # whether dim 0 (and dim 1 of token inputs) is symbolic

    @property
    def ok(self) -> bool:
        """True when ONNX Runtime matched PyTorch within ``tolerance``."""
        return self.max_abs_diff <= self.tolerance

    @property
    def size_bytes(self) -> int:
        return len(self.onnx_bytes)


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` to ONNX and check ONNX Runtime against PyTorch on ``example_inputs``.

    Uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). A model that
    still carries unstructured pruning masks is exported from a deep copy with masks baked;
    ``model`` itself is never changed (its train/eval mode is restored).

    Args:
        model: the (pruned) model.
        example_inputs: the tensors the model is called with.
        path: if given, the ONNX file is also written there.
        opset: ONNX opset version (pinned; 17 by default).
        dynamic_batch: make dim 0 of every input and output symbolic, and dim 1 of every
            integer input of rank 2 (token ids, attention masks): text batches vary in
            length, so a text model serves them only with a symbolic sequence length.
        check: raise :class:`ExportError` when ORT and PyTorch differ by more than the
            tolerance ``atol + rtol * max|PyTorch output|``.
        rtol: relative part of the tolerance.
        atol: absolute part of the tolerance.

    Returns:
        An :class:`ExportResult` with the ONNX bytes and the measured max abs difference.

    Raises:
        ExportError: the exporter failed (the message names the op and module) or ORT's
            output does not match PyTorch's.
    """
    inputs = _as_tuple(example_inputs)
    from autoprune.prune import baked_copy

    source = baked_copy(model)
    input_names = tuple(f"input_{i}" for i in range(len(inputs)))
    was_training = source.training
    source.eval()
    try:
        with torch.no_grad():
            reference = tensors(source(*inputs))
        output_names = tuple(f"output_{i}" for i in range(len(reference)))
        dynamic_axes = (
            {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        )
        if dynamic_batch:
            for name, t in zip(input_names, inputs):
                if t.dim() == 2 and not t.is_floating_point():
                    dynamic_axes[name][1] = "sequence"
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarning / legacy-exporter notices
                torch.onnx.export(
                    _ExampleInputsOnly(source) if _has_defaulted_args(source, inputs)
                    else source,
                    inputs,
                    buffer,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as exc:  # every exporter failure becomes ExportError
            raise ExportError(_describe_failure(exc, source, inputs, opset)) from exc
    finally:
        source.train(was_training)
    onnx_bytes = buffer.getvalue()

    max_diff = _ort_max_abs_diff(onnx_bytes, input_names, inputs, reference)
    scale = max((float(r.abs().max()) for r in reference if r.numel()), default=0.0)
    tolerance = atol + rtol * scale
    if check and not max_diff <= tolerance:
        raise ExportError(
            f"ONNX Runtime output differs from PyTorch by {max_diff:.3g} (tolerance "
            f"{tolerance:.3g}) for {type(model).__name__} at opset {opset}. Some op is "
            "exported with different semantics; export with check=False to inspect the "
            "model, or try another opset."
        )
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(onnx_bytes)
    return ExportResult(
        onnx_bytes=onnx_bytes,
        path=path,
        opset=opset,
        input_names=input_names,
        output_names=output_names,
        max_abs_diff=max_diff,
        tolerance=tolerance,
        dynamic_batch=dynamic_batch,
    )


def onnx_digest(onnx_model: bytes) -> str:
    """A short hash of an ONNX graph's structure and shapes, ignoring initializer values."""
    import hashlib

    import onnx

    proto = onnx.load_model_from_string(onnx_model)
    for init in proto.graph.initializer:
        dims = list(init.dims)
        init.Clear()
        init.dims.extend(dims)
    proto.ClearField("producer_version")
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()[:16]


class _ExampleInputsOnly(nn.Module):
    """Calls the model with the example inputs only. The TorchScript exporter passes every
    defaulted ``forward`` parameter positionally, which `transformers` models reject
    (``got multiple values for argument 'use_cache'``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> object:
        return self.model(*inputs)


def _has_defaulted_args(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is not p.empty for p in params[len(inputs):])


def _as_tuple(example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _ort_max_abs_diff(
    onnx_bytes: bytes,
    input_names: tuple[str, ...],
    inputs: tuple[torch.Tensor, ...],
    reference: list[torch.Tensor],
) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            onnx_bytes, options, providers=["CPUExecutionProvider"]
        )
        # Inputs the exporter found unused are dropped from the graph.
        graph_inputs = {i.name for i in session.get_inputs()}
        feeds = {
            n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs) if n in graph_inputs
        }
        outputs = session.run(None, feeds)
    except Exception as exc:
        raise ExportError(
            f"the exported ONNX model does not run in ONNX Runtime: {_first_line(exc)}. "
            "Try another opset, or replace the op ORT rejects."
        ) from exc
    if len(outputs) != len(reference):
        raise ExportError(
            f"ONNX model has {len(outputs)} outputs but PyTorch returned {len(reference)}"
        )
    diff = 0.0
    for got, want in zip(outputs, reference):
        want = want.detach().cpu().numpy()
        if got.shape != want.shape:
            raise ExportError(
                f"ONNX output shape {got.shape} differs from PyTorch shape {want.shape}"
            )
        if want.size:
            diff = max(diff, float(np.max(np.abs(got.astype(np.float64) - want))))
    return diff


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300].rstrip(".")


_OP_PATTERN = re.compile(r"operator '([\w:.]+)'")


def _describe_failure(
    exc: BaseException, model: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int
) -> str:
    """A message naming the op and the module that failed, and what to do about it."""
    reason = _first_line(exc)
    match = _OP_PATTERN.search(str(exc))
    if match:
        op = match.group(1)
        where = _locate_op(model, inputs, op)
        return (
            f"cannot export {type(model).__name__} to ONNX: operator {op!r} is not supported "
            f"at opset {opset}{where}. Fix: replace that op with supported ones in the "
            "module's forward, try a higher opset, or register a symbolic with "
            "torch.onnx.register_custom_op_symbolic."
        )
    where = _locate_forward_failure(model, inputs)
    return (
        f"cannot export {type(model).__name__} to ONNX{where}: {type(exc).__name__}: {reason}. "
        "Fix: make the forward traceable (tensor inputs/outputs, no data-dependent Python "
        "control flow or unsupported ops), or leave this model out of latency measurement."
    )


def _module_label(model: nn.Module, fqn: str) -> str:
    try:
        module = model.get_submodule(fqn)
    except AttributeError:
        return repr(fqn)
    return f"{fqn or '<root>'!r} ({type(module).__name__})"


def _locate_op(model: nn.Module, inputs: tuple[torch.Tensor, ...], op: str) -> str:
    """', used in module 'a.b' (Type) at file.py:12' for the first node of kind ``op``."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, inputs, check_trace=False, strict=False)
        for node in traced.inlined_graph.nodes():
            if node.kind() != op:
                continue
            scope = node.scopeName().split("/")[-1]
            fqn = scope.removeprefix("__module.").removeprefix("__module")
            text = f", used in module {_module_label(model, fqn)}"
            source = node.sourceRange().splitlines()[0] if node.sourceRange() else ""
            loc = re.match(r"(.+)\((\d+)\): (\w+)", source)
            if loc:
                text += f" at {loc.group(1)}:{loc.group(2)} in {loc.group(3)}()"
            return text
    except Exception:  # locating is best effort; the op name is still given
        pass
    return ""


def _locate_forward_failure(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """' (in module 'a.b' (Type))' for the innermost module whose forward raises under trace."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    failed: list[str] = []

    def pre(module: nn.Module, args: object) -> None:
        stack.append(names.get(module, "?"))

    def post(module: nn.Module, args: object, out: object) -> None:
        stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, inputs, check_trace=False, strict=False)
    except Exception:
        failed = list(stack)
    finally:
        for h in handles:
            h.remove()
    if not failed:
        return ""
    return f" (in module {_module_label(model, failed[-1])})"
