"""Grouped convolutions (ResNeXt-style blocks with squeeze-excite): equal channels per group."""

import copy

import pytest
import torch

from autoprune.cli import main
from autoprune.costmodel import CostStructure
from autoprune.latency import export_onnx
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import apply_plan, grouped_advice, inspect_model, prune_model_
from autoprune.stats import model_stats
from autoprune.testing import create_test_model


def _model():
    torch.manual_seed(0)
    return create_test_model("resnext_tiny").eval()


def test_grouped_convs_are_listed_with_their_group_count():
    model = _model()
    info = inspect_model(model, model.example_inputs())
    grouped = {g.name: (g.channels, g.channel_groups) for g in info.groups if g.channel_groups > 1}
    assert grouped == {"stages.0.reduce.0": (16, 4), "stages.0.grouped.0": (16, 4),
                       "stages.1.reduce.0": (32, 4), "stages.1.grouped.0": (32, 4)}
    assert [u.name for u in info.unprunable] == ["fc"]
    assert "32 ch in 4 groups of 8" in info.table()


@pytest.mark.parametrize("sparsity, per_group", [(0.1, 7), (0.5, 4), (0.75, 2), (0.95, 1)])
def test_grouped_conv_loses_the_same_channels_in_every_group(sparsity, per_group):
    model = _model()
    x = model.example_inputs()
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), x)
    conv = pruned.stages[1].grouped[0]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (4, 4 * per_group, 4 * per_group)
    assert conv.weight.shape == (4 * per_group, per_group, 3, 3)
    assert pruned.stages[1].reduce[0].out_channels == 4 * per_group
    assert pruned(*model.example_inputs(batch=2)).shape == (2, 10)
    result = export_onnx(pruned, x)
    assert result.ok and result.max_abs_diff < 1e-4


def test_channels_that_carry_nothing_are_the_ones_removed():
    """Zero the 2nd and 5th channel of every group of the 1x1 conv feeding a grouped conv
    (and their BatchNorm): pruning 2 of 8 per group removes exactly those, output unchanged."""
    model = _model()
    x = model.example_inputs()
    block = model.stages[1]
    dead = [g * 8 + i for g in range(4) for i in (1, 4)]
    with torch.no_grad():
        block.reduce[0].weight[dead] = 0
        block.reduce[1].weight[dead] = 0
        block.reduce[1].bias[dead] = 0
    plan = PruningPlan(rules={"stages.1.reduce.0": LayerRule("structured", 0.25)})
    pruned = apply_plan(model, plan, x)
    assert pruned.stages[1].grouped[0].weight.shape == (32, 6, 3, 3)
    torch.testing.assert_close(pruned(*x), model(*x))


def test_round_to_keeps_multiples_across_groups():
    model = _model()
    plan = PruningPlan(default=LayerRule("structured", 0.3, round_to=8))
    pruned = apply_plan(model, plan, model.example_inputs())
    assert pruned.stages[1].grouped[0].out_channels == 24  # 6 of 8 per group: a multiple of 8


def test_layers_command_lists_grouped_convs_as_prunable(tmp_path, capsys):
    task = tmp_path / "resnext_task.py"
    task.write_text("from autoprune.testing.tasks import synthetic_task\n\n\n"
                    "def make_task():\n"
                    "    return synthetic_task(model='resnext_tiny', train_steps=1)\n")
    assert main(["layers", "--task", str(task)]) == 0
    out = capsys.readouterr().out
    assert "stages.1.grouped.0" in out.split("not prunable")[0]
    assert "32 ch in 4 groups of 8" in out


# -- whole conv groups (a rule's whole_groups) ----------------------------------------------

def _whole(sparsity, **kw):
    return PruningPlan(rules={"re:stages\\.\\d\\.grouped\\.0": LayerRule(
        "structured", sparsity, "l2", whole_groups=True, **kw)})


def test_whole_groups_go_with_the_input_channels_that_feed_them():
    model = _model()
    x = model.example_inputs()
    pruned = copy.deepcopy(model)
    report = prune_model_(pruned, _whole(0.5), x)
    conv = pruned.stages[1].grouped[0]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 16, 16)
    assert conv.weight.shape == (16, 8, 3, 3)  # each group keeps its width of 8
    assert pruned.stages[1].reduce[0].out_channels == 16  # the group feeding it follows
    assert pruned.stages[1].expand[0].in_channels == 16
    assert report.structured["stages.1.grouped.0"] == (32, 16)
    assert report.structured["stages.1.reduce.0"] == (32, 16)
    # the groups kept compute exactly what they did: same inputs, same outputs
    kept_in, kept_out = report.kept_in["stages.1.grouped.0"], report.kept_out["stages.1.grouped.0"]
    assert [i // 8 for i in kept_in[::8]] == [o // 8 for o in kept_out[::8]]
    h = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(conv(h[:, kept_in]), model.stages[1].grouped[0](h)[:, kept_out])
    assert pruned(*model.example_inputs(batch=2)).shape == (2, 10)
    result = export_onnx(pruned, x)
    assert result.ok and result.max_abs_diff < 1e-4


def test_the_weakest_conv_groups_are_the_ones_removed():
    model = _model()
    block = model.stages[1]
    with torch.no_grad():  # conv groups 1 and 3 carry (almost) nothing, in every layer
        for group, scale in ((slice(8, 16), 1e-3), (slice(24, 32), 1e-2)):
            block.grouped[0].weight[group] *= scale
            block.grouped[1].weight[group] *= scale
            block.expand[0].weight[:, group] *= scale
    report = prune_model_(copy.deepcopy(model), _whole(0.5), model.example_inputs())
    assert report.kept_out["stages.1.grouped.0"] == [*range(8), *range(16, 24)]


def test_whole_groups_on_a_group_that_is_not_a_grouped_conv_is_noted_and_ignored():
    model = _model()
    plan = PruningPlan(rules={"stem.0": LayerRule("structured", 0.5, whole_groups=True)})
    pruned = copy.deepcopy(model)
    report = prune_model_(pruned, plan, model.example_inputs())
    assert pruned.stem[0].out_channels == 8
    assert report.notes == ["stem.0: whole_groups applies to a grouped conv's output channels "
                            "only (`autoprune layers` lists them); pruned by channels"]


def test_layers_say_which_way_pays_for_each_grouped_conv():
    table = inspect_model(_model(), _model().example_inputs()).table()
    assert ("stages.0.grouped.0: groups of 4 ch miss the blocked kernels already: channels "
            "inside groups pay") in table
    assert ("stages.1.grouped.0: groups of 8 ch run on the blocked kernels of AVX2 CPUs "
            "(blocks of 8), not of AVX-512 ones (16): whole groups pay on AVX2, channels "
            "inside groups on AVX-512") in table
    assert grouped_advice(16).endswith("leave them on AVX-512 CPUs: whole groups pay")
    assert grouped_advice(64).endswith("only if every group keeps a multiple of 16 ch (8 on "
                                       "AVX2), whole groups always")


@pytest.mark.parametrize("whole", [False, True])
def test_the_cost_model_counts_what_whole_groups_keep(whole):
    """MACs and params predicted from the structure equal the pruned model's; whole groups
    keep every grouped conv on the blocked kernels, channels inside groups of 16 do not."""
    torch.manual_seed(0)
    model = create_test_model("resnext_tiny", widths=(64, 128), groups=2).eval()
    x = model.example_inputs()
    info = inspect_model(model, x)
    ref = model_stats(model, x)
    structure = CostStructure.from_model(model, x, info, {
        "macs": ref.macs, "params": ref.params, "size_bytes": ref.size_bytes})
    plan = _whole(0.5) if whole else PruningPlan(
        rules={"re:stages\\.\\d\\.grouped\\.0": LayerRule("structured", 0.5, "l2")})
    stats = model_stats(apply_plan(model, plan, x), x)
    features = structure.features(plan)
    assert features["params"] == stats.params
    # Conv/Linear MACs exact; the other ops (norms, activations) scale with the activations
    assert features["macs"] == pytest.approx(stats.macs, rel=5e-3)
    # groups of 16 and 32: halved inside, the first leaves the blocks (half its MACs left)
    first = next(layer for layer in structure.layers if layer.name == "stages.0.grouped.0")
    assert features["lat_fallback/16"] == (0 if whole else pytest.approx(first.macs / 2))


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "bn_scale", "lamp", "random"])
def test_every_weight_criterion_ranks_groups_that_feed_a_grouped_conv(criterion):
    model = _model()
    x = model.example_inputs()
    pruned = copy.deepcopy(model)
    report = prune_model_(pruned, PruningPlan.uniform(0.5, criterion=criterion), x)
    assert report.criteria["stages.1.reduce.0"] == criterion  # no fallback (SE: no BN)
    assert pruned.stages[1].grouped[0].weight.shape == (16, 4, 3, 3)
    assert pruned(*x).shape == (1, 10)
