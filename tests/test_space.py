import optuna
import pytest

from autoprune.errors import SearchSpaceError
from autoprune.plan import PLAN_VERSION, Recovery
from autoprune.space import GroupInfo, SearchSpace, builtin_spaces, load_space

GROUPS = [
    GroupInfo("stem.0", ("stem.0", "stages.0.conv2")),
    GroupInfo("stages.0.conv1", ("stages.0.conv1",)),
    GroupInfo("stages.1.conv1", ("stages.1.conv1",)),
    GroupInfo("stages.1.shortcut.0", ("stages.1.shortcut.0", "stages.1.conv2")),
]


def _sample(bound, seed):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    return bound.sample(trial)


def test_shipped_spaces_load_and_bind():
    assert set(builtin_spaces()) >= {"per_layer_structured", "per_stage_structured",
                                     "global_unstructured", "mixed", "uniform_structured"}
    for name in builtin_spaces():
        bound = load_space(name).bind(GROUPS)
        plan = bound.build(_sample(bound, 0))
        assert plan.version == PLAN_VERSION


def test_sampling_is_deterministic_under_a_seed():
    bound = load_space("mixed").bind(GROUPS)
    a, b, c = _sample(bound, 7), _sample(bound, 7), _sample(bound, 8)
    assert a == b and a != c
    assert bound.build(a) == bound.build(b)


def test_per_layer_structured_plan():
    bound = load_space("per_layer_structured").bind(GROUPS)
    params = {"criterion": "fpgm", "ft.lr": 0.01, "s.stem.0": 0.25, "s.stages.0.conv1": 0.5,
              "s.stages.1.conv1": 0.0, "s.stages.1.shortcut.0": 0.75}
    plan = bound.build(params)
    assert plan.rules["stages.0.conv1"].sparsity == 0.5
    assert plan.rules["stem.0"].criterion == "fpgm" and plan.rules["stem.0"].mode == "structured"
    assert plan.finetune == {"lr": 0.01} and plan.default.mode == "skip"


def test_mixed_unstructured_rules_go_to_producing_layers():
    bound = load_space("mixed").bind(GROUPS)
    params = {"criterion": "l2", "round_to": 4, "quantize": "int8", "ft.lr": 0.01,
              "mode.stem.0": "unstructured", "s.stem.0": 0.5, "mode.stages.0.conv1": "skip",
              "mode.stages.1.conv1": "structured", "s.stages.1.conv1": 0.3,
              "mode.stages.1.shortcut.0": "skip"}
    plan = bound.build(params)
    assert plan.rules["stem.0"].mode == plan.rules["stages.0.conv2"].mode == "unstructured"
    assert plan.rules["stages.1.conv1"].round_to == 4 and plan.rules["stem.0"].round_to is None
    assert plan.rules["stages.0.conv1"].mode == "skip" and plan.quantize == "int8"


def test_per_stage_and_global_sharing():
    stage = load_space("per_stage_structured").bind(GROUPS)
    assert list(stage.units) == ["stem.0", "stages.0", "stages.1"]
    plan = stage.build({"criterion": "l1", "s.stem.0": 0.1, "s.stages.0": 0.2, "s.stages.1": 0.4})
    assert plan.rules["stages.1.shortcut.0"].sparsity == plan.rules["stages.1.conv1"].sparsity
    glob = load_space("global_unstructured").bind(GROUPS)
    plan = glob.build({"criterion": "lamp", "s.all": 0.6})
    assert plan.default.mode == "unstructured" and plan.default.sparsity == 0.6


def test_baselines_are_in_the_space():
    bound = load_space("per_layer_structured").bind(GROUPS)
    base = bound.baselines()
    assert list(base) == ["dense", "uniform-structured-0.25", "uniform-structured-0.5",
                          "uniform-structured-0.75"]
    plan = bound.build(base["uniform-structured-0.5"])
    assert {r.sparsity for r in plan.rules.values()} == {0.5}
    assert not any(r.active for r in bound.build(base["dense"]).rules.values())
    mixed = load_space("mixed").bind(GROUPS)
    assert all(v == "skip" for k, v in mixed.baselines()["dense"].items() if k.startswith("mode."))


def test_include_exclude():
    space = SearchSpace.from_dict({"name": "x", "groups": {"include": ["re:stages\\..*"],
                                                           "exclude": ["stages.1.conv1"]}})
    bound = space.bind(GROUPS)
    assert list(bound.units) == ["stages.0.conv1", "stages.1.shortcut.0"]
    plan = bound.build({"s.stages.0.conv1": 0.5, "s.stages.1.shortcut.0": 0.5})
    assert plan.rules["stem.0"].mode == "skip" and plan.rules["stages.1.conv1"].mode == "skip"
    with pytest.raises(SearchSpaceError, match="leave no prunable group; the model's groups"):
        SearchSpace.from_dict({"groups": {"include": ["nothing"]}}).bind(GROUPS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sparsity": {"low": 0.5, "high": 1.0}}, r"sparsity: need 0 <= low <= high < 1"),
        ({"sparsity": 0.5}, r"sparsity: expected \{low: \.\.\., high: \.\.\."),
        ({"modes": ["pruned"]}, r"modes: 'pruned' is not one of structured"),
        ({"criteria": ["l3"]}, r"criteria: 'l3' is not one of"),
        ({"share": "per_block"}, r"share: 'per_block' is not one of per_layer"),
        ({"modes": ["unstructured"], "criteria": ["fpgm"]}, r"unstructured mode needs one of"),
        ({"finetune": {"lr": {"low": 0, "high": 1, "log": True}}}, r"finetune\.lr: need low"),
        ({"round_to": [0]}, r"round_to: 0 must be a positive integer"),
        ({"quantize": ["int4"]}, r"quantize: 'int4' is not one of none, int8, int8-dynamic"),
        ({"sparsity_range": [0, 1]}, r"unknown field\(s\) sparsity_range"),
        ({"recovery": {"ridge": [1]}}, r"recovery: unknown field\(s\) ridge; allowed: "),
        ({"recovery": {"hidden_distill": [0, -1]}},
         r"recovery\.hidden_distill: -1 must be a number in \[0, 100\]"),
        ({"recovery": {"reconstruct": []}}, r"recovery\.reconstruct: expected a value or a"),
    ],
)
def test_malformed_spaces(data, message):
    with pytest.raises(SearchSpaceError, match=message):
        SearchSpace.from_dict(data)


def test_unknown_space_name_lists_shipped(tmp_path):
    with pytest.raises(SearchSpaceError, match="neither a file nor a shipped space; shipped: "):
        load_space("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity: [unclosed")
    with pytest.raises(SearchSpaceError, match="bad.yaml: not valid YAML"):
        load_space(bad)


def test_a_space_searches_recovery_choices_and_fixes_single_ones():
    space = SearchSpace.from_dict({"recovery": {"reconstruct": [True, False],
                                                "hidden_distill": 0.5,
                                                "calibration_samples": [128]}})
    bound = space.bind(GROUPS)
    params = _sample(bound, 3)
    assert "rec.reconstruct" in params and "rec.hidden_distill" not in params
    plan = bound.build({**params, "rec.reconstruct": False})
    assert (plan.recovery.reconstruct, plan.recovery.hidden_distill,
            plan.recovery.calibration_samples) == (False, 0.5, 128)
    assert bound.build(bound.baselines()["uniform-structured-0.5"]).recovery.reconstruct
    # a space without the section builds plans with the default recovery
    assert load_space("per_layer_structured").bind(GROUPS).build({}).recovery == Recovery()


def test_quantize_flag_limits_the_precision_choices():
    mixed = load_space("mixed")
    assert mixed.with_precision("none").quantize == ("none",)
    assert mixed.with_precision("static").quantize == ("none", "int8")
    assert mixed.with_precision("dynamic").quantize == ("none", "int8-dynamic")
    with pytest.raises(SearchSpaceError, match="--quantize dynamic: space 'per_layer_structured' "
                                               "does not search int8-dynamic"):
        load_space("per_layer_structured").with_precision("dynamic")


def test_a_space_with_depth_samples_how_many_ranked_blocks_go():
    space = SearchSpace.from_dict({"name": "deep", "depth": 2})
    bound = space.bind(GROUPS)
    assert bound.max_depth == 0 and "depth" not in _sample(bound, 0)  # nothing ranked yet
    bound.block_order = ["stages.1", "stages.0"]
    depths = {_sample(bound, seed)["depth"] for seed in range(30)}
    assert depths == {0, 1, 2}
    assert bound.build({"depth": 1}).drop_blocks == ("stages.1",)
    assert bound.build({"depth": 2}).drop_blocks == ("stages.1", "stages.0")
    assert bound.uniform_params(0.5)["depth"] == 0
    bound.block_order = ["stages.1"]  # fewer blocks ranked than the space allows
    assert bound.max_depth == 1
    with pytest.raises(SearchSpaceError, match=r"depth 2: only 1 blocks of the model"):
        bound.build({"depth": 2})
    for bad in (-1, 1.5, True):
        with pytest.raises(SearchSpaceError, match=r"space\.depth: .* must be a whole number"):
            SearchSpace.from_dict({"name": "x", "depth": bad})


def test_whole_groups_is_sampled_only_for_a_model_with_grouped_convs():
    space = SearchSpace.from_dict({"name": "g", "whole_groups": [False, True]})
    assert "whole_groups" not in _sample(space.bind(GROUPS), 0)  # no grouped conv
    groups = [*GROUPS, GroupInfo("stages.1.grouped.0", ("stages.1.grouped.0",), True)]
    bound = space.bind(groups)
    assert {_sample(bound, seed)["whole_groups"] for seed in range(20)} == {False, True}
    plan = bound.build({**bound.uniform_params(0.5), "whole_groups": True})
    assert [n for n, r in plan.rules.items() if r.whole_groups] == ["stages.1.grouped.0"]
    assert bound.uniform_params(0.5)["whole_groups"] is False
    assert load_space("per_layer_structured").whole_groups == (False, True)
    with pytest.raises(SearchSpaceError, match=r"space\.whole_groups: expected true, false or "
                                               r"a list of them, got 'yes'"):
        SearchSpace.from_dict({"name": "x", "whole_groups": "yes"})


def test_start_points_take_the_tasks_lr_or_the_middle_of_a_range_without_it():
    assert load_space("per_layer_structured").bind(GROUPS).uniform_params(0.5)[
        "ft.lr_scale"] == 1.0
    encoder = load_space("encoder").bind(GROUPS)  # lr_scale 1.5-15 (log): its middle
    assert encoder.uniform_params(0.5)["ft.lr_scale"] == pytest.approx(22.5 ** 0.5)
