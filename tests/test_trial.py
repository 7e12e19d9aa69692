from __future__ import annotations

import pytest

import autoprune.search._confirm as confirm_module
from autoprune.budget import latency_key, parse_budgets
from autoprune.latency import LatencyCache, LatencyStats, Target
from autoprune.metrics import SCREENED
from autoprune.plan import PruningPlan
from autoprune.results import RunConfig, target_front
from autoprune.search import report_every
from autoprune.search._confirm import confirm_fronts
from autoprune.task import load_task
from autoprune.trial import TrialResult, TrialSettings, run_trial

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
FAST = {"warmup_runs": 2, "warmup_seconds": 0.0, "min_runs": 5, "min_seconds": 0.0,
        "max_seconds": 0.2}
LAT = latency_key("fast")


@pytest.fixture(scope="module")
def task():
    return load_task(SYNTHETIC, finetune_steps=2)


@pytest.fixture(scope="module")
def target():
    return Target.from_dict({"base": "cpu-1t", "name": "fast", **FAST})


def test_latency_is_screened_against_the_p50_budget(task, target, monkeypatch):
    import autoprune.latency

    real, calls = autoprune.latency.measure_latency, []

    def measure_latency(*args, **kwargs):
        calls.append((kwargs.get("screen", False), kwargs.get("limit_ms")))
        return real(*args, **kwargs)

    monkeypatch.setattr(autoprune.latency, "measure_latency", measure_latency)
    # The busy-machine rule (a spread screening value is measured again in full) is tested on
    # its own; here other load on the machine must not change which protocol decides.
    monkeypatch.setattr(LatencyStats, "busy", property(lambda self: False))
    plan = PruningPlan.uniform(0.5)
    cache = LatencyCache()
    for budgets in (["latency<5s", "latency<=2ms", "params<1M"], ["latency<1ms@p90"], []):
        result = run_trial(task, plan, TrialSettings([target], parse_budgets(budgets),
                                                     latency_cache=cache))
        assert result.status == "complete" and result.metrics[SCREENED + "fast"] == 1.0
    assert calls == [(True, 2.0), (True, None), (True, None)]
    calls.clear()
    # a p90 budget right at the screened p90: the stopping rule cannot decide it, so the plan
    # is measured again in full
    p90 = run_trial(task, plan, TrialSettings([target], latency_cache=cache)).metrics
    near = TrialSettings([target], parse_budgets([f"latency<{p90[latency_key('fast', 'p90')]}"
                                                  f"ms@p90"]), latency_cache=cache)
    result = run_trial(task, plan, near)  # either side of the line, by the full measurement
    assert result.status in ("complete", "infeasible") and SCREENED + "fast" not in result.metrics
    assert calls[-2:] == [(True, None), (False, None)]
    full = run_trial(task, plan, TrialSettings([target], screen_latency=False))
    assert SCREENED + "fast" not in full.metrics and calls[-1] == (False, None)
    # every statistic a budget can name is recorded, with the median's CI
    assert {latency_key("fast", s) for s in ("p50", "p90", "mean")} <= set(full.metrics)
    assert 0 < full.metrics["latency_ci@fast"] < 1


def test_only_the_dense_plan_is_evaluated_when_infeasible(task, target):
    settings = TrialSettings([target], parse_budgets(["latency<1us"]))
    pruned = run_trial(task, PruningPlan.uniform(0.5), settings)
    assert pruned.status == "infeasible" and "accuracy" not in pruned.metrics
    assert "evaluate" not in pruned.timings
    dense = run_trial(task, PruningPlan(), settings)
    assert dense.status == "infeasible" and dense.metrics["accuracy"] > 0.9
    settings.evaluate_infeasible = True
    assert "accuracy" in run_trial(task, PruningPlan.uniform(0.5), settings).metrics


def _result(number: int, accuracy: float, latency: float) -> TrialResult:
    return TrialResult(PruningPlan.uniform(number / 10), "complete", number=number,
                       metrics={"accuracy": accuracy, LAT: latency, SCREENED + "fast": 1.0})


def test_confirm_fronts_re_measures_until_every_front_plan_is_full(monkeypatch):
    config = RunConfig(task="t", space={}, budgets=["latency<0.9ms"], targets=[{"name": "fast"}],
                       objectives=[{"key": "accuracy", "direction": "maximize"},
                                   {"key": LAT, "direction": "minimize"}],
                       metric="accuracy", metric_direction="maximize")
    a, b, c, d = _result(1, 0.9, 0.85), _result(2, 0.8, 0.5), _result(3, 0.7, 0.6), \
        _result(4, 0.6, 0.95)
    full = {1: 0.95, 2: 0.7, 3: 0.65}  # trial 1 breaks the budget in full; 3 joins the front
    calls = []

    def measure_plan(task, plan, settings, targets):
        number = round(plan.default.sparsity * 10)
        calls.append(number)
        return {LAT: full[number], "size_bytes": 1.0}

    monkeypatch.setattr(confirm_module, "measure_plan", measure_plan)
    said = []
    results = [a, b, c, d]
    taken = confirm_fronts(None, results, config, TrialSettings([Target(name="fast")]),
                           say=said.append)
    assert sorted(calls) == [1, 2, 3] and taken == 3
    assert [r.number for r in target_front(results, config, "fast")] == [2, 3]
    assert a.metrics[LAT] == 0.95 and SCREENED + "fast" not in a.metrics
    assert d.metrics[SCREENED + "fast"] == 1.0  # never on a front: keeps its screening value
    assert "size_bytes" not in b.metrics and said[0].startswith("re-measuring 2 front")


def test_a_failed_re_measurement_keeps_the_screened_mark(monkeypatch):
    config = RunConfig(task="t", space={}, budgets=[], targets=[{"name": "fast"}],
                       objectives=[{"key": "accuracy", "direction": "maximize"},
                                   {"key": LAT, "direction": "minimize"}],
                       metric="accuracy", metric_direction="maximize")
    a, b = _result(1, 0.9, 0.8), _result(2, 0.8, 0.5)

    def measure_plan(task, plan, settings, targets):
        if plan.default.sparsity == pytest.approx(0.1):
            raise RuntimeError("device gone")
        return {LAT: 0.55}

    monkeypatch.setattr(confirm_module, "measure_plan", measure_plan)
    said = []
    assert confirm_fronts(None, [a, b], config, TrialSettings([Target(name="fast")]),
                          say=said.append) == 2
    assert a.metrics[SCREENED + "fast"] == 1.0 and a.metrics[LAT] == 0.8
    assert SCREENED + "fast" not in b.metrics and b.metrics[LAT] == 0.55
    assert any("trial 1: full re-measurement failed (RuntimeError: device gone)" in x
               for x in said)


@pytest.mark.parametrize("steps,every", [(40, 14), (30, 11), (100, 34), (6, 4), (4, 3), (3, 2)])
def test_early_stopping_reports_skip_the_last_step(steps, every):
    assert report_every(steps) == every and steps % every != 0



def test_plans_a_relative_budget_rules_out_side_by_side_bring_the_next_onto_the_front(
        monkeypatch):
    # latency<50% of a 2 ms dense model: 1 ms. Trials 1 and 2 are on the front by their
    # medians; timed side by side they run at 60 % and 55 % of the dense model, which puts
    # trial 3 on the front: it is re-measured in full and timed too.
    config = RunConfig(task="t", space={}, budgets=["latency<50%"], targets=[{"name": "fast"}],
                       objectives=[{"key": "accuracy", "direction": "maximize"},
                                   {"key": LAT, "direction": "minimize"}],
                       metric="accuracy", metric_direction="maximize", reference={LAT: 2.0})
    dense = TrialResult(PruningPlan(), "infeasible", number=0, baseline="dense",
                        metrics={"accuracy": 0.95, LAT: 2.0})
    a, b, c = _result(1, 0.9, 0.9), _result(2, 0.8, 0.5), _result(3, 0.7, 0.6)
    ratio = {1: 0.6, 2: 0.55, 3: 0.35}
    measured, timed = [], []

    def measure_plan(task, plan, settings, targets):
        measured.append(round(plan.default.sparsity * 10))
        return {LAT: {1: 0.9, 2: 0.5, 3: 0.6}[measured[-1]]}

    def time_side_by_side(task, results, config, settings, say=None):
        shown = [r for r in target_front(results, config, "fast") if r.baseline != "dense"]
        timed.append(sorted(r.number for r in shown))
        for r in shown:
            r.metrics["side_by_side_" + LAT] = ratio[r.number]

    monkeypatch.setattr(confirm_module, "measure_plan", measure_plan)
    monkeypatch.setattr(confirm_module, "time_side_by_side", time_side_by_side)
    results = [dense, a, b, c]
    confirm_module.confirm_and_time(None, results, config,
                                    TrialSettings([Target(name="fast")]), say=lambda _: None)
    assert [r.number for r in target_front(results, config, "fast")] == [3]
    assert sorted(measured) == [1, 2, 3] and timed == [[1, 2], [3]]
    assert not confirm_module.untimed(results, config, TrialSettings([Target(name="fast")]))


def test_a_side_by_side_timing_that_times_nothing_is_not_retried_round_after_round(
        monkeypatch):
    config = RunConfig(task="t", space={}, budgets=["latency<50%"], targets=[{"name": "fast"}],
                       objectives=[{"key": "accuracy", "direction": "maximize"},
                                   {"key": LAT, "direction": "minimize"}],
                       metric="accuracy", metric_direction="maximize", reference={LAT: 2.0})
    a = _result(1, 0.9, 0.5)
    rounds = []
    monkeypatch.setattr(confirm_module, "measure_plan", lambda *args: {LAT: 0.5})
    monkeypatch.setattr(confirm_module, "time_side_by_side",
                        lambda *args, **kwargs: rounds.append(1))  # e.g. its timing failed
    confirm_module.confirm_and_time(None, [a], config, TrialSettings([Target(name="fast")]),
                                    say=lambda _: None)
    assert len(rounds) == 2 and SCREENED + "fast" not in a.metrics


def test_cost_measurements_skip_the_calibration_passes_of_data_aware_criteria(monkeypatch):
    from autoprune import data_importance
    from autoprune.plan import PruningPlan
    from autoprune.testing.tasks import synthetic_task
    from autoprune.trial import TrialSettings, measure_plan

    task = synthetic_task()
    calls = []
    real = data_importance.collect_statistics
    monkeypatch.setattr("autoprune.prune._apply.collect_statistics",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fisher = measure_plan(task, PruningPlan.uniform(0.5, criterion="fisher"),
                          TrialSettings(targets=[]), [])
    assert not calls
    assert fisher == measure_plan(task, PruningPlan.uniform(0.5), TrialSettings(targets=[]), [])


def test_criterion_fallbacks_are_kept_with_the_trial_and_shown_in_the_summary():
    from autoprune.results import summarize

    lat = latency_key("cpu-1t")
    config = RunConfig(task=SYNTHETIC, space={"name": "bn"}, budgets=[],
                       targets=[{"name": "cpu-1t", "spec": "cpu-1t"}],
                       objectives=[{"key": "accuracy", "direction": "maximize"},
                                   {"key": lat, "direction": "minimize"}],
                       metric="accuracy", metric_direction="maximize")
    fell_back = TrialResult(PruningPlan.uniform(0.5, criterion="bn_scale"), "complete",
                            {"accuracy": 0.9, lat: 1.0}, number=1,
                            fallbacks={"layers.0.fc1": "bn_scale -> l1",
                                       "layers.1.fc1": "bn_scale -> l1"})
    again = TrialResult.from_dict(fell_back.to_dict())
    assert again.fallbacks == fell_back.fallbacks
    plain = TrialResult(PruningPlan(), "complete", {"accuracy": 0.95, lat: 2.0}, number=0,
                        baseline="dense")
    assert "fallbacks" not in plain.to_dict()
    text = summarize([plain, fell_back], config)
    assert ("## Criterion fallbacks (1 trials)\n\n- trial 1: 2 group(s) ranked bn_scale -> l1 "
            "(the criterion cannot score them), e.g. layers.0.fc1") in text


def test_refused_pinning_is_a_warning_the_trial_records(task, target, monkeypatch):
    import dataclasses
    import os

    from autoprune.results import summarize

    def refuse(pid, cores):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    pinned = dataclasses.replace(target, pin_threads=True)
    settings = TrialSettings(targets=[pinned], budgets=[], latency_cache=LatencyCache())
    result = run_trial(task, PruningPlan.uniform(0.25), settings)
    assert result.status == "complete"
    core = max(os.sched_getaffinity(0))
    assert result.warnings == [
        f"timing ran unpinned: pinning to core {core} was refused (Operation not permitted); "
        "set pin_threads: false in the target profile where pinning is not allowed"]
    assert TrialResult.from_dict(result.to_dict()).warnings == result.warnings
    result.number = 3
    config = RunConfig(task=SYNTHETIC, space={"name": "s"}, budgets=[],
                       targets=[{"name": "fast", "spec": "fast.yaml"}],
                       objectives=[{"key": "accuracy", "direction": "maximize"},
                                   {"key": LAT, "direction": "minimize"}],
                       metric="accuracy", metric_direction="maximize")
    assert f"## Warnings\n\n- {result.warnings[0]} (trials 3)" in summarize([result], config)
    # unpinned by choice: no warning
    plain = run_trial(task, PruningPlan.uniform(0.25), TrialSettings(
        targets=[target], budgets=[], latency_cache=LatencyCache()))
    assert plain.warnings == []


def test_a_lost_ray_early_stopper_is_a_warning_the_trial_records(task, target):
    from autoprune.search._ray._trainable import _early_stopping

    class Gone:  # ray without the stopper actor
        def get_actor(self, name):
            raise ValueError(f"Failed to look up actor {name}")

    class Silent:  # ray whose stopper actor stops answering
        def get_actor(self, name):
            return self

        @property
        def should_stop(self):
            return self

        def remote(self, *args):
            return None

        def get(self, ref, timeout):
            raise TimeoutError("GetTimeoutError")

    curve = []
    on_intermediate, lost = _early_stopping(Gone(), "stopper", curve)
    assert lost == "early stopping lost: the stopper actor is gone; the trial ran to the end"
    assert on_intermediate(1, 0.5) is False and curve == [(1, 0.5)]
    on_intermediate, lost = _early_stopping(Silent(), "stopper", [])
    settings = TrialSettings(targets=[target], budgets=[], latency_cache=LatencyCache(),
                             finetune=task.finetune.replace(steps=6, eval_every=4))
    result = run_trial(task, PruningPlan.uniform(0.25), settings, on_intermediate=on_intermediate)
    assert lost is None and result.status == "complete"
    assert result.warnings == ["early stopping lost: the stopper actor did not answer "
                               "(TimeoutError); the trial went on without it"]
