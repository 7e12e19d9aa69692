"""Data-aware criteria: Fisher ranks heads like removing them; activation scores are exact."""

import copy

import pytest
import torch
from torch import nn

from autoprune.criteria import get_criterion
from autoprune.data_importance import collect_statistics, global_allocation
from autoprune.errors import PlanError
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import prune_model_
from autoprune.prune._groups import build_groups
from autoprune.search._verify import kendall_tau


def _tiny_bert(heads=6):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=128, hidden_size=8 * heads, num_hidden_layers=1,
                                     num_attention_heads=heads, intermediate_size=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    value = model.encoder.layer[0].attention.self.value
    with torch.no_grad():  # heads of clearly different weight: a ranking to recover
        for h in range(heads):
            value.weight[8 * h:8 * (h + 1)] *= 0.2 + 0.5 * ((h * 5) % heads)
    return model


def _batches(n=8, batch=8, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (batch, seq), generator=g), None) for _ in range(n)]


def _removal_damage(model, batches, heads):
    """Output change (squared error) when each head alone is zeroed at the output projection."""
    with torch.no_grad():
        want = [model(b[0]).last_hidden_state for b in batches]
        damage = []
        for h in range(heads):
            pruned = copy.deepcopy(model)
            pruned.encoder.layer[0].attention.output.dense.weight[:, 8 * h:8 * (h + 1)] = 0
            damage.append(sum((pruned(b[0]).last_hidden_state - w).square().sum().item()
                              for b, w in zip(batches, want)))
    return damage


def test_fisher_head_scores_rank_heads_like_removing_each_head_alone():
    heads = 6
    model = _tiny_bert(heads)
    batches = _batches()
    _, inspection = build_groups(model, (batches[0][0],))
    group = next(g for g in inspection.groups if g.num_heads)
    stats = collect_statistics(model, batches, fisher=True)
    per_head = get_criterion("fisher").head_scores(stats, group.tp_group, heads).tolist()
    damage = _removal_damage(model, batches, heads)
    assert min(per_head) > 0  # not all zero: the probe loss is not at its minimum
    tau = kendall_tau(per_head, damage)
    assert tau >= 0.7, (per_head, damage)


def test_fisher_scores_are_not_zero_for_a_model_distilled_to_itself():
    # a loss distilling the model to its own outputs has zero gradient at the dense model;
    # fisher's probe loss does not depend on the task's loss at all
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, [(x, model(x).detach())], fisher=True)
    assert stats.fisher[model[2]].shape == (32, 16) and stats.samples == 32
    assert (stats.fisher[model[2]].square().sum(0) > 0).sum() >= 8  # ReLU leaves some dead


def test_activation_scores_are_weight_column_energy_times_input_second_moment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(40, 4)
    _, inspection = build_groups(model, (x[:1],))
    stats = collect_statistics(model, [(x[:20], None), (x[20:], None)], fisher=False)
    scores = get_criterion("activation").group_importance(stats)(inspection.groups[0].tp_group)
    hidden = torch.relu(model[0](x)).detach()
    expected = model[2].weight.detach().square().sum(0) * hidden.square().mean(0)
    torch.testing.assert_close(scores, expected)
    # and unstructured: Wanda's |W_ij| * ||x_j||, with the norm over the calibration rows
    weights = get_criterion("activation").weight_scores(model[2], stats)
    torch.testing.assert_close(weights, model[2].weight.detach().abs()
                               * hidden.square().mean(0).sqrt())


def test_data_aware_criteria_prune_other_channels_than_magnitude_and_need_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():  # large weights on channels whose inputs are (nearly) always zero
        model[0].bias[:4] = -50.0
        model[0].weight[:4] *= 10
    x = torch.randn(64, 4)
    batches = [(x, None)]
    kept = {}
    for crit in ("l2", "activation", "fisher"):
        pruned = copy.deepcopy(model)
        report = prune_model_(pruned, PruningPlan.uniform(0.5, criterion=crit), (x[:1],),
                              calibration=batches)
        kept[crit] = report.kept_out["0"]
    assert kept["l2"] == [0, 1, 2, 3]  # the dead channels have the largest weights
    assert kept["activation"] == kept["fisher"] == [4, 5, 6, 7]
    with pytest.raises(PlanError, match="criterion fisher needs calibration data"):
        prune_model_(copy.deepcopy(model), PruningPlan.uniform(0.5, criterion="fisher"),
                     (x[:1],))
    with pytest.raises(PlanError, match="'fisher' scores whole channels"):
        LayerRule("unstructured", 0.5, "fisher")


def test_global_allocation_removes_the_least_important_units_across_groups():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=3,
                                     num_attention_heads=6, intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # layer 1's heads and FFN matter little: it should lose the most
        model.encoder.layer[1].attention.output.dense.weight.mul_(0.01)
        model.encoder.layer[1].output.dense.weight.mul_(0.01)
    batches = _batches(n=4)
    _, inspection = build_groups(model, (batches[0][0],))
    stats = collect_statistics(model, batches, fisher=True)
    alloc = global_allocation(inspection.groups, stats, 0.5)
    heads = {g.name: g for g in inspection.groups if g.num_heads}
    ffn = {g.name: g for g in inspection.groups if not g.num_heads}
    assert set(alloc) == set(heads) | set(ffn)
    # half of all heads and half of all FFN channels go, unevenly
    assert sum(alloc[n] * g.num_heads for n, g in heads.items()) == 9
    assert sum(alloc[n] * g.channels for n, g in ffn.items()) == pytest.approx(48)
    layer1 = [n for n in alloc if ".layer.1." in n]
    assert all(alloc[n] >= 0.75 for n in layer1), alloc
    assert len(set(alloc.values())) > 2
