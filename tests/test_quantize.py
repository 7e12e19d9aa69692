"""INT8 schemes (static QDQ, dynamic), the metric of the quantized model, and every command
honouring a plan's ``quantize``."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from autoprune import quantize as quantize_module
from autoprune.budget import parse_budget
from autoprune.cli import main
from autoprune.errors import TaskError
from autoprune.latency import export_onnx, load_target
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan
from autoprune.quantize import OrtModule, evaluate_shipped, quantize_model, quantize_onnx
from autoprune.task import load_task
from autoprune.trial import TrialSettings, run_trial

TASK = "autoprune.testing.tasks:synthetic_task"
FAST = {"warmup_runs": 2, "warmup_seconds": 0.0, "min_runs": 5, "min_seconds": 0.0,
        "max_runs": 40, "max_seconds": 0.2}


@pytest.fixture(scope="module")
def task():
    return load_task(TASK)


@pytest.fixture(scope="module")
def pruned(task):
    """resnet_tiny with 25 % of its channels removed (widths 6-12-24-48)."""
    return apply_plan(task.build_model(), PruningPlan.uniform(0.25), task.example_inputs)


def _ops(onnx_model: bytes) -> Counter:
    return Counter(n.op_type for n in onnx.load_model_from_string(onnx_model).graph.node)


def _ort_accuracy(onnx_model: bytes, data) -> float:
    """Accuracy of an ONNX model over ``data``, computed with ONNX Runtime alone."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in data:
        logits = session.run(None, {"input_0": x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return correct / total


def test_static_int8_is_qdq_with_per_channel_weights_and_uint8_activations(task, pruned):
    onnx_model = quantize_model(task, pruned, "int8")
    ops = _ops(onnx_model)
    convs = ops["Conv"]
    assert convs == 9  # resnet_tiny: stem, 3 stages x 2, 2 projection shortcuts
    assert ops["QuantizeLinear"] >= convs and ops["DequantizeLinear"] >= 2 * convs
    graph = onnx.load_model_from_string(onnx_model).graph
    inits = {i.name: i for i in graph.initializer}
    first = next(n for n in graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in graph.node if n.output[0] == first.input[1])
    scale, zero = inits[weight_dq.input[1]], inits[weight_dq.input[2]]
    assert list(scale.dims) == [6]  # one scale per output channel of the pruned stem
    assert zero.data_type == onnx.TensorProto.INT8
    act_q = next(n for n in graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] == "input_0")
    assert inits[act_q.input[2]].data_type == onnx.TensorProto.UINT8
    # Batch dimension dynamic: the calibration and validation batches run on it.
    assert OrtModule(onnx_model)(torch.randn(5, 1, 16, 16)).shape == (5, 10)


def test_dynamic_int8_quantizes_weights_only(task, pruned):
    ops = _ops(quantize_model(task, pruned, "int8-dynamic"))
    assert ops["ConvInteger"] == 9 and ops["DynamicQuantizeLinear"] >= 1
    assert "QuantizeLinear" not in ops


def test_unknown_scheme_and_missing_calibration_are_named(task, pruned):
    fp32 = export_onnx(pruned, task.example_inputs).onnx_bytes
    with pytest.raises(ValueError, match="'int4' is not one of int8, int8-dynamic"):
        quantize_onnx(fp32, "int4")
    with pytest.raises(ValueError, match="static INT8 needs calibration batches"):
        quantize_onnx(fp32, "int8")


def test_ort_module_runs_the_exported_model(task, pruned):
    onnx_model = export_onnx(pruned, task.example_inputs, dynamic_batch=True).onnx_bytes
    x = torch.randn(7, 1, 16, 16)
    with torch.no_grad():
        expected = pruned.eval()(x)
    assert torch.allclose(OrtModule(onnx_model)(x), expected, atol=1e-4)
    # The fp32 ONNX model has the PyTorch model's metric.
    fp32 = evaluate_shipped(task, pruned, None)["accuracy"]
    assert fp32 == evaluate_shipped(task, pruned, onnx_model)["accuracy_fp32"]
    assert evaluate_shipped(task, pruned, onnx_model)["accuracy"] == pytest.approx(fp32, abs=0.01)


def test_the_metric_of_a_quantized_plan_is_the_quantized_models(task, pruned):
    onnx_model = quantize_model(task, pruned, "int8")
    values = evaluate_shipped(task, pruned, onnx_model)
    assert values["accuracy"] == _ort_accuracy(onnx_model, task.val_data)
    assert values["accuracy_fp32"] == task.evaluate(pruned)


def test_an_evaluate_fn_that_cannot_take_an_ort_model_is_named(task, pruned):
    def first_weight_device(model):  # needs parameters: an ONNX Runtime model has none
        return float(next(model.parameters()).device.type == "cpu")

    custom = dataclasses.replace(task, evaluate_fn=first_weight_device)
    shipped = quantize_model(task, pruned, "int8")
    with pytest.raises(TaskError, match=r"evaluate_fn cannot evaluate the quantized model "
                                        r"\(StopIteration.*OrtModule.*quantize: \[none\]"):
        evaluate_shipped(custom, pruned, shipped)
    result = run_trial(custom, PruningPlan.uniform(0.25, quantize="int8"),
                       TrialSettings(targets=[_fast_target()],
                                     finetune=task.finetune.replace(steps=1)))
    assert result.status == "failed" and "cannot evaluate the quantized model" in result.reason
    assert "accuracy" not in result.metrics  # no fp32 number stands in for it


def _fast_target():
    return dataclasses.replace(load_target("cpu-1t"), **FAST)


def _which_model(model) -> float:
    """An evaluate_fn telling which model it was given: 1.0 for ONNX Runtime's."""
    return 1.0 if isinstance(model, OrtModule) else 0.5


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_trial_times_and_evaluates_the_quantized_model(task, monkeypatch, scheme):
    calls = []
    real = quantize_module.quantize_model
    monkeypatch.setattr(quantize_module, "quantize_model",
                        lambda *a: calls.append(a[2]) or real(*a))
    custom = dataclasses.replace(task, evaluate_fn=_which_model)
    settings = TrialSettings(targets=[_fast_target()], finetune=task.finetune.replace(steps=2))
    result = run_trial(custom, PruningPlan.uniform(0.25, quantize=scheme), settings)
    assert result.status == "complete", result.reason
    assert (result.metrics["accuracy"], result.metrics["accuracy_fp32"]) == (1.0, 0.5)
    # Once to time it, once after fine-tuning (new weights) to evaluate it.
    assert calls == [scheme, scheme] and result.timings["quantize"] > 0
    fp32 = run_trial(custom, PruningPlan.uniform(0.25), settings)
    assert fp32.metrics["accuracy"] == 0.5 and "accuracy_fp32" not in fp32.metrics
    assert result.metrics["size_bytes"] < 0.75 * fp32.metrics["size_bytes"]


def test_a_plan_stopped_before_fine_tuning_is_quantized_once(task, monkeypatch):
    calls = []
    real = quantize_module.quantize_model
    monkeypatch.setattr(quantize_module, "quantize_model",
                        lambda *a: calls.append(a[2]) or real(*a))
    settings = TrialSettings(targets=[_fast_target()], budgets=[parse_budget("params<10")])
    dense = PruningPlan(quantize="int8")  # the dense model: evaluated although infeasible
    result = run_trial(task, dense, settings)
    assert result.status == "infeasible" and calls == ["int8"]
    assert result.metrics["accuracy_fp32"] == task.evaluate(task.build_model())
    assert abs(result.metrics["accuracy"] - result.metrics["accuracy_fp32"]) <= 0.02


def test_apply_ships_the_quantized_model_and_its_metric(task, tmp_path, capsys):
    plan = PruningPlan.uniform(0.25, quantize="int8").save(tmp_path / "p.int8.json")
    target = tmp_path / "fast.json"
    target.write_text(json.dumps({"base": "cpu-1t", "name": "fast", **FAST}))
    out = tmp_path / "ship"
    assert main(["apply", str(plan), "--task", TASK, "--output", str(out), "--finetune-steps",
                 "3", "--target", str(target)]) == 0
    assert "accuracy_fp32" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    shipped = (out / "model.onnx").read_bytes()
    assert _ops(shipped)["QuantizeLinear"] > 0
    assert metrics["accuracy"] == _ort_accuracy(shipped, task.val_data)
    assert 0 < metrics["accuracy_fp32"] <= 1 and metrics["size_bytes"] == len(shipped)
    assert PruningPlan.load(out / "plan.json").quantize == "int8"


def test_bench_times_a_quantizing_plan_as_its_quantized_model(tmp_path, monkeypatch, capsys):
    import autoprune.latency

    seen = {}
    real = autoprune.latency.compare_latency

    def spy(models, inputs, target, **kwargs):
        seen.update(kwargs["onnx_models"])
        return real(models, inputs, target, **kwargs)

    monkeypatch.setattr(autoprune.latency, "compare_latency", spy)
    p8 = PruningPlan.uniform(0.5, quantize="int8").save(tmp_path / "P.int8.json")
    p32 = PruningPlan.uniform(0.5).save(tmp_path / "P.fp32.json")
    target = tmp_path / "fast.json"
    target.write_text(json.dumps({"base": "cpu-1t", "name": "fast", **FAST}))
    assert main(["bench", "--task", TASK, "--plan", str(p8), "--plan", str(p32), "--target",
                 str(target)]) == 0
    out = capsys.readouterr().out
    assert f"{p8} (int8)" in out and f"{p32}  " in out
    assert list(seen) == [f"{p8} (int8)"] and _ops(seen[f"{p8} (int8)"])["QuantizeLinear"] > 0


@pytest.mark.slow
def test_static_int8_costs_at_most_half_a_point_on_digits():
    """The dense digits model (trained once and cached; minutes the first time)."""
    digits = load_task("digits")
    model = digits.build_model()
    values = evaluate_shipped(digits, model, quantize_model(digits, model, "int8"))
    assert values["accuracy_fp32"] > 0.98
    assert values["accuracy"] >= values["accuracy_fp32"] - 0.005
    assert np.isfinite(values["accuracy"])


def test_plan_and_summary_show_the_scheme_and_the_fp32_metric_beside_it():
    from autoprune.budget import latency_key
    from autoprune.deployment import deployment_plan, table_rows
    from autoprune.results import RunConfig, summarize
    from autoprune.trial import TrialResult

    lat = latency_key("cpu-1t")
    config = RunConfig(task=TASK, space={"name": "mixed"}, budgets=[],
                       targets=[{"name": "cpu-1t", "spec": "cpu-1t"}],
                       objectives=[{"key": "accuracy", "direction": "maximize"},
                                   {"key": lat, "direction": "minimize"}],
                       metric="accuracy", metric_direction="maximize")
    results = [
        TrialResult(PruningPlan(), "complete", {"accuracy": 0.95, lat: 2.0}, number=0,
                    baseline="dense"),
        TrialResult(PruningPlan(quantize="int8"), "complete",
                    {"accuracy": 0.96, "accuracy_fp32": 0.97, lat: 1.0}, number=1),
    ]
    plan = deployment_plan(config, results)
    header, rows = table_rows(plan)
    row = dict(zip(header, rows[0]))
    assert (row["accuracy"], row["quantize"]) == ("0.9600 (fp32 0.9700)", "int8")
    entry = plan.to_dict()["targets"][0]
    assert (entry["accuracy"], entry["accuracy_fp32"], entry["quantize"]) == (0.96, 0.97, "int8")
    front_rows = [line.split("|")[1:-1] for line in summarize(results, config).splitlines()
                  if line.startswith("| 1 ")]
    assert [(r[2].strip(), r[-1].strip()) for r in front_rows] == [
        ("0.9600 (fp32 0.9700)", "int8")]


def test_a_text_model_ships_with_a_symbolic_sequence_length_and_quantizes_dynamically():
    transformers = pytest.importorskip("transformers")
    from examples.hf_encoder_task import TextEmbedder

    config = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=6, intermediate_size=96)
    torch.manual_seed(0)
    model = TextEmbedder(transformers.BertModel(config)).eval()
    ids = torch.randint(0, 128, (1, 16))
    exported = export_onnx(model, (ids, torch.ones_like(ids)), dynamic_batch=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load_model_from_string(exported.onnx_bytes).graph.input}
    assert dims == {"input_0": ["batch", "sequence"], "input_1": ["batch", "sequence"]}
    shipped = quantize_onnx(exported.onnx_bytes, "int8-dynamic")
    ops = Counter(n.op_type for n in onnx.load_model_from_string(shipped).graph.node)
    assert ops["MatMulInteger"] >= 12  # q, k, v, output and both FFN layers, twice
    short = torch.randint(0, 128, (3, 7))  # another batch size and length than exported
    mask = torch.ones_like(short)
    with torch.no_grad():
        want = model(short, mask)
    for onnx_model, tolerance in ((exported.onnx_bytes, 1e-4), (shipped, 0.2)):
        got = OrtModule(onnx_model)(short, mask)
        assert got.shape == (3, 48)
        assert (got - want).abs().max() < tolerance * want.abs().max()
