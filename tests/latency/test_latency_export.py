from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autoprune.errors import ExportError
from autoprune.latency import export_onnx, onnx_digest
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan, baked_copy, has_masks
from autoprune.testing import create_test_model


def _ort_run(onnx_bytes: bytes, *arrays: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, arrays)))


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_tiny", "transformer_tiny"])
def test_export_round_trip_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    model = create_test_model(name).eval()
    inputs = model.example_inputs()
    path = tmp_path / f"{name}.onnx"

    result = export_onnx(model, inputs, path)

    assert result.ok and result.max_abs_diff < 1e-4
    assert result.tolerance >= 1e-4 and result.opset == 17
    assert path.read_bytes() == result.onnx_bytes
    proto = onnx.load_model_from_string(result.onnx_bytes)
    onnx.checker.check_model(proto)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    with torch.no_grad():
        expected = model(*inputs).numpy()
    (got,) = _ort_run(result.onnx_bytes, inputs[0].numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert got.shape == (1, 10)


def test_export_dynamic_batch_runs_other_batch_sizes():
    model = create_test_model("resnet_tiny").eval()
    result = export_onnx(model, model.example_inputs(), dynamic_batch=True)
    x = model.example_inputs(batch=3)[0]
    (got,) = _ort_run(result.onnx_bytes, x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)
    static = export_onnx(model, model.example_inputs())
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _ort_run(static.onnx_bytes, x.numpy())


def test_export_restores_training_mode():
    model = create_test_model("resnet_tiny").train()
    export_onnx(model, model.example_inputs())
    assert model.training


def test_masked_model_is_exported_with_masks_baked_and_left_unchanged():
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    pruned = apply_plan(model, PruningPlan.uniform(0.5, "unstructured"), inputs).eval()
    assert has_masks(pruned)

    result = export_onnx(pruned, inputs)

    assert has_masks(pruned)  # the caller's model keeps its masks (fine-tuning goes on)
    with torch.no_grad():
        expected = pruned(*inputs).numpy()
    (got,) = _ort_run(result.onnx_bytes, inputs[0].numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    baked = baked_copy(pruned)
    assert baked is not pruned and not has_masks(baked)
    weight = baked.stages[0].conv1.weight
    assert 0.45 < float((weight == 0).float().mean()) < 0.55
    assert baked_copy(model) is model  # nothing to bake: no copy


def test_structured_pruned_model_exports_smaller_graph():
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    pruned = apply_plan(model, PruningPlan.uniform(0.5, "structured"), inputs)
    dense = export_onnx(model, inputs)
    small = export_onnx(pruned, inputs)
    assert small.ok
    assert small.size_bytes < 0.5 * dense.size_bytes


class _Cummax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1)[0]


class _ToNumpy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.numpy()  # fails under tracing: the tensor requires grad


class _Net(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.body = nn.Sequential(nn.ReLU(), inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


def test_export_error_names_unsupported_op_and_module():
    with pytest.raises(ExportError) as info:
        export_onnx(_Net(_Cummax()), (torch.randn(1, 4),))
    message = str(info.value)
    assert "'aten::cummax'" in message
    assert "'body.1' (_Cummax)" in message
    assert "test_latency_export.py" in message  # the source line of the call
    assert "Fix:" in message


def test_export_error_names_module_whose_forward_fails():
    with pytest.raises(ExportError) as info:
        export_onnx(_Net(_ToNumpy()), (torch.randn(1, 4),))
    message = str(info.value)
    assert "'body.1' (_ToNumpy)" in message
    assert "numpy()" in message and "Fix:" in message


def test_onnx_digest_ignores_weights_but_not_shapes():
    a = export_onnx(create_test_model("resnet_tiny"), create_test_model("resnet_tiny")
                    .example_inputs()).onnx_bytes
    torch.manual_seed(123)
    other_weights = create_test_model("resnet_tiny")
    b = export_onnx(other_weights, other_weights.example_inputs()).onnx_bytes
    narrow = create_test_model("resnet_tiny", widths=(4, 8, 16))
    c = export_onnx(narrow, narrow.example_inputs()).onnx_bytes
    assert a != b
    assert onnx_digest(a) == onnx_digest(b)
    assert onnx_digest(a) != onnx_digest(c)
