"""criteria_share: one criterion per plan (global), per stage or per layer."""

from __future__ import annotations

import optuna
import pytest

from autoprune.errors import SearchSpaceError
from autoprune.space import GroupInfo, SearchSpace

GROUPS = [
    GroupInfo("stem.0", ("stem.0", "stages.0.conv2")),
    GroupInfo("stages.0.conv1", ("stages.0.conv1",)),
    GroupInfo("stages.1.conv1", ("stages.1.conv1",)),
    GroupInfo("stages.1.shortcut.0", ("stages.1.shortcut.0", "stages.1.conv2")),
]
CRITERIA = ["l1", "l2", "fpgm", "bn_scale"]


def _space(criteria_share: str, share: str = "per_layer") -> SearchSpace:
    return SearchSpace.from_dict({"name": "t", "share": share, "criteria": CRITERIA,
                                  "criteria_share": criteria_share,
                                  "sparsity": {"low": 0.0, "high": 0.7, "step": 0.1}})


def _sampled_plans(space: SearchSpace, n: int = 12):
    bound = space.bind(GROUPS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    return [(p := bound.sample(study.ask()), bound.build(p)) for _ in range(n)]


def test_global_is_the_default_and_samples_one_criterion():
    assert SearchSpace(name="t").criteria_share == "global"
    for params, plan in _sampled_plans(_space("global")):
        assert [k for k in params if k.startswith("criterion")] == ["criterion"]
        assert {r.criterion for r in plan.rules.values()} == {params["criterion"]}


def test_per_layer_plans_hold_a_criterion_per_layer():
    keys = {f"criterion.{g.name}" for g in GROUPS}
    mixed = 0
    for params, plan in _sampled_plans(_space("per_layer")):
        assert {k for k in params if k.startswith("criterion")} == keys
        for g in GROUPS:
            assert plan.rules[g.name].criterion == params[f"criterion.{g.name}"]
        mixed += len({r.criterion for r in plan.rules.values()}) > 1
    assert mixed >= 10  # 4 layers, 4 criteria: nearly every plan mixes criteria


def test_per_stage_criteria_are_shared_within_a_stage():
    # per-layer sparsities, per-stage criteria: stages.1.conv1 and stages.1.shortcut.0 agree
    for params, plan in _sampled_plans(_space("per_stage")):
        assert {k for k in params if k.startswith("criterion")} == {
            "criterion.stem.0", "criterion.stages.0", "criterion.stages.1"}
        assert (plan.rules["stages.1.conv1"].criterion
                == plan.rules["stages.1.shortcut.0"].criterion
                == params["criterion.stages.1"])
        assert plan.rules["stem.0"].criterion == params["criterion.stem.0"]  # its own stage


def test_per_layer_criteria_with_per_stage_sparsity():
    bound = _space("per_layer", share="per_stage").bind(GROUPS)
    params = {"s.stages.1": 0.5, "criterion.stages.1.conv1": "fpgm",
              "criterion.stages.1.shortcut.0": "l2"}
    plan = bound.build(params)
    assert plan.rules["stages.1.conv1"].criterion == "fpgm"
    assert plan.rules["stages.1.shortcut.0"].criterion == "l2"
    assert plan.rules["stages.1.conv1"].sparsity == plan.rules["stages.1.shortcut.0"].sparsity
    assert plan.rules["stem.0"].criterion == "l1"  # not given: the first criterion


def test_uniform_baselines_use_the_first_criterion_everywhere():
    bound = _space("per_layer").bind(GROUPS)
    params = bound.uniform_params(0.5)
    assert {params[f"criterion.{g.name}"] for g in GROUPS} == {"l1"}
    assert {r.criterion for r in bound.build(params).rules.values()} == {"l1"}


def test_bad_criteria_share_is_an_error():
    with pytest.raises(SearchSpaceError, match="criteria_share: 'per_group' is not one of"):
        _space("per_group")
