"""Deployment plans: a two-target search on loopback (local cpu-1t + `serve-latency`), the
recommended/closest plan per target, unknown targets in budgets, INT8 trials."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoprune.budget import latency_key
from autoprune.cli import main
from autoprune.deployment import deployment_plan, write_deployment_plan
from autoprune.errors import BudgetError
from autoprune.plan import LayerRule, PruningPlan
from autoprune.results import RunConfig, load_run, target_budgets, target_front, write_run
from autoprune.trial import TrialResult

TASK = "autoprune.testing.tasks:synthetic_task"


@pytest.fixture(scope="module")
def latency_server(tmp_path_factory):
    """`autoprune serve-latency` on 127.0.0.1 (a free port), in a subprocess."""
    tmp = tmp_path_factory.mktemp("server")
    token_file = tmp / "token"
    token_file.write_text("loopback-secret\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoprune.cli", "serve-latency", "--host", "127.0.0.1",
         "--port", "0", "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, line = time.time() + 60, ""
        while time.time() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
                if "latency server on" in line:
                    break
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"serve-latency did not start: {line!r}"
        yield f"remote://127.0.0.1:{match[1]}", token_file
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# Few timed runs: these tests check plumbing and values, not timing precision (a busy machine
# would otherwise time every model until the 10 s cap).
FAST = {"warmup_runs": 2, "warmup_seconds": 0.0, "min_runs": 5, "min_seconds": 0.02,
        "max_runs": 200, "max_seconds": 0.2, "target_ci": 0.05}


@pytest.fixture(scope="module")
def loopback_run(tmp_path_factory, latency_server):
    """A search measured on a local cpu-1t and on the loopback `serve-latency` device."""
    from autoprune.search import run_search

    remote, token_file = latency_server
    tmp = tmp_path_factory.mktemp("run")
    local = tmp / "cpu-1t.json"
    local.write_text(json.dumps({"base": "cpu-1t", **FAST}))
    device = tmp / "device.json"  # what `--target remote://HOST:PORT` is, with FAST settings
    device.write_text(json.dumps({"base": "cpu-1t", "name": remote, **FAST,
                                  "remote": remote.removeprefix("remote://")}))
    out = tmp / "run"
    result = run_search(
        TASK, "per_layer_structured", ["latency<50ms@cpu-1t", f"latency<50ms@{remote}"],
        targets=[str(local), str(device)], token_file=str(token_file), trials=6,
        finetune_steps=4, output=out, progress=False)
    return out, remote, result


def test_two_target_search_keeps_two_fronts_and_writes_the_plan(loopback_run):
    run_dir, remote, result = loopback_run
    config, results = load_run(run_dir)
    assert config.target_names == ["cpu-1t", remote]
    assert len(results) == 6
    complete = [r for r in results if r.status == "complete"]
    assert len(complete) >= 4  # dense + 3 uniform baselines at least
    for r in complete:  # every trial measured on both targets (the remote one via HTTP)
        for target in ("cpu-1t", remote):
            assert r.metrics[latency_key(target)] > 0
            assert r.metrics[latency_key(target, "p90")] >= r.metrics[latency_key(target)] * 0.5
    fronts = {t: target_front(results, config, t) for t in config.target_names}
    assert all(fronts.values())
    for front in fronts.values():
        for r in front:
            assert (run_dir / "pareto" / f"trial_{r.number}.json").is_file()

    markdown = write_deployment_plan(run_dir)
    assert (run_dir / "deployment.md").read_text() == markdown
    data = json.loads((run_dir / "deployment.json").read_text())
    assert [t["target"] for t in data["targets"]] == ["cpu-1t", remote]
    dense = next(r for r in results if r.baseline == "dense")
    for entry in data["targets"]:
        assert entry["meets_budgets"] is True
        assert (run_dir / entry["plan_file"]).is_file()
        plan_file = json.loads((run_dir / entry["plan_file"]).read_text())
        assert plan_file["trial"] == entry["trial"]
        PruningPlan.from_dict(plan_file["plan"])  # a plan `autoprune apply` can load
        # 50 ms holds for every plan: the best accuracy wins, i.e. the dense model.
        assert entry["trial"] == dense.number
        assert entry["accuracy"] == pytest.approx(dense.metrics["accuracy"])
        assert entry["speedup_vs_dense"] == pytest.approx(1.0)
        assert entry["latency_p50_ms"] == dense.metrics[latency_key(entry["target"])]
        assert entry["budgets"] == [f"latency<50ms@{entry['target']}"]
    assert "| cpu-1t " in markdown and f"| {remote} " in markdown
    assert "device.json --token-file TOKEN_FILE" in markdown  # the remote target's line
    # The remote target's values came from the server (cache keys name the device).
    assert f"remote={remote.removeprefix('remote://')}" in (
        run_dir / "latency_cache.json").read_text()
    assert data["all_targets"]["trial"] == dense.number


def test_plan_cli_prints_the_table(loopback_run, capsys):
    run_dir, remote, _ = loopback_run
    assert main(["plan", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Deployment plan") and remote in out and "speed-up vs dense" in out


def test_budget_naming_an_unknown_target_is_rejected(tmp_path, capsys):
    from autoprune.search import run_search

    with pytest.raises(BudgetError, match=r"names target 'gpu'.*targets: cpu-1t.*--target gpu"):
        run_search(TASK, "per_layer_structured", ["latency<5ms@gpu"], targets=["cpu-1t"],
                   trials=2, output=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # rejected before anything ran
    code = main(["search", "--task", TASK, "--target", "cpu-1t", "--target", "cpu",
                 "--budget", "latency<2ms@edge", "--output", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2
    assert "'edge'" in err and "cpu-1t, cpu" in err
    assert not (tmp_path / "cli").exists()


def test_int8_trial_is_measured_on_every_target():
    from autoprune.latency import load_target
    from autoprune.task import load_task
    from autoprune.trial import TrialSettings, run_trial

    task = load_task(TASK)
    targets = [dataclasses.replace(load_target(t), **FAST) for t in ("cpu-1t", "cpu")]
    settings = TrialSettings(targets=targets, finetune=task.finetune.replace(steps=2))
    plan = PruningPlan.uniform(0.25)
    fp32 = run_trial(task, plan, settings)
    int8 = run_trial(task, PruningPlan.uniform(0.25, quantize="int8"), settings)
    assert fp32.status == int8.status == "complete", (fp32.reason, int8.reason)
    for target in ("cpu-1t", "cpu"):
        assert int8.metrics[latency_key(target)] > 0
        assert int8.metrics[latency_key(target, "p90")] > 0
    # Same pruned architecture; INT8 weights: the ONNX model is smaller than the fp32 weights
    # (biases, scales and the graph stay, so less than 4x on this 11K-parameter model).
    assert int8.metrics["params"] == fp32.metrics["params"]
    assert int8.metrics["size_bytes"] < 0.75 * fp32.metrics["size_bytes"]
    # the accuracy is the INT8 model's; the same fine-tuned fp32 model's stands beside it
    assert int8.metrics["accuracy_fp32"] == pytest.approx(fp32.metrics["accuracy"])
    assert abs(int8.metrics["accuracy"] - fp32.metrics["accuracy"]) <= 0.05


def test_int8_search_space_is_measured_and_shipped(tmp_path):
    """quantize: [int8] in a space: every trial is quantized, measured, and shown as such."""
    from autoprune.search import run_search

    space = tmp_path / "int8.yaml"
    space.write_text("name: int8_structured\nsparsity: {low: 0.0, high: 0.5, step: 0.25}\n"
                     "share: global\nmodes: [structured]\ncriteria: [l1]\nquantize: [int8]\n")
    target = tmp_path / "cpu-1t.json"
    target.write_text(json.dumps({"base": "cpu-1t", **FAST}))
    run = run_search(TASK, space, ["size<60KB"], targets=[str(target)], trials=4,
                     finetune_steps=2, output=tmp_path / "run", progress=False)
    assert {r.plan.quantize for r in run.results} == {"int8"}
    complete = [r for r in run.results if r.status == "complete"]
    assert complete and all(r.metrics[latency_key("cpu-1t")] > 0 for r in complete)
    dense = next(r for r in run.results if r.baseline == "dense")
    # The dense model in INT8 (~30 KB of ONNX) meets size<60KB; in fp32 it is 80 KB.
    assert dense.status == "complete" and dense.metrics["size_bytes"] < 60_000
    write_deployment_plan(run.run_dir)
    entry = json.loads((run.run_dir / "deployment.json").read_text())["targets"][0]
    assert entry["quantize"] == "int8" and entry["size_bytes"] < 60_000


# -- the choice per target, on a hand-made run ---------------------------------------------

def _result(number, status, acc, lat_a, lat_b, *, baseline=None, params=1000.0, reason="",
            quantize="none"):
    metrics = {"params": params, "size_bytes": params * 4,
               latency_key("edge"): lat_a, latency_key("edge", "p90"): lat_a * 1.1,
               latency_key("server"): lat_b, latency_key("server", "p90"): lat_b * 1.1}
    if acc is not None:
        metrics["accuracy"] = acc
    plan = PruningPlan(default=LayerRule("structured", 0.1 * number), quantize=quantize)
    return TrialResult(plan, status, metrics, reason, number=number, baseline=baseline)


def _config(budgets: list[str]) -> RunConfig:
    return RunConfig(
        task=TASK, space={"name": "test"}, budgets=budgets,
        targets=[{"name": "edge", "spec": "edge.yaml"},
                 {"name": "server", "spec": "remote://10.0.0.5:8765"}],
        objectives=[{"key": "accuracy", "direction": "maximize"},
                    {"key": latency_key("edge"), "direction": "minimize"}],
        metric="accuracy", metric_direction="maximize")


RESULTS = [
    _result(0, "complete", 0.98, 10.0, 2.0, baseline="dense", params=10000.0),
    _result(1, "complete", 0.95, 4.0, 1.6, params=5000.0),
    _result(2, "complete", 0.93, 3.0, 0.9, params=3000.0, quantize="int8"),
    _result(3, "complete", 0.90, 2.0, 0.8, baseline="uniform-structured-0.5", params=2500.0),
    _result(4, "failed", None, 1.0, 0.5, reason="ExportError: boom"),
]


def test_recommends_per_target_and_shows_the_closest_plan(tmp_path):
    # edge: <5 ms -> trial 1 (0.95 at 4 ms); server: <0.5 ms -> no trial, closest is trial 3.
    config = _config(["latency<5ms@edge", "latency<0.5ms@server", "params<8K"])
    assert [b.text for b in target_budgets(config, "edge")] == ["latency<5ms@edge", "params<8K"]
    write_run(tmp_path, config, RESULTS)
    config.save(tmp_path)
    markdown = write_deployment_plan(tmp_path)
    data = json.loads((tmp_path / "deployment.json").read_text())
    edge, server = data["targets"]
    assert (edge["trial"], edge["meets_budgets"]) == (1, True)
    assert edge["speedup_vs_dense"] == pytest.approx(10.0 / 4.0)
    assert edge["latency_p90_ms"] == pytest.approx(4.4)
    assert (server["trial"], server["meets_budgets"]) == (3, False)
    assert server["checks"] == [
        {"budget": "latency<0.5ms@server", "measured": 0.8, "ok": False},
        {"budget": "params<8K", "measured": 2500.0, "ok": True}]
    assert "closest plan" in server["note"] and "latency<0.5ms@server (measured 0.8)" in (
        server["note"])
    for entry in (edge, server):
        assert (tmp_path / entry["plan_file"]).is_file()
    assert data["all_targets"]["trial"] is None
    assert "NO PLAN MEETS BUDGETS - closest shown" in markdown
    assert "No single plan meets every budget on every target" in markdown
    assert "--target remote://10.0.0.5:8765 --token-file TOKEN_FILE" in markdown


def test_target_without_budget_ships_the_best_plan_and_int8_is_shown():
    config = _config(["latency<3.5ms@edge"])
    plan = deployment_plan(config, RESULTS)
    edge, server = plan.targets
    assert (edge.trial.number, edge.met, edge.trial.plan.quantize) == (2, True, "int8")
    assert server.budgets == [] and server.trial.number == 0 and "dense" in server.note
    assert plan.shared.number == 2  # meets every budget (there is none on server)
    assert plan.to_dict()["targets"][0]["quantize"] == "int8"


def test_infeasible_plan_not_fine_tuned_is_flagged():
    # Trial 5 broke the server budget, so it was not fine-tuned; on edge it is the best plan.
    results = [*RESULTS, _result(5, "infeasible", 0.97, 3.0, 1.9,
                                 reason="breaks latency<1ms@server; not fine-tuned")]
    plan = deployment_plan(_config(["latency<3.5ms@edge", "latency<1ms@server"]), results)
    edge = plan.targets[0]
    assert edge.trial.number == 5 and edge.met
    assert "not fine-tuned" in edge.note and "autoprune apply" in edge.note


def test_closest_plan_may_be_one_that_was_never_evaluated():
    # Nothing meets edge<1.5ms; trial 6 (pruned, infeasible everywhere, so neither fine-tuned
    # nor evaluated) is the closest: 1.6 ms. The dense model has a metric but is far off.
    dense = _result(0, "infeasible", 0.98, 10.0, 2.0, baseline="dense")
    near = _result(6, "infeasible", None, 1.6, 0.4, reason="breaks latency<1.5ms@edge")
    plan = deployment_plan(_config(["latency<1.5ms@edge"]), [dense, near])
    edge = plan.targets[0]
    assert not edge.met and edge.trial.number == 6
    assert "closest plan" in edge.note and "measured 1.6" in edge.note


def test_plan_files_outside_the_front_are_written(tmp_path):
    config = _config(["latency<5ms@edge", "latency<0.5ms@server"])
    write_run(tmp_path, config, RESULTS)
    config.save(tmp_path)
    for f in (tmp_path / "pareto").glob("*.json"):
        f.unlink()  # e.g. an older run: no plan files
    write_deployment_plan(tmp_path)
    data = json.loads((tmp_path / "deployment.json").read_text())
    assert [t["plan_file"] for t in data["targets"]] == ["deployment/trial_1.json",
                                                         "deployment/trial_3.json"]
    saved = json.loads(Path(tmp_path / "deployment/trial_1.json").read_text())
    assert PruningPlan.from_dict(saved["plan"]) == RESULTS[1].plan


def test_a_relative_latency_budget_is_judged_on_the_side_by_side_timing():
    # latency<20%@edge resolves to 2 ms (dense 10 ms at the start). Trial 1's median reads
    # 1.9 ms but it runs in 24 % of the dense model's time side by side; trial 2 the reverse.
    config = dataclasses.replace(_config(["latency<20%@edge"]),
                                 reference={latency_key("edge"): 10.0})
    key = "side_by_side_" + latency_key("edge")
    slow = _result(1, "complete", 0.95, 1.9, 1.0)
    fast = _result(2, "complete", 0.93, 2.1, 1.0)
    slow.metrics[key], fast.metrics[key] = 0.24, 0.18
    edge = deployment_plan(config, [RESULTS[0], slow, fast]).targets[0]
    assert (edge.trial.number, edge.met) == (2, True)
    assert edge.checks == [{"budget": "latency<20%@edge", "measured": 2.1, "ok": True,
                            "side_by_side": 0.18}]
    # nothing inside: the closest plan is the one nearest side by side, and the note says so
    fast.metrics[key] = 0.21
    edge = deployment_plan(config, [RESULTS[0], slow, fast]).targets[0]
    assert (edge.trial.number, edge.met) == (2, False)
    assert "(measured 2.1, 21% of the dense model side by side)" in edge.note
