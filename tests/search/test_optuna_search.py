import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import autoprune
from autoprune.budget import parse_budgets
from autoprune.cli import main
from autoprune.finalize import finalize_plan
from autoprune.latency import load_target
from autoprune.metrics import SCREENED
from autoprune.plan import PruningPlan
from autoprune.results import load_run
from autoprune.search import run_search
from autoprune.task import load_task
from autoprune.trial import TrialSettings, run_trial

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"


@pytest.fixture(scope="module")
def run(tmp_path_factory, fast_target):
    out = tmp_path_factory.mktemp("run") / "r"
    result = run_search(SYNTHETIC, "per_layer_structured", ["latency<1s", "params<15k"],
                        targets=[fast_target], trials=7, finetune_steps=6, output=out,
                        progress=False)
    return result


def test_search_writes_a_valid_run_directory(run):
    out = run.run_dir
    for name in ("run.json", "study.db", "trials.csv", "trials.jsonl", "summary.md"):
        assert (out / name).is_file(), name
    config, results = load_run(out)
    assert len(results) == 7 and [r.number for r in results] == list(range(7))
    assert [r.baseline for r in results[:4]] == [
        "dense", "uniform-structured-0.25", "uniform-structured-0.5", "uniform-structured-0.75"]
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,status,baseline,accuracy,latency_p50_ms@fast")
    assert len(rows) == 8
    # params<15k: the dense model (19,810 params) is infeasible and was not fine-tuned.
    dense = results[0]
    assert dense.status == "infeasible" and "params<15k (measured 1.981e+04)" in dense.reason
    assert "finetune" not in dense.timings and dense.metrics["accuracy"] > 0.9
    front_files = sorted((out / "pareto").glob("trial_*.json"))
    assert front_files and {f.stem for f in front_files} == {f"trial_{r.number}"
                                                             for r in run.front}
    for f in front_files:
        data = json.loads(f.read_text())
        assert data["metrics"]["params"] < 15000 and data["targets"][0]["name"] == "fast"
        PruningPlan.load(f)  # a plan file as written is a loadable plan
    # trials were timed with the screening protocol; what the run ships was re-measured in full
    shipped = [r for r in results if r.baseline or r.number in {x.number for x in run.front}]
    assert shipped and all(SCREENED + "fast" not in r.metrics for r in shipped)
    assert "## Pareto front on fast" in run.summary and "## Recommended plan" in run.summary
    assert autoprune.search is not None and callable(autoprune.search)


def test_study_reads_in_optuna_dashboard(run):
    """optuna-dashboard shows the objectives by name and the search's settings."""
    import optuna

    study = optuna.load_study(study_name="autoprune",
                              storage=f"sqlite:///{run.run_dir / 'study.db'}")
    assert study.metric_names == ["accuracy", "latency_p50_ms@fast"]
    attrs = study.user_attrs
    assert attrs["task"] == SYNTHETIC and attrs["space"] == "per_layer_structured"
    assert attrs["budgets"] == ["latency<1s", "params<15k"] and attrs["targets"] == ["fast"]
    assert attrs["trials"] == 7 and attrs["finetune_steps"] == 6
    assert attrs["sampler"] == "tpe" and attrs["seed"] == 0
    assert attrs["task_description"] == ("10 noisy class templates, 16x16; a tiny CNN trained "
                                         "in memory")


def test_infeasible_plan_skips_finetuning(monkeypatch, fast_target):
    calls = []
    import autoprune.finetune

    real = autoprune.finetune.finetune_
    monkeypatch.setattr(autoprune.finetune, "finetune_",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    task = load_task(SYNTHETIC, finetune_steps=2)
    settings = TrialSettings(targets=[load_target(fast_target)],
                             budgets=parse_budgets(["latency<1us"]))
    result = run_trial(task, PruningPlan.uniform(0.5), settings)
    assert result.status == "infeasible" and calls == []
    assert result.metrics["latency_p50_ms@fast"] > 0.001 and result.metrics["params"] == 5142
    settings.budgets = parse_budgets(["latency<1s"])
    assert run_trial(task, PruningPlan.uniform(0.5), settings).status == "complete"
    assert calls == [1]


def test_failing_trials_do_not_stop_the_search(tmp_path, fast_target, monkeypatch):
    task = load_task(SYNTHETIC, finetune_steps=2)
    count = []

    def flaky_finetune(model, task_, settings, teacher=None, on_eval=None):
        count.append(1)
        if len(count) == 2:
            raise KeyError("user code exploded")
        if len(count) == 3:
            raise RuntimeError("nan in forward\nsecond line")
        from autoprune.finetune import FinetuneResult

        return FinetuneResult(steps_done=0, final_loss=0.0)

    task.finetune_fn = flaky_finetune
    result = run_search(task, "uniform_structured", None, targets=[fast_target], trials=5,
                        output=tmp_path / "r", progress=False)
    statuses = [(r.status, r.reason) for r in result.results]
    assert len(statuses) == 5
    assert statuses[1] == ("failed", "KeyError in trial: 'user code exploded'")
    assert statuses[2] == ("failed", "RuntimeError in trial: nan in forward")
    assert [s for s, _ in statuses].count("complete") == 3
    assert "trial 1 (failed): KeyError" in result.summary


def _finished(db):
    try:
        with sqlite3.connect(db) as con:
            sql = "select count(*) from trials where state = 'COMPLETE'"
            return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_killed_search_resumes_without_losing_trials(tmp_path, fast_target, kept_metrics):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "autoprune.cli", "search", "--task", SYNTHETIC, "--space",
           "uniform_structured", "--target", fast_target, "--trials", "7", "--finetune-steps",
           "4", "--output", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "study.db").exists() and _finished(out / "study.db") >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    import optuna

    from autoprune.search._optuna import STUDY_NAME

    before = {t.number: t.user_attrs["result"] for t in optuna.load_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}").get_trials()
        if "result" in t.user_attrs}
    assert len(before) >= 3
    assert main(["search", "--resume", "--output", str(out), "--quiet"]) == 0
    config, results = load_run(out)
    assert len(results) == 7 and config.trials == 7
    by_number = {r.number: r for r in results}
    for number, saved in before.items():  # every finished trial kept, unchanged
        kept_metrics(json.loads(saved)["metrics"], by_number[number].metrics)


def test_pareto_plan_reapplied_reproduces_accuracy_and_architecture(run, tmp_path, fast_target,
                                                                     monkeypatch):
    import autoprune.latency

    best = next(r for r in run.front if r.baseline != "dense")
    task = load_task(SYNTHETIC)
    real, timed = autoprune.latency.compare_latency, []

    def side_by_side(models, inputs, target, **kw):
        rows = real(models, inputs, target, **kw)
        timed.append((list(models), kw["onnx_models"]["shipped"], rows))
        return rows

    monkeypatch.setattr(autoprune.latency, "compare_latency", side_by_side)
    metrics = finalize_plan(task, best.plan, tmp_path / "ship", finetune_steps=6,
                            targets=[fast_target])
    # model.onnx itself is timed beside the dense model, and the speed-up is that timing's
    [(names, onnx_bytes, rows)] = timed
    assert names == ["dense", "shipped"]
    assert onnx_bytes == (tmp_path / "ship" / "model.onnx").read_bytes()
    assert metrics["speedup@fast"] == rows[1].speedup
    assert metrics["dense_latency_p50_ms@fast"] == rows[0].stats.p50_ms
    assert metrics["params"] == best.metrics["params"]
    assert metrics["macs"] == best.metrics["macs"]
    assert metrics["accuracy"] == pytest.approx(best.metrics["accuracy"], abs=0.01)
    assert (tmp_path / "ship" / "model.onnx").stat().st_size > 1000
    assert PruningPlan.load(tmp_path / "ship" / "plan.json") == best.plan


def test_cli_apply_and_usage_errors(run, tmp_path, fast_target, capsys):
    plan_file = sorted((run.run_dir / "pareto").glob("*.json"))[0]
    assert main(["apply", str(plan_file), "--task", SYNTHETIC, "--output", str(tmp_path / "a"),
                 "--finetune-steps", "2", "--target", fast_target]) == 0
    assert "speedup@fast" in capsys.readouterr().out
    assert main(["search", "--task", SYNTHETIC, "--budget", "latency<10"]) == 2
    assert "latency needs a time unit" in capsys.readouterr().err
    assert main(["search", "--task", SYNTHETIC, "--budget", "latency<1ms@edge",
                 "--output", str(tmp_path / "x")]) == 2
    assert "names target 'edge', which is not searched" in capsys.readouterr().err
    assert main(["search", "--task", "nope_missing_task"]) == 2
    assert main(["show", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["search", "--output", str(run.run_dir), "--task", SYNTHETIC]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_cli_full_latency_times_every_trial_with_the_full_protocol(tmp_path, fast_target):
    out = tmp_path / "full"
    assert main(["search", "--task", SYNTHETIC, "--space", "uniform_structured", "--target",
                 fast_target, "--trials", "5", "--finetune-steps", "2", "--full-latency",
                 "--output", str(out), "--quiet"]) == 0
    config, results = load_run(out)
    assert config.screen_latency is False and len(results) == 5
    assert all(not any(k.startswith(SCREENED) for k in r.metrics) for r in results)


def test_an_unevaluated_infeasible_trial_still_informs_the_sampler():
    import math

    import optuna

    from autoprune.budget import Objective, latency_key
    from autoprune.search._optuna import make_sampler, tell_result
    from autoprune.trial import TrialResult

    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler("nsga2", 0))
    objectives = [Objective("accuracy", "maximize"), Objective(latency_key("fast"), "minimize")]
    budgets = parse_budgets(["latency<1ms"])
    for i in range(25):  # more than a generation: NSGA-II selects among these trials
        trial = study.ask()
        trial.suggest_float("s", 0.0, 0.9)
        result = TrialResult(PruningPlan.uniform(0.2), "infeasible",
                             {latency_key("fast"): 1.5 + i, "params": 10.0}, "breaks")
        tell_result(study, trial, result, budgets, "fast", objectives)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert first.values == [-math.inf, 1.5] and first.user_attrs["status"] == "infeasible"
    assert first.constraints == {"latency<1ms": pytest.approx(0.5)}
    study.ask()  # NSGA-II builds its next generation from these trials (infinite values)
