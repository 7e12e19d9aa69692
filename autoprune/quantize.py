"""Post-training INT8 quantization with ONNX Runtime, and the metric of what ships.

A plan's ``quantize`` names the scheme applied to the pruned, exported model:

- ``int8``: static quantization in QDQ format after ORT's pre-processing, per-channel INT8
  weights and UINT8 activations (U8S8, the fast path of ORT's x86 CPU kernels), calibrated
  on the first :data:`CALIBRATION_BATCHES` batches of the task's training data. Convolutions
  run as integer kernels (what it bought on the digits CNN: ``benchmarks/latency_fidelity.py``,
  docs/benchmarks.md#int8); signed activations (S8S8) were slower than fp32 there.
- ``int8-dynamic``: INT8 weights (per output channel), activations quantized on the fly. It
  can pay on MatMul-heavy transformers; on CNNs it is much slower than fp32 (ConvInteger,
  see docs/benchmarks.md#int8).

Whether a scheme pays depends on the target's kernels, so it is measured like any plan, and
the task metric of a quantizing plan is measured on the quantized model itself
(:func:`evaluate_shipped`, an :class:`OrtModule` over ``val_data``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.errors import TaskError
from autoprune.plan import QUANTIZE

__all__ = ["CALIBRATION_BATCHES", "OrtModule", "evaluate_shipped", "quantize_model",
           "quantize_onnx"]

CALIBRATION_BATCHES = 4  # training batches that calibrate static INT8 (256 images on digits)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantization tools log notices on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _input_names(onnx_model: bytes) -> list[str]:
    import onnx

    graph = onnx.load_model_from_string(onnx_model).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def _has_sequence_axis(onnx_model: bytes) -> bool:
    """Whether an input has the symbolic ``sequence`` axis of export_onnx(dynamic_batch=True)."""
    import onnx

    graph = onnx.load_model_from_string(onnx_model).graph
    return any(d.dim_param == "sequence" for i in graph.input
               for d in i.type.tensor_type.shape.dim)


def _as_arrays(inputs: Any) -> list[Any]:
    """A batch's inputs (a tensor or a tuple/list of tensors) as numpy arrays."""
    tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in tensors]


def quantize_onnx(onnx_model: bytes, scheme: str, calibration: Sequence[Any] = ()) -> bytes:
    """Quantize an exported model with ``scheme`` (``int8`` or ``int8-dynamic``).

    Args:
        onnx_model: the fp32 ONNX model (exported with a dynamic batch dimension when the
            calibration batches are larger than the example inputs).
        scheme: ``int8`` (static QDQ, calibrated) or ``int8-dynamic``.
        calibration: ``(inputs, targets)`` batches for ``int8``, e.g.
            ``task.calibration_batches(CALIBRATION_BATCHES)``; ignored by ``int8-dynamic``.

    Returns:
        The quantized ONNX model's bytes.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from autoprune.latency._measure import input_feeds

    if scheme not in QUANTIZE or scheme == "none":
        raise ValueError(f"quantization scheme {scheme!r} is not one of "
                         f"{', '.join(q for q in QUANTIZE if q != 'none')}")
    if scheme == "int8" and not calibration:
        raise ValueError("static INT8 needs calibration batches (task.calibration_batches(4))")
    names = _input_names(onnx_model)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._batches, None)
            return None if batch is None else input_feeds(names, _as_arrays(batch[0]))

    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        src, pre, dst = (Path(tmp) / f"{n}.onnx" for n in ("model", "pre", "int8"))
        src.write_bytes(onnx_model)
        # ORT's symbolic shape inference gives up on a transformer's symbolic sequence
        # length ("Incomplete symbolic shape inference"); ONNX's own inference suffices.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=_has_sequence_axis(onnx_model))
        if scheme == "int8":
            quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        else:
            # Per-channel weights: on the pretrained MiniLM, cosine fidelity 0.992 against
            # 0.960 per tensor, at the same speed (benchmarks/recovery.py int8)
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        return dst.read_bytes()


def quantize_model(task: Any, model: nn.Module, scheme: str) -> bytes:
    """Export ``model`` (masks baked, dynamic batch) and quantize it with ``scheme``,
    calibrated on the task's training data: the ONNX model a quantizing plan ships."""
    from autoprune.latency import export_onnx

    exported = export_onnx(model, task.example_inputs, dynamic_batch=True)
    calibration = task.calibration_batches(CALIBRATION_BATCHES) if scheme == "int8" else ()
    return quantize_onnx(exported.onnx_bytes, scheme, calibration)


class OrtModule(nn.Module):
    """An ONNX model run by ONNX Runtime, called like the PyTorch model it was exported from.

    Takes the model's positional tensor inputs and returns a tensor (a tuple for several
    outputs), so a task's metric function can evaluate the model that ships.

    Example:
        >>> from autoprune.latency import export_onnx
        >>> model = torch.nn.Linear(4, 2).eval()
        >>> onnx_model = export_onnx(model, (torch.randn(1, 4),), dynamic_batch=True).onnx_bytes
        >>> OrtModule(onnx_model)(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, onnx_model: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_model, options,
                                            providers=["CPUExecutionProvider"])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        from autoprune.latency._measure import input_feeds

        names = [i.name for i in self.session.get_inputs()]
        outputs = self.session.run(None, input_feeds(names, _as_arrays(inputs)))
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


def evaluate_shipped(task: Any, model: nn.Module, shipped: bytes | None) -> dict[str, float]:
    """The task metric of what ships, as metrics.

    For an fp32 plan (``shipped`` None) that is ``model``'s metric. For a quantizing plan it
    is the metric of the quantized ONNX model ``shipped`` run by ONNX Runtime over the
    validation data, with ``model``'s (fp32 PyTorch) value beside it as ``<metric>_fp32``.

    Raises:
        TaskError: the task's ``evaluate_fn`` or metric cannot evaluate an ONNX Runtime
            model (it needs more than calling the model on input batches).
    """
    name = task.metric.name
    fp32 = float(task.evaluate(model))
    if shipped is None:
        return {name: fp32}
    try:
        value = float(task.evaluate(OrtModule(shipped)))
    except TaskError:
        raise
    except Exception as e:
        source = "evaluate_fn" if task.evaluate_fn is not None else f"metric {name!r}"
        first = (str(e).splitlines() or [""])[0][:200]
        raise TaskError(
            f"task {task.name!r}: {source} cannot evaluate the quantized model "
            f"({type(e).__name__}: {first}). A quantized plan's {name} is measured on the "
            f"ONNX model that ships, passed as autoprune.quantize.OrtModule: a module called "
            f"on a batch's input tensors that returns the outputs, with no parameters or "
            f"submodules; make the evaluation only call the model, or search with quantize: "
            f"[none] ({name} of the fp32 model: {fp32:.4g})") from e
    return {name: value, f"{name}_fp32": fp32}
