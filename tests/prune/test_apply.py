import io

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from autoprune.errors import PlanError
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import apply_plan, bake_masks_, count_kept, has_masks, inspect_model
from autoprune.stats import model_stats
from autoprune.testing import create_test_model


def _model(name):
    torch.manual_seed(0)
    return create_test_model(name).eval()


def _calibration(model, n=2):
    g = torch.Generator().manual_seed(1)
    x = model.example_inputs(batch=4)[0]
    return [(torch.randn(x.shape, generator=g), torch.randint(0, 10, (4,), generator=g))
            for _ in range(n)]


# (model, {module: (attribute, value after 50 % structured)}) - the exact counts expected
EXPECTED_50 = {
    "resnet_tiny": {"stem.0": ("out_channels", 4), "stages.0.conv1": ("out_channels", 4),
                    "stages.2.conv1": ("out_channels", 16), "fc": ("in_features", 16)},
    "mobilenet_tiny": {"blocks.0.expand.0": ("out_channels", 32),
                       "blocks.0.depthwise.0": ("out_channels", 32),
                       "blocks.0.se.fc1": ("out_channels", 8), "fc": ("in_features", 32)},
    "densenet_tiny": {"stem.0": ("out_channels", 8), "features.0.conv.0": ("out_channels", 8),
                      "features.3.0": ("out_channels", 16), "fc": ("in_features", 40)},
    "transformer_tiny": {"layers.0.attn": ("num_heads", 2),
                         "layers.0.attn.q": ("out_features", 32),
                         "layers.0.fc1": ("out_features", 128), "head": ("in_features", 32)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_50))
def test_structured_50_exact_counts_shapes_and_params(name):
    model = _model(name)
    x = model.example_inputs()
    pruned = apply_plan(model, PruningPlan.uniform(0.5), x)
    modules = dict(pruned.named_modules())
    for module_name, (attr, value) in EXPECTED_50[name].items():
        assert getattr(modules[module_name], attr) == value, (module_name, attr)
    assert pruned(*x).shape == model(*x).shape == (1, 10)
    dense, small = model_stats(model, x), model_stats(pruned, x)
    # Channels halve on both sides of most weights: about a quarter of the parameters remain.
    assert 0.2 < small.params / dense.params < 0.35
    assert small.macs < 0.4 * dense.macs
    # The original model is untouched.
    assert model_stats(model, x).params == dense.params


def test_transformer_head_pruning_keeps_head_dim_and_runs_batched():
    model = _model("transformer_tiny")
    plan = PruningPlan(rules={"re:layers\\..\\.attn\\.v": LayerRule("structured", 0.75)})
    pruned = apply_plan(model, plan, model.example_inputs())
    attn = pruned.layers[1].attn
    assert (attn.num_heads, attn.head_dim, attn.k.out_features, attn.out.in_features) == (
        1, 16, 16, 16)
    assert pruned(*model.example_inputs(batch=3)).shape == (3, 10)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "fpgm", "bn_scale", "lamp", "random"])
def test_every_criterion_prunes_and_is_deterministic(criterion):
    model = _model("resnet_tiny")
    x = model.example_inputs()
    kw = dict(calibration=_calibration(model), loss_fn=torch.nn.functional.cross_entropy)
    plan = PruningPlan.uniform(0.5, criterion=criterion)
    a, b = apply_plan(model, plan, x, **kw), apply_plan(model, plan, x, **kw)
    assert a.stages[1].conv1.out_channels == 8
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_criteria_choose_different_channels():
    model = _model("resnet_tiny")
    x = model.example_inputs()
    kept = {
        c: apply_plan(model, PruningPlan.uniform(0.5, criterion=c), x).stages[0].conv1.weight
        for c in ("l1", "random")
    }
    assert not torch.equal(kept["l1"], kept["random"])


def test_the_criterion_that_ranked_each_group_is_recorded_with_its_fallbacks():
    from autoprune.prune import prune_model_
    from autoprune.search._preflight import check_criteria
    from autoprune.space import SearchSpace

    plan = PruningPlan.uniform(0.5, criterion="bn_scale")
    # a transformer has no BatchNorm: bn_scale ranks none of its groups, l1 ranks them all
    model = _model("transformer_tiny")
    groups = [g.name for g in inspect_model(model, model.example_inputs()).groups]
    report = prune_model_(model, plan, model.example_inputs())
    assert report.criteria == dict.fromkeys(groups, "l1")
    assert report.fallbacks == dict.fromkeys(groups, "bn_scale -> l1")
    # a CNN whose convs feed BatchNorms is ranked by bn_scale itself
    cnn = _model("resnet_tiny")
    report = prune_model_(cnn, plan, cnn.example_inputs())
    assert set(report.criteria.values()) == {"bn_scale"} and not report.fallbacks
    # and a space offering bn_scale says so before the first trial
    space = SearchSpace(name="bn", criteria=("bn_scale", "l1"))
    model = _model("transformer_tiny")
    (warning,) = check_criteria(space, inspect_model(model, model.example_inputs()).groups)
    assert warning.startswith(f"criterion 'bn_scale' of search space 'bn' cannot rank "
                              f"{len(groups)} of {len(groups)} groups (e.g. {groups[0]}): trials "
                              f"rank them by l1")
    assert check_criteria(space, inspect_model(cnn, cnn.example_inputs()).groups) == []


def test_taylor_without_calibration_is_a_clear_error():
    model = _model("resnet_tiny")
    with pytest.raises(PlanError, match="taylor.*calibration"):
        apply_plan(model, PruningPlan.uniform(0.5, criterion="taylor"), model.example_inputs())


def test_round_to_keeps_multiples():
    assert [count_kept(64, 0.3, 8), count_kept(64, 0.3), count_kept(3, 0.9)] == [40, 45, 1]
    model = _model("resnet_tiny")
    plan = PruningPlan(default=LayerRule("structured", 0.3, round_to=8))
    pruned = apply_plan(model, plan, model.example_inputs())
    assert pruned.stages[2].conv1.out_channels == 16  # 32 - round(9.6) = 22 -> 16
    assert pruned.stages[1].conv1.out_channels == 8  # 16 - 5 = 11 -> 8


def test_unstructured_exact_zeros_masks_survive_training_and_export():
    model = _model("resnet_tiny")
    x = model.example_inputs()
    plan = PruningPlan.uniform(0.8, mode="unstructured")
    pruned = apply_plan(model, plan, x)
    convs = {n: m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name, m in convs.items():
        n = m.weight.numel()
        assert int((m.weight == 0).sum()) == int(np.floor(0.8 * n + 0.5)), name
    # An optimizer step with a large learning rate does not revive masked weights.
    opt = torch.optim.SGD(pruned.parameters(), lr=1.0)
    pruned.train()
    pruned(*model.example_inputs(batch=4)).sum().backward()
    opt.step()
    w = pruned.stages[0].conv1.weight
    assert int((w == 0).sum()) == int(np.floor(0.8 * w.numel() + 0.5))
    assert has_masks(pruned)
    bake_masks_(pruned.eval())
    assert not has_masks(pruned)
    buf = io.BytesIO()
    torch.onnx.export(pruned, x, buf, dynamo=False, do_constant_folding=False)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(buf.getvalue())
             .graph.initializer}
    exported = inits["stages.0.conv1.weight"]
    assert exported.size == 8 * 8 * 9
    assert int((exported == 0).sum()) == int(np.floor(0.8 * exported.size + 0.5))


def test_mixed_plan_structured_unstructured_and_skip():
    model = _model("resnet_tiny")
    x = model.example_inputs()
    plan = PruningPlan(
        default=LayerRule("skip"),
        rules={
            "stages.2.conv1": LayerRule("structured", 0.5, "l2"),
            "re:stages\\.1\\.conv.": LayerRule("unstructured", 0.5, "l1"),
            "stages.0.conv1": LayerRule("structured", 0.25, "fpgm"),
        },
    )
    pruned = apply_plan(model, plan, x)
    assert pruned.stages[2].conv1.out_channels == 16
    assert pruned.stages[0].conv1.out_channels == 6
    assert pruned.stages[1].conv1.out_channels == 16  # unstructured: shape kept ...
    assert int((pruned.stages[1].conv1.weight == 0).sum()) == 16 * 8 * 9 // 2  # ... half zero
    assert int((pruned.stem[0].weight == 0).sum()) == 0  # skipped
    assert pruned(*x).shape == (1, 10)


def test_plan_for_another_model_fails_naming_the_layer():
    a, b = _model("resnet_tiny"), create_test_model("resnet_tiny", widths=(8, 16, 48))
    from autoprune.fingerprint import architecture_signature

    plan = PruningPlan.uniform(0.5).with_fingerprint(architecture_signature(a))
    apply_plan(a, plan, a.example_inputs())  # fine on its own model
    match = r"different model.*stages\.2\.conv1.*32x16x3x3.*48x16x3x3"
    with pytest.raises(PlanError, match=match):
        apply_plan(b, plan, b.example_inputs())


def test_rule_for_unknown_layer_is_rejected():
    model = _model("resnet_tiny")
    plan = PruningPlan(rules={"stages.9.conv1": LayerRule("structured", 0.5)})
    with pytest.raises(PlanError, match=r"no layer named 'stages.9.conv1'.*autoprune layers"):
        apply_plan(model, plan, model.example_inputs())


def test_inspect_model_lists_groups_and_unprunable_layers():
    model = _model("resnet_tiny")
    info = inspect_model(model, model.example_inputs())
    assert [g.name for g in info.groups] == [
        "stem.0", "stages.0.conv1", "stages.1.conv1", "stages.1.shortcut.0", "stages.2.conv1",
        "stages.2.shortcut.0"]
    stem = info.group("stem.0")
    assert stem.channels == 8
    assert {"stem.1", "stages.0.conv1", "stages.0.conv2", "stages.1.conv1"} <= set(stem.coupled)
    assert [(u.name, u.reason.split(":")[0]) for u in info.unprunable] == [
        ("fc", "model output layer")]
    assert 0 < stem.flops_share <= 1 and info.total_params == 19810
    assert "stages.0.conv1" in info.table()
    heads = inspect_model(t := _model("transformer_tiny"), t.example_inputs()).group(
        "layers.0.attn.v")
    assert heads.num_heads == 4 and heads.channels == 64


def test_baking_a_copy_keeps_the_original_and_the_signature():
    from autoprune.fingerprint import architecture_signature
    from autoprune.prune import baked_copy

    model = _model("resnet_tiny")
    x = model.example_inputs()
    pruned = apply_plan(model, PruningPlan.uniform(0.5, "unstructured"), x)
    pruned(*x)  # a forward pass before copying, as during fine-tuning
    baked = baked_copy(pruned)
    assert has_masks(pruned) and not has_masks(baked)
    assert torch.equal(pruned(*x), baked(*x))  # the original still runs, same function
    assert architecture_signature(baked) == architecture_signature(model)


def _onnx_weight_sizes(model, inputs):
    """Sizes of the weights ONNX Runtime multiplies by (Conv, MatMul, Gemm initializers)."""
    from autoprune.latency import export_onnx

    graph = onnx.load_from_string(export_onnx(model, inputs).onnx_bytes).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return sorted(inits[name].size for node in graph.node
                  if node.op_type in ("Conv", "MatMul", "Gemm")
                  for name in node.input[1:2] if name in inits)


@pytest.mark.parametrize("name", ["resnet_tiny", "transformer_tiny"])
def test_the_exported_graph_multiplies_by_the_pruned_weights(name):
    model = _model(name)
    x = model.example_inputs()
    pruned = apply_plan(model, PruningPlan.uniform(0.5), x)
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    torch_sizes = sorted(m.weight.numel() for m in pruned.modules() if isinstance(m, layers))
    assert _onnx_weight_sizes(pruned, x) == torch_sizes
    dense_total = sum(_onnx_weight_sizes(model, x))
    # every hidden width halves: inner weights shrink 4x, the first and last layers' 2x
    assert 0.25 * dense_total < sum(torch_sizes) < 0.4 * dense_total
