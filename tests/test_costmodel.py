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


def test_latency_fit_recovers_a_linear_cost_and_learns_a_quantization_factor():
    _, _, structure = _structure("resnet_tiny")
    key = latency_key("cpu")
    model = CostModel(structure, ["cpu"])
    plans = [PruningPlan(default=LayerRule("structured", s)) for s in (0.0, 0.25, 0.5, 0.75)]

    def truth(plan: PruningPlan) -> float:  # a known machine: 0.05 ms + 2 ns per blocked MAC
        return 0.05 + 2e-6 * structure.features(plan)["lat_macs"]

    for plan in plans:
        model.observe(plan, {key: truth(plan)})
    probe = PruningPlan(default=LayerRule("structured", 0.6))
    assert model.predict(probe)[key] == pytest.approx(truth(probe), rel=0.01)
    int8 = PruningPlan(default=LayerRule("structured", 0.25), quantize="int8")
    model.observe(int8, {key: 0.5 * truth(int8)})
    assert model.predict(PruningPlan(default=LayerRule("structured", 0.6), quantize="int8"))[
        key] == pytest.approx(0.5 * truth(probe), rel=0.01)
    assert model.predict(probe)[key] == pytest.approx(truth(probe), rel=0.01)
