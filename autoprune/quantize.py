"""Post-training dynamic INT8 quantization with ONNX Runtime: a search dimension."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

__all__ = ["quantize_dynamic_int8"]


def quantize_dynamic_int8(onnx_model: bytes) -> bytes:
    """Quantize weights to INT8 (activations quantized on the fly); returns the new ONNX bytes.

    Whether this is faster depends on the target's kernels, so it is measured like any plan.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        src.write_bytes(onnx_model)
        root.setLevel(logging.ERROR)  # ORT warns on root: "consider pre-processing" each call
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        return dst.read_bytes()
