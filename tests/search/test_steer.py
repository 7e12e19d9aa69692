import copy
import json
import random

import pytest

from autoprune.budget import latency_key, parse_budget
from autoprune.costmodel import CostModel, CostStructure
from autoprune.metrics import PREDICTED
from autoprune.plan import PruningPlan
from autoprune.prune import inspect_model
from autoprune.results import load_run
from autoprune.search import _optuna, run_search
from autoprune.search._steer import UNIFORM_FIT, Steering
from autoprune.space import GroupInfo, load_space
from autoprune.stats import model_stats
from autoprune.testing import create_test_model

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
KEY = latency_key("cpu")


@pytest.fixture(scope="module")
def steering():
    model = create_test_model("resnet_tiny")
    example = model.example_inputs()
    inspection = inspect_model(model, example)
    dense = model_stats(model, example)
    structure = CostStructure.from_model(
        model, example, inspection,
        {"macs": dense.macs, "params": dense.params, "size_bytes": dense.size_bytes})
    space = load_space("per_layer_structured").bind(
        [GroupInfo(g.name, tuple(g.producers)) for g in inspection.groups])
    cost = CostModel(structure, ["cpu"])
    dense_ms = 0.05 + 2e-6 * structure.features(PruningPlan())["lat_macs/16"]
    for s in (0.0, 0.3, 0.6):  # a machine whose latency the fit can learn exactly
        plan = space.build(space.uniform_params(s))
        cost.observe(plan, {KEY: 0.05 + 2e-6 * structure.features(plan)["lat_macs/16"]})
    budget = parse_budget("latency<70%").resolve({KEY: dense_ms}, "cpu")
    return Steering(space, cost, [budget], "cpu"), budget


def _sample(space, seed: int) -> dict:
    rng = random.Random(seed)
    r = space.space.sparsity
    params = {f"s.{u}": rng.choice([r.low + i * r.step for i in range(15)]) for u in space.units}
    return {"criterion": "l1", "ft.lr_scale": 1.0, **params}


def test_projection_lands_predicted_latency_just_inside_the_budget(steering):
    steer, budget = steering
    for seed in range(6):
        sampled = _sample(steer.space, seed)
        steered, predicted = steer.project(sampled)
        # inside by the 5 % margin, and no further than the channel blocks' granularity
        assert budget.value * 0.8 <= predicted[PREDICTED + KEY] <= budget.value * 0.95 + 1e-9
        # one factor for every unit: the sampled proportions survive where nothing is clipped
        free = [u for u in steer.space.units if 0 < steered[f"s.{u}"] < 0.75]
        ratios = [steered[f"s.{u}"] / sampled[f"s.{u}"] for u in free]
        assert max(ratios) == pytest.approx(min(ratios), rel=0.01)
        assert steered["criterion"] == sampled["criterion"]


def test_a_larger_fixed_margin_lands_further_inside_a_latency_budget(steering):
    steer, budget = steering
    sampled = _sample(steer.space, 0)
    _, plain = steer.project(sampled)  # the error-tracking margin: 5 % to start
    steered, further = steer.project(sampled, margin=0.15)
    # 15 % inside, short of it by no more than the channel blocks' step
    assert budget.value * 0.7 <= further[PREDICTED + KEY] <= budget.value * 0.85 + 1e-9
    assert further[PREDICTED + KEY] < plain[PREDICTED + KEY] - 0.05 * budget.value


def test_a_start_point_aims_at_its_own_margin_not_at_the_recent_errors(steering):
    steer, budget = steering
    steer = copy.copy(steer)  # the fixture is shared
    steer._errors = [0.2] * 6  # the cost model read recent plans 20 % slow
    assert steer.margin(budget) == pytest.approx(0.2)
    assert steer.margin(budget, 0.04) == pytest.approx(0.04)
    sampled = _sample(steer.space, 0)
    _, sampled_plan = steer.project(sampled)
    _, start = steer.project(sampled, margin=0.04)
    assert sampled_plan[PREDICTED + KEY] <= budget.value * 0.80 + 1e-9
    assert budget.value * 0.85 <= start[PREDICTED + KEY] <= budget.value * 0.96 + 1e-9


def test_steering_along_a_path_takes_its_least_point_that_fits(steering):
    steer, budget = steering
    space = steer.space

    def uniform_at(x):
        return {"criterion": "l1", "ft.lr_scale": 1.0,
                **{f"s.{u}": round(x, 4) for u in space.units}}

    along, predicted = steer.project_along(uniform_at, 0.75)
    scaled, _ = steer.project(uniform_at(0.5))  # one uniform scale: the same least point
    assert along == pytest.approx(scaled, abs=1e-3)
    assert budget.value * 0.8 <= predicted[PREDICTED + KEY] <= budget.value * 0.95 + 1e-9
    # a budget out of the path's reach takes its end
    far = Steering(space, steer.model, [parse_budget("latency<1%").resolve(
        {KEY: budget.value / 0.7}, "cpu")], "cpu")
    assert far.project_along(uniform_at, 0.75)[0] == uniform_at(0.75)


def test_projection_takes_the_least_pruning_that_fits_where_latency_is_not_monotonic(steering):
    # A machine where 35-45 % sparsity is slower than 30 % (e.g. input channels off the conv
    # kernels' blocks): bisection from the middle would settle past the bump, at 45 %.
    steer, budget = steering

    class Bumpy:
        def predict(self, plan):
            s = max(rule.sparsity for rule in plan.rules.values())
            slow = 0.35 <= s < 0.45
            return {KEY: budget.value * (1.0 if slow else (1 - s) / 0.75)}

    bumpy = Steering(steer.space, Bumpy(), [budget], "cpu")
    uniform = dict.fromkeys((f"s.{u}" for u in steer.space.units), 0.5)
    steered, predicted = bumpy.project({"criterion": "l1", **uniform})
    # (1 - s) / 0.75 <= 0.95 (the 5 % margin) from s = 0.2875
    (s,) = {steered[f"s.{u}"] for u in steer.space.units}
    assert s == pytest.approx(0.2875, abs=2e-4)
    assert predicted[PREDICTED + KEY] == pytest.approx(budget.value * 0.95, rel=1e-3)


def test_an_all_zero_allocation_counts_as_uniform_and_baselines_are_not_steered(steering):
    steer, budget = steering
    zero = {**_sample(steer.space, 0), **{f"s.{u}": 0.0 for u in steer.space.units}}
    steered, predicted = steer.project(zero)
    assert len({steered[f"s.{u}"] for u in steer.space.units}) == 1
    assert predicted[PREDICTED + KEY] <= budget.value
    fixed, predicted = steer.project(zero, steer=False)
    assert fixed == zero and predicted[PREDICTED + KEY] > budget.value


def test_a_steered_search_records_measured_latency_never_the_prediction(
        tmp_path, fast_target, compute_bound_task, monkeypatch):
    real = Steering.project

    def wrong_prediction(self, params, steer=True, margin=None):  # never recorded
        params, predicted = real(self, params, steer, margin)
        return params, {**predicted, PREDICTED + latency_key("fast"): 1e6}

    monkeypatch.setattr(Steering, "project", wrong_prediction)
    result = run_search(compute_bound_task, "per_layer_structured", ["latency<60%"],
                        targets=[fast_target], trials=9, finetune_steps=3,
                        output=tmp_path / "r", progress=False)
    config, results = load_run(result.run_dir)
    budget = config.parsed_budgets()[0]
    assert budget.fraction == pytest.approx(0.6)
    assert budget.value == pytest.approx(0.6 * config.reference[latency_key("fast")])
    assert [r.baseline for r in results[:5]][-1] == UNIFORM_FIT
    lat = latency_key("fast")
    for r in results:
        assert 0 < r.metrics[lat] < 1000 and r.metrics[PREDICTED + lat] == 1e6
    assert (result.run_dir / "cost_profile.jsonl").is_file()
    assert "latency<60% (= latency<" in result.summary


def test_a_repeated_plan_reuses_its_result(tmp_path, fast_target, monkeypatch):
    calls = []
    real = _optuna.run_trial

    def counted(task, plan, *args, **kwargs):
        calls.append(plan.key())
        return real(task, plan, *args, **kwargs)

    monkeypatch.setattr(_optuna, "run_trial", counted)
    # One sparsity for all groups, steered onto the budget: every searched sample is one plan.
    result = run_search(SYNTHETIC, "uniform_structured", ["params<40%"], targets=[fast_target],
                        trials=9, finetune_steps=3, output=tmp_path / "r", progress=False)
    searched = [r for r in result.results if not r.baseline]
    assert len(searched) == 4 and len(calls) == len(set(calls)) == 5
    first = next(r for r in result.results if r.baseline == UNIFORM_FIT)
    for r in searched:
        assert r.reused_from == first.number and r.plan.key() == first.plan.key()
        assert r.metrics["params"] == first.metrics["params"]
    rows = (result.run_dir / "trials.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in rows]
    assert sum("reused_from" in row for row in rows) == 4


def test_the_backend_measures_the_dense_model_and_the_cost_profile(
        tmp_path, fast_target, compute_bound_task, monkeypatch):
    # Where the trials measure (on a Ray cluster: a trial node), not always on the driver.
    calls = []
    real = _optuna.OptunaBackend.measure

    def recorded(self, ctx, plans, screen=False):
        metrics = real(self, ctx, plans, screen)
        calls.append(([p.key() for p in plans], screen, metrics))
        return metrics

    monkeypatch.setattr(_optuna.OptunaBackend, "measure", recorded)
    result = run_search(compute_bound_task, "per_layer_structured", ["latency<60%"],
                        targets=[fast_target], trials=2, finetune_steps=2,
                        output=tmp_path / "r", progress=False)
    config, _ = load_run(result.run_dir)
    assert len(calls) == 2  # the most pruned plan screens far inside 60 %: no re-time in full
    (dense, screen, metrics), (profiled, profile_screen, _) = calls
    assert dense == [PruningPlan().key()] and screen is False
    assert config.reference == metrics[0]
    profile = (result.run_dir / "cost_profile.jsonl").read_text().splitlines()
    assert profile_screen is True and len(profiled) == len(profile) >= 4


@pytest.mark.parametrize("first, status, backend", [(0.05, "infeasible", "optuna"),
                                                    (0.75, "complete", "optuna"),
                                                    (0.05, "infeasible", "ray")])
def test_a_fit_baseline_that_misses_the_budget_or_lands_far_inside_is_steered_again(
        first, status, backend, tmp_path, fast_target, monkeypatch):
    from autoprune.search._base import SearchContext

    real, missed = SearchContext.steer, []

    def first_fit_misses(self, params, baseline=None):  # as a cost model far off would
        if baseline == UNIFORM_FIT and not missed:
            missed.append(params)
            return {k: first if k.startswith("s.") else v for k, v in params.items()}, {}
        return real(self, params, baseline)

    monkeypatch.setattr(SearchContext, "steer", first_fit_misses)
    if backend == "ray":
        pytest.importorskip("ray.tune")
    result = run_search(SYNTHETIC, "per_layer_structured", ["params<40%"],
                        targets=[fast_target], trials=7, finetune_steps=3,
                        output=tmp_path / "r", progress=False, backend=backend,
                        **({"workers": 1} if backend == "ray" else {}))
    fits = [r for r in result.results if r.baseline == UNIFORM_FIT]
    dense = result.results[0].metrics["params"]
    assert len(missed) == 1 and len(fits) == 2 and fits[0].status == status
    if status == "infeasible":
        assert fits[0].reason.startswith("breaks params<40%")
    else:  # 75 % of every group: far more than the budget asks
        assert fits[0].metrics["params"] < 0.2 * dense
    assert fits[1].status == "complete" and fits[1].params == fits[0].params
    assert 0.3 * dense < fits[1].metrics["params"] < 0.4 * dense  # steered just inside
    assert fits[1].number > fits[0].number


def test_a_start_point_that_missed_is_retried_past_its_own_miss(steering):
    from pathlib import Path
    from types import SimpleNamespace

    from autoprune.search._base import SearchContext
    from autoprune.trial import TrialResult

    steer, budget = steering
    steer = copy.deepcopy(steer)  # it learns from the miss
    ctx = SearchContext(task_spec="t", task=None, space=steer.space, objectives=[], config=None,
                        settings=SimpleNamespace(primary="cpu", budgets=[budget]),
                        run_dir=Path("."), trials=3, steering=steer)
    params = _sample(steer.space, 0)
    first, predicted = ctx.steer(params, UNIFORM_FIT)
    assert budget.value * 0.9 <= predicted[PREDICTED + KEY] <= budget.value * 0.96 + 1e-9
    # measured 30 % slower than predicted: outside the budget; the refit model moves part way
    plan = steer.space.build(first)
    ctx.record(TrialResult(plan, "infeasible", {KEY: 1.3 * predicted[PREDICTED + KEY]},
                           baseline=UNIFORM_FIT, params=params))
    missed = ctx._missed_by(UNIFORM_FIT)
    refit = steer.model.predict(plan)[KEY]
    assert missed == pytest.approx(1.3 * predicted[PREDICTED + KEY] / refit - 1) and missed > 0
    _, again = ctx.steer(params, UNIFORM_FIT)
    assert again[PREDICTED + KEY] <= budget.value * (0.96 - missed) + 1e-9


def test_a_search_on_grouped_convs_profiles_and_tries_whole_groups(tmp_path, fast_target):
    task = tmp_path / "resnext_task.py"
    task.write_text("from autoprune.testing.tasks import synthetic_task\n\n\n"
                    "def make_task():\n"
                    "    return synthetic_task(model='resnext_tiny', train_steps=2)\n")
    result = run_search(f"{task}:make_task", "per_layer_structured", ["latency<90%"],
                        targets=[fast_target], trials=6, finetune_steps=1,
                        output=tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in
            (result.run_dir / "cost_profile.jsonl").read_text().splitlines()]
    whole = [r for r in rows if any(rule.get("whole_groups") for rule in r["plan"]["rules"]
                                    .values())]
    assert len(whole) == 2  # two levels of whole conv groups
    assert sorted(name for name, rule in whole[0]["plan"]["rules"].items()
                  if rule.get("whole_groups")) == ["stages.0.grouped.0", "stages.1.grouped.0"]
    _, trials = load_run(result.run_dir)
    for t in trials:  # every plan says which way its grouped convs lose width
        assert t.plan.rules["stages.1.grouped.0"].whole_groups is t.params["whole_groups"]
    assert sum(t.status == "complete" for t in trials) >= 3
