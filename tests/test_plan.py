import json

import pytest

from autoprune.errors import PlanError
from autoprune.plan import PLAN_VERSION, LayerRule, PruningPlan, Recovery

PLAN = PruningPlan(
    default=LayerRule("structured", 0.25, "l2", round_to=8),
    rules={
        "fc": LayerRule("skip"),
        "re:stages\\.0\\..*": LayerRule("unstructured", 0.8, "lamp"),
        "stages.1.conv1": LayerRule("structured", 0.5, "taylor"),
    },
    quantize="int8",
    finetune={"lr": 0.01},
    fingerprint=["stem.0:Conv2d:8x1x3x3", "fc:Linear:10x32,10"],
)


def test_json_and_yaml_round_trip(tmp_path):
    assert PruningPlan.from_json(PLAN.to_json()) == PLAN
    assert PruningPlan.from_yaml(PLAN.to_yaml()) == PLAN
    for name in ("p.json", "p.yaml"):
        assert PruningPlan.load(PLAN.save(tmp_path / name)) == PLAN


def test_rule_resolution_order():
    assert PLAN.rule_for("stages.1.conv1").criterion == "taylor"  # exact
    assert PLAN.rule_for("stages.0.conv1").mode == "unstructured"  # pattern
    assert PLAN.rule_for("stages.0").mode == "structured"  # pattern is a full match only
    assert PLAN.rule_for("stages.2.conv1") == PLAN.default
    assert PLAN.rule_for("fc").active is False


def test_search_result_file_with_metrics_loads_as_plan(tmp_path):
    f = tmp_path / "trial_7.json"
    f.write_text(f'{{"plan": {PLAN.to_json()}, "metrics": {{"accuracy": 0.97}}}}')
    assert PruningPlan.load(f) == PLAN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"default": {"mode": "pruned"}}', r"plan\.default\.mode: 'pruned' is not one of "
                                            r"structured, unstructured, skip"),
        ('{"default": {"sparsity": 1.0}}', r"plan\.default\.sparsity: 1\.0 must be .*0 <= "),
        ('{"default": {"sparsity": "half"}}', r"plan\.default\.sparsity: 'half'"),
        ('{"rules": {"fc": {"criterion": "l3"}}}', r"plan\.rules\['fc'\]\.criterion: 'l3' is "
                                                   r"not one of l1, l2, taylor"),
        ('{"rules": {"fc": {"mode": "unstructured", "criterion": "fpgm"}}}',
         r"'fpgm' scores whole channels"),
        ('{"rules": {"fc": {"round_to": 0}}}', r"round_to: 0 must be a positive integer"),
        ('{"rules": {"fc": {"sparsity": 0.5, "ratio": 2}}}', r"rules\['fc'\]: unknown field\(s\) "
                                                             r"ratio; allowed: criterion, mode"),
        ('{"rules": {"re:(": {}}}', r"rules\['re:\('\]: invalid regular expression"),
        ('{"rules": ["fc"]}', r"plan\.rules: expected a mapping"),
        ('{"version": 9}', r"plan\.version: plan format 9 is not supported"),
        ('{"quantize": "int4"}', r"quantize: 'int4' is not one of none, int8, int8-dynamic"),
        ('{"defaults": {}}', r"unknown field\(s\) defaults"),
        ('[1, 2]', r"expected a mapping with 'default' and 'rules'"),
        ('{"default": ', r"not valid JSON"),
    ],
)
def test_malformed_plans_name_the_field(text, message):
    with pytest.raises(PlanError, match=message):
        PruningPlan.from_json(text)


def test_malformed_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("default: [unclosed")
    with pytest.raises(PlanError, match=r"bad\.yaml: not valid YAML"):
        PruningPlan.load(f)
    with pytest.raises(PlanError, match="does not exist"):
        PruningPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize(("version", "saved", "loaded"), [
    (1, "int8", "int8-dynamic"),  # version 1's int8 was ONNX Runtime dynamic quantization
    (1, "none", "none"),
    (2, "int8", "int8"),  # static INT8 since version 2
    (2, "int8-dynamic", "int8-dynamic"),
])
def test_plans_of_an_older_version_keep_their_quantization(tmp_path, version, saved, loaded):
    data = {**PLAN.to_dict(), "version": version, "quantize": saved}
    del data["recovery"]  # older formats had no recovery section
    plan = PruningPlan.from_dict(data)
    assert (plan.quantize, plan.version) == (loaded, PLAN_VERSION)
    assert plan.rules == PLAN.rules and plan.fingerprint == PLAN.fingerprint
    # applied without recovery before version 3, they keep that meaning
    assert plan.recovery == Recovery(reconstruct=False, hidden_distill=0.0)
    f = tmp_path / "old.json"
    f.write_text(json.dumps(data))
    assert PruningPlan.load(f) == plan  # saved again, it is a plan of this version
    assert json.loads(plan.to_json())["version"] == PLAN_VERSION


def test_unsupported_plan_versions_are_named():
    for version in (0, 6, "2", True):
        with pytest.raises(PlanError, match=r"plan format .* is not supported \(this autoprune "
                                            r"reads versions 1, 2, 3, 4, 5\)"):
            PruningPlan.from_dict({"version": version})


def test_the_recovery_section_round_trips_through_json_and_yaml(tmp_path):
    plan = PruningPlan.uniform(0.5, recovery=Recovery(reconstruct=False, calibration_samples=64,
                                                      hidden_distill=0.5))
    data = json.loads(plan.to_json())
    assert data["recovery"] == {"reconstruct": False, "calibration_samples": 64,
                                "hidden_distill": 0.5}
    assert PruningPlan.from_json(plan.to_json()) == plan
    assert PruningPlan.from_yaml(plan.to_yaml()) == plan
    for suffix in (".json", ".yaml"):
        assert PruningPlan.load(plan.save(tmp_path / f"p{suffix}")).recovery == plan.recovery
    # a version 3 plan without the section gets the defaults
    del data["recovery"]
    assert PruningPlan.from_dict(data).recovery == Recovery()


@pytest.mark.parametrize("recovery, message", [
    ({"reconstruct": "yes"}, "recovery.reconstruct: 'yes' must be true or false"),
    ({"calibration_samples": 1}, "recovery.calibration_samples: 1 must be an integer >= 2"),
    ({"hidden_distill": -1}, r"recovery.hidden_distill: -1 must be a number in \[0, 100\]"),
    ({"ridge": 1}, "recovery: unknown field\\(s\\) ridge; allowed: calibration_samples, "
                   "hidden_distill, reconstruct"),
    ([1], "recovery: expected a mapping"),
])
def test_a_bad_recovery_section_names_the_field(recovery, message):
    with pytest.raises(PlanError, match=f"p.json.{message}" if message.startswith("recovery")
                       else message):
        PruningPlan.from_dict({**PLAN.to_dict(), "recovery": recovery}, source="p.json")


def test_dropped_blocks_round_trip_and_bad_ones_are_named(tmp_path):
    plan = PruningPlan.uniform(0.5, drop_blocks=["encoder.layer.2", "encoder.layer.4"])
    assert json.loads(plan.to_json())["drop_blocks"] == ["encoder.layer.2", "encoder.layer.4"]
    for suffix in (".json", ".yaml"):
        assert PruningPlan.load(plan.save(tmp_path / f"p{suffix}")) == plan
    assert "drop_blocks" in plan.key() and "drop_blocks" not in PruningPlan.uniform(0.5).key()
    with pytest.raises(PlanError, match=r"drop_blocks: .* names a block twice"):
        PruningPlan.from_dict({"drop_blocks": ["layers.0", "layers.0"]})
    with pytest.raises(PlanError, match=r"drop_blocks: 'layers.0' must be a list of block names"):
        PruningPlan.from_dict({"drop_blocks": "layers.0"})


def test_whole_groups_round_trips_and_is_left_out_when_false(tmp_path):
    rule = LayerRule("structured", 0.5, "l2", whole_groups=True)
    plan = PruningPlan(rules={"stages.1.grouped.0": rule})
    assert json.loads(plan.to_json())["rules"]["stages.1.grouped.0"]["whole_groups"] is True
    for suffix in (".json", ".yaml"):
        assert PruningPlan.load(plan.save(tmp_path / f"p{suffix}")) == plan
    assert "whole_groups" not in PruningPlan.uniform(0.5).to_json()  # keys stay as they were
    assert plan.removes_whole_groups and not PruningPlan.uniform(0.5).removes_whole_groups
    with pytest.raises(PlanError, match=r"rules\['c'\]\.whole_groups: 'yes' must be true or "
                                        r"false"):
        PruningPlan.from_dict({"rules": {"c": {"mode": "structured", "whole_groups": "yes"}}})
