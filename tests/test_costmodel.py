import random

import pytest

from autoprune.budget import latency_key
from autoprune.costmodel import CostModel, CostStructure
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import apply_plan, inspect_model
from autoprune.stats import model_stats
from autoprune.testing import create_test_model


def _structure(name: str):
    model = create_test_model(name)
    example = model.example_inputs()
    dense = model_stats(model, example)
    reference = {"macs": dense.macs, "params": dense.params, "size_bytes": dense.size_bytes}
    return model, example, CostStructure.from_model(model, example,
                                                    inspect_model(model, example), reference)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_tiny", "densenet_tiny"])
def test_structure_predicts_macs_params_and_size_of_random_plans(name):
    model, example, structure = _structure(name)
    groups = list(structure.units)
    rng = random.Random(0)
    for _ in range(4):
        plan = PruningPlan(rules={g: LayerRule("structured", round(rng.uniform(0, 0.8), 2))
                                  for g in groups})
        measured = model_stats(apply_plan(model, plan, example), example)
        predicted = structure.features(plan)
        assert predicted["macs"] == pytest.approx(measured.macs, rel=0.01)
        assert predicted["params"] == pytest.approx(measured.params, rel=0.001)
        assert predicted["size_bytes"] == pytest.approx(measured.size_bytes, rel=0.001)


def test_unstructured_and_skipped_rules_cost_the_dense_model():
    _, _, structure = _structure("resnet_tiny")
    dense = structure.features(PruningPlan())
    zeroed = structure.features(PruningPlan(default=LayerRule("unstructured", 0.8)))
    assert zeroed["macs"] == dense["macs"] and zeroed["params"] == dense["params"]
    assert structure.kept(PruningPlan(default=LayerRule("structured", 0.5))) == dict.fromkeys(
        structure.units, 0.5)


@pytest.mark.parametrize("block", [16, 8, 1])
def test_latency_fit_learns_the_machine_s_conv_block_and_a_quantization_factor(block):
    _, _, structure = _structure("resnet_tiny")
    key = latency_key("cpu")
    model = CostModel(structure, ["cpu"])
    rng = random.Random(0)
    plans = [PruningPlan(rules={g: LayerRule("structured", rng.choice([0, 0.25, 0.5, 0.625]))
                                for g in structure.units}) for _ in range(12)]

    def truth(plan: PruningPlan) -> float:  # a known machine: 0.05 ms + 2 ns per blocked MAC,
        f = structure.features(plan)  # 6 ns more per MAC of a conv off the blocked layout
        return 0.05 + 2e-6 * f[f"lat_macs/{block}"] + 6e-6 * f[f"lat_fallback/{block}"]

    for plan in plans:
        model.observe(plan, {key: truth(plan)})
    assert model._fits[key].block == block
    probes = [PruningPlan(default=LayerRule("structured", s)) for s in (0.25, 0.6)]
    for probe in probes:
        assert model.predict(probe)[key] == pytest.approx(truth(probe), rel=0.01)
    def int8_truth(plan: PruningPlan) -> float:  # quantized convs: no slower float paths
        return 0.5 * (0.05 + 2e-6 * structure.features(plan)[f"lat_macs/{block}"])

    int8 = PruningPlan(default=LayerRule("structured", 0.25), quantize="int8")
    model.observe(int8, {key: int8_truth(int8)})
    probe = probes[1]
    int8_probe = PruningPlan(default=LayerRule("structured", 0.6), quantize="int8")
    assert model.predict(int8_probe)[key] == pytest.approx(int8_truth(int8_probe), rel=0.01)
    assert model.predict(probe)[key] == pytest.approx(truth(probe), rel=0.01)


def test_latency_features_follow_the_cpu_convolution_paths():
    # resnet_tiny's stages.2.conv2 reads the 32 channels of stages.2.conv1: a 2-D conv runs
    # blocked on whole blocks of input channels, directly below one block, else it falls back
    _, _, structure = _structure("resnet_tiny")
    conv = next(layer for layer in structure.layers if layer.name == "stages.2.conv2")
    for block, kept, path in ((16, 32, None), (16, 24, "lat_fallback"), (16, 16, None),
                              (16, 8, "lat_direct"), (8, 24, None), (8, 12, "lat_fallback"),
                              (8, 8, None), (8, 4, "lat_direct")):
        assert conv.kernel({"stages.2.conv1": kept / 32}, block) == (kept / 32, path)
    fc = next(layer for layer in structure.layers if layer.name == "fc")  # a GEMM: blocks of 8
    assert fc.kernel({"stages.2.shortcut.0": 20 / 32}, 16) == (24 / 32, None)
    dense = structure.features(PruningPlan())
    assert dense["lat_fallback/16"] == dense["lat_fallback_acts/16"] == 0
    fallback = structure.features(
        PruningPlan(rules={"stages.2.conv1": LayerRule("structured", 0.25)}))
    assert fallback["lat_fallback/16"] == pytest.approx(0.75 * conv.macs)
    assert fallback["lat_fallback_acts/16"] == conv.activations
    assert fallback["lat_fallback/8"] == 0  # 24 channels: whole blocks of 8
    # stages.2.conv1 still computes 32 outputs (24 padded to whole blocks of 16)
    assert fallback["lat_macs/16"] == pytest.approx(dense["lat_macs/16"] - 0.25 * conv.macs)


def test_grouped_and_depthwise_convs_need_whole_blocks_in_every_group():
    _, _, resnext = _structure("resnext_tiny")
    grouped = next(layer for layer in resnext.layers if layer.name == "stages.1.grouped.0")
    assert (grouped.groups, grouped.out_channels) == (4, 32)  # 8 channels per group
    dense = {"stages.1.grouped.0": 1.0, "stages.1.reduce.0": 1.0}
    assert grouped.kernel(dense, 16) == (1.0, "lat_fallback")
    assert grouped.kernel(dense, 8) == (1.0, None)
    assert grouped.kernel(dense, 1) == (1.0, None)
    _, _, mobilenet = _structure("mobilenet_tiny")
    dw = next(layer for layer in mobilenet.layers if layer.name == "blocks.0.depthwise.0")
    assert dw.depthwise and dw.out_channels == 64
    assert dw.kernel({"blocks.0.se.fc2": 48 / 64}, 16) == (0.75, None)  # MACs scale with k
    assert dw.kernel({"blocks.0.se.fc2": 40 / 64}, 16) == (0.625, "lat_fallback")
    assert dw.kernel({"blocks.0.se.fc2": 40 / 64}, 8) == (0.625, None)


def test_latency_fit_predicts_real_onnx_runtime_timings_of_held_out_plans():
    """Fitted on real ORT timings of what a search measures first (the cost profile: uniform
    plans at four levels and each group alone, then a few sampled plans), the cost model
    predicts sampled plans it never saw. Tolerance: 35 % per plan, loose on purpose (a shared
    CI core; a small model whose fixed per-op costs weigh). Each search reports its own error
    (the summary's cost model line)."""
    from autoprune.latency import Target, measure_latency

    model, example, structure = _structure("resnet_1m")
    target = Target(name="fast", intra_op_threads=1, warmup_runs=5, warmup_seconds=0.0,
                    min_runs=20, min_seconds=0.05, max_seconds=0.3)
    key = latency_key("fast")
    cost = CostModel(structure, ["fast"])
    groups = list(structure.units)
    rng = random.Random(0)

    def measured(plan: PruningPlan) -> float:
        return measure_latency(apply_plan(model, plan, example), example, target).p50_ms

    def sampled() -> PruningPlan:  # per-group sparsities on the space's grid (step 0.05)
        return PruningPlan(rules={g: LayerRule("structured", rng.randrange(16) * 0.05)
                                  for g in groups})

    profile = [PruningPlan(default=LayerRule("structured", 0.75 * level))
               for level in (0.25, 0.5, 0.75, 1.0)]
    profile += [PruningPlan(rules={g: LayerRule("structured", 0.75)}) for g in groups]
    for plan in profile + [sampled() for _ in range(8)]:
        cost.observe(plan, {key: measured(plan)})
    for plan in [sampled() for _ in range(4)]:
        assert cost.predict(plan)[key] == pytest.approx(measured(plan), rel=0.35)


def test_dropped_blocks_cost_nothing_and_what_a_block_costs_beyond_its_layers_is_learned():
    model, example, structure = _structure("transformer_tiny")
    assert structure.blocks == ["layers.0", "layers.1"]
    dropped = PruningPlan(drop_blocks=("layers.0",))
    measured = model_stats(apply_plan(model, dropped, example), example)
    f = structure.features(dropped)
    assert f["params"] == pytest.approx(measured.params, rel=0.01)
    assert f["macs"] == pytest.approx(measured.macs, rel=0.05)
    assert (f["lat_blocks"], structure.features(PruningPlan())["lat_blocks"]) == (1, 2)

    def truth(plan: PruningPlan) -> float:  # 0.02 ms per block beyond its layers' MACs
        g = structure.features(plan)
        return 0.05 + 2e-5 * g["lat_macs/16"] + 0.02 * g["lat_blocks"]

    key = latency_key("cpu")
    model = CostModel(structure, ["cpu"])
    groups = list(structure.units)
    rng = random.Random(0)
    width = [PruningPlan(rules={g: LayerRule("structured", rng.choice([0, 0.25, 0.5]))
                                for g in groups}) for _ in range(6)]
    for plan in [*width, dropped]:
        model.observe(plan, {key: truth(plan)})
    probe = PruningPlan(default=LayerRule("structured", 0.5), drop_blocks=("layers.1",))
    assert model.predict(probe)[key] == pytest.approx(truth(probe), rel=0.02)


def test_a_quantized_latency_maps_affinely_from_the_fp32_prediction():
    _, _, structure = _structure("resnet_tiny")
    key = latency_key("cpu")
    model = CostModel(structure, ["cpu"])

    def truth(plan: PruningPlan) -> float:
        return 0.05 + 2e-6 * structure.features(plan)["lat_macs/16"]

    for s in (0, 0.25, 0.5, 0.75):
        plan = PruningPlan(default=LayerRule("structured", s))
        model.observe(plan, {key: truth(plan)})
    # INT8 kernels: the MACs' cost a quarter, the fixed cost unchanged (not one factor)
    int8 = {s: PruningPlan(default=LayerRule("structured", s), quantize="int8-dynamic")
            for s in (0, 0.3, 0.6)}

    def int8_truth(plan: PruningPlan) -> float:
        return 0.05 + 0.5e-6 * structure.features(plan)["lat_macs/16"]

    model.observe(int8[0], {key: int8_truth(int8[0])})
    model.observe(int8[0.6], {key: int8_truth(int8[0.6])})
    assert model.predict(int8[0.3])[key] == pytest.approx(int8_truth(int8[0.3]), rel=0.02)
