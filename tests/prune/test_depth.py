"""Depth: whole blocks of the main stack dropped, ranked by how little the outputs move."""

import copy

import pytest
import torch

from autoprune.errors import PlanError
from autoprune.latency import export_onnx
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import (
    PassThrough,
    apply_plan,
    drop_blocks_,
    droppable_blocks,
    prune_model_,
    rank_blocks,
)
from autoprune.testing import create_test_model

transformers = pytest.importorskip("transformers")
BLOCKS = [f"encoder.layer.{i}" for i in range(4)]


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=4,
                                     num_attention_heads=6, intermediate_size=96)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _ids(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, 12), generator=g)
    return ids, torch.ones_like(ids)


def test_a_dropped_bert_layer_passes_its_input_on_and_the_model_exports():
    model = _bert()
    inputs = _ids()
    assert droppable_blocks(model, inputs) == dict.fromkeys(BLOCKS)
    pruned = copy.deepcopy(model)
    drop_blocks_(pruned, ["encoder.layer.1", "encoder.layer.3"], inputs)
    assert [type(m).__name__ for m in pruned.encoder.layer] == [
        "BertLayer", "PassThrough", "BertLayer", "PassThrough"]
    # the same as the model with the two layers deleted from its stack
    shallow = copy.deepcopy(model)
    del shallow.encoder.layer[3], shallow.encoder.layer[1]
    shallow.config.num_hidden_layers = 2
    with torch.no_grad():
        got = pruned(*inputs).last_hidden_state
        h = shallow(*inputs).last_hidden_state
    assert got.shape == (8, 12, 48)
    torch.testing.assert_close(got, h, rtol=1e-5, atol=1e-5)
    exported = export_onnx(pruned, inputs, dynamic_batch=True)
    assert exported.ok, (exported.max_abs_diff, exported.tolerance)
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in model.parameters())


def test_depth_and_width_in_one_plan():
    model = _bert()
    inputs = _ids()
    plan = PruningPlan(rules={f"{b}.intermediate.dense": LayerRule("structured", 0.5, "l2")
                              for b in BLOCKS}, drop_blocks=("encoder.layer.2",))
    pruned = copy.deepcopy(model)
    report = prune_model_(pruned, plan, inputs)
    assert report.dropped == ["encoder.layer.2"]
    assert isinstance(pruned.encoder.layer[2], PassThrough)
    assert [pruned.encoder.layer[i].intermediate.dense.out_features for i in (0, 1, 3)] == [48] * 3
    assert pruned(*inputs).last_hidden_state.shape == (8, 12, 48)


def test_blocks_that_cannot_go_are_named_with_the_reason():
    model = _bert()
    inputs = _ids()
    with pytest.raises(PlanError, match=r"drop_blocks: 'encoder.layer.9' is not a block of the "
                                        r"model's main stack; its blocks are encoder.layer.0, "):
        apply_plan(model, PruningPlan(drop_blocks=("encoder.layer.9",)), inputs)
    with pytest.raises(PlanError, match=r"all 4 blocks of the main stack would go"):
        apply_plan(model, PruningPlan(drop_blocks=tuple(BLOCKS)), inputs)
    # a CNN's stages change their input's shape: the model does not run without them
    cnn = create_test_model("resnet_tiny")
    reasons = droppable_blocks(cnn, cnn.example_inputs())
    assert reasons and all(r is not None and "changes its input's shape" in r
                           for r in reasons.values() if r is not None)
    stuck = [name for name, r in reasons.items() if r is not None]
    if stuck:
        with pytest.raises(PlanError, match=rf"block '{stuck[0]}' cannot be dropped: changes"):
            apply_plan(cnn, PruningPlan(drop_blocks=(stuck[0],)), cnn.example_inputs())


def test_the_block_the_outputs_need_least_is_ranked_first_and_the_model_is_left_alone():
    model = _bert()
    inputs = _ids()
    with torch.no_grad():  # layer 2 adds almost nothing: its output projections are near zero
        for dense in (model.encoder.layer[2].attention.output.dense,
                      model.encoder.layer[2].output.dense):
            dense.weight.mul_(1e-3), dense.bias.zero_()
        before = model(*inputs).last_hidden_state
    batches = [(_ids(seed=s), None) for s in range(2)]
    order = rank_blocks(model, batches, 2)
    assert order[0] == "encoder.layer.2" and len(order) == 2 and order[1] != order[0]
    assert all(type(m).__name__ == "BertLayer" for m in model.encoder.layer)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs).last_hidden_state, before)
    # never all of them: one block stays
    assert len(rank_blocks(model, batches, 9)) == 3


def test_the_main_stack_keeps_its_dropped_blocks():
    from autoprune.recover import main_blocks

    model = _bert()
    drop_blocks_(model, ["encoder.layer.1"], _ids())
    assert main_blocks(model) == BLOCKS
