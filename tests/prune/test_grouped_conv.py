"""Grouped convolutions (ResNeXt-style blocks with squeeze-excite): equal channels per group."""

import pytest
import torch

from autoprune.cli import main
from autoprune.latency import export_onnx
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import apply_plan, inspect_model
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
