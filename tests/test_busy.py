"""The busy-machine guard: flagged measurements, the verdicts they could flip, and where a user
sees them (progress line, summary, deployment plan, report)."""

from __future__ import annotations

import io
import json

import pytest

import autoprune.latency._measure as measure_module
from autoprune.budget import latency_key
from autoprune.busy import busy_lines, busy_measurements, busy_note
from autoprune.deployment import deployment_plan, write_deployment_plan
from autoprune.latency import load_target, summarize
from autoprune.metrics import BUSY, FASTEST
from autoprune.plan import PruningPlan
from autoprune.results import RunConfig, write_run
from autoprune.results import summarize as summarize_run
from autoprune.search import _progress_printer
from autoprune.task import load_task
from autoprune.trial import TrialResult, TrialSettings, run_trial

TASK = "autoprune.testing.tasks:synthetic_task"


def _config(budgets: list[str]) -> RunConfig:
    return RunConfig(
        task=TASK, space={"name": "test"}, budgets=budgets,
        targets=[{"name": "edge", "spec": "cpu-1t"}],
        objectives=[{"key": "accuracy", "direction": "maximize"},
                    {"key": latency_key("edge"), "direction": "minimize"}],
        metric="accuracy", metric_direction="maximize")


def _trial(number: int, p50: float, p90: float, fastest: float, status: str = "complete",
           accuracy: float = 0.9):
    metrics = {"accuracy": accuracy, latency_key("edge"): p50,
               latency_key("edge", "p90"): p90, "latency_cv@edge": (p90 - p50) / p50,
               FASTEST + "edge": fastest, BUSY + "edge": float(p90 > 1.5 * p50)}
    return TrialResult(PruningPlan.uniform(0.1 * number), status, metrics, number=number,
                       baseline="dense" if number == 0 else None)


@pytest.fixture
def run():
    config = _config(["latency<2ms"])
    results = [
        _trial(0, 2.13, 6.35, 1.02, "infeasible"),  # busy; 1.02 <= 2 <= 2.13: could flip
        _trial(1, 1.90, 2.00, 1.80),  # quiet
        _trial(2, 1.50, 4.00, 1.20, accuracy=0.8),  # busy, but meets the budget anyway
    ]
    return config, results


def test_busy_measurements_and_the_verdicts_they_could_flip(run):
    config, results = run
    busy = busy_measurements(results, config)
    assert [(b.trial.number, b.flips) for b in busy] == [(0, ["latency<2ms"]), (2, [])]
    assert busy[0].describe() == ("trial 0 on edge: p50 2.130 ms, p90 6.350 ms (2.98x p50), "
                                  "CV 198%, fastest run 1.020 ms")
    lines = busy_lines(results, config)
    assert lines[0] == "## Busy machine"
    assert lines[2].startswith("2 of 3 latency measurements were taken while the machine was "
                               "busy (p90 above 1.5x the median)")
    assert "- trial 0 on edge: p50 2.130 ms" in lines[4]
    assert lines[4].endswith("its verdict on latency<2ms could flip (infeasible)")
    assert lines[-1] == ("Budget verdicts that could flip (the budget lies between the fastest "
                         "run and the measured value): trial 0 (latency<2ms on edge).")
    assert busy_lines(results[1:2], config) == []  # a quiet run says nothing


def test_summary_plan_and_report_show_the_busy_measurements(run, tmp_path):
    config, results = run
    assert "## Busy machine" in summarize_run(results, config)
    plan = deployment_plan(config, results)
    assert [b["trial"] for b in plan.to_dict()["busy_measurements"]] == [0, 2]
    assert plan.to_dict()["busy_measurements"][0] == {
        "trial": 0, "target": "edge", "p50_ms": 2.13, "p90_ms": 6.35,
        "cv": pytest.approx(1.981, abs=1e-3), "fastest_ms": 1.02, "could_flip": ["latency<2ms"]}
    config.save(tmp_path)
    write_run(tmp_path, config, results)
    markdown = write_deployment_plan(tmp_path)
    assert "## Busy machine" in markdown and "trial 0 (latency<2ms on edge)" in markdown
    assert json.loads((tmp_path / "deployment.json").read_text())["busy_measurements"]
    pytest.importorskip("plotly")
    from autoprune.report import write_report

    html = write_report(tmp_path).read_text()
    assert "<h2>Busy machine</h2>" in html and "<li>trial 0 on edge: p50 2.130 ms" in html


def test_progress_line_flags_a_busy_measurement(run):
    config, results = run
    assert busy_note(results[0], ["edge"]) == "BUSY@edge p90/p50 2.98 CV 198%"
    assert busy_note(results[1], ["edge"]) == ""
    stream = io.StringIO()
    show = _progress_printer(3, config, stream)
    show(results[1], results[:2])
    show(results[0], results)
    first, second = stream.getvalue().splitlines()
    assert "BUSY" not in first
    assert "p50=2.130ms BUSY@edge p90/p50 2.98 CV 198% |" in second


def test_trial_flags_a_busy_measurement(monkeypatch):
    spread = summarize([1.0] * 80 + [3.0] * 20)  # p90 3 ms: 3x the median
    monkeypatch.setattr(measure_module, "measure_onnx", lambda *a, **k: (spread, []))
    task = load_task(TASK, finetune_steps=1)
    target = load_target("cpu-1t")
    result = run_trial(task, PruningPlan.uniform(0.5), TrialSettings(targets=[target],
                                                                     screen_latency=False))
    m = result.metrics
    assert m[BUSY + "cpu-1t"] == 1.0 and m[FASTEST + "cpu-1t"] == 1.0
    assert m[latency_key("cpu-1t", "p90")] == 3.0
    monkeypatch.setattr(measure_module, "measure_onnx",
                        lambda *a, **k: (summarize([1.0] * 100), []))
    quiet = run_trial(task, PruningPlan.uniform(0.5), TrialSettings(targets=[target]))
    assert quiet.metrics[BUSY + "cpu-1t"] == 0.0
