from __future__ import annotations

import dataclasses
import re
import socket

import pytest

import autoprune.trial
from autoprune.budget import parse_budgets
from autoprune.cli import main
from autoprune.errors import BudgetError, TargetError, UsageError
from autoprune.latency import TOKEN_ENV_VAR, LatencyServer, load_target
from autoprune.search._preflight import check_budgets, check_targets, check_trials
from autoprune.task import Metric, accuracy

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
TOKEN = "preflight-token"


@pytest.fixture(scope="module")
def server():
    with LatencyServer("127.0.0.1", 0, TOKEN) as srv:
        srv.start()
        yield srv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _budgets(*texts: str) -> None:
    check_budgets(parse_budgets(list(texts)), accuracy(), "cpu-1t")


def _rejected(*texts: str) -> str:
    """The BudgetError message for ``texts``, or "" when they pass."""
    try:
        _budgets(*texts)
    except BudgetError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("trials", [0, -3, True, 2.5])
def test_trials_below_one_are_a_usage_error(trials):
    with pytest.raises(UsageError, match=r"--trials must be at least 1.*--trials 40"):
        check_trials(trials)
    check_trials(1)


@pytest.mark.parametrize("text, hint", [
    ("accuracy>=2", "accuracy>=2% or accuracy>=0.02"),
    ("accuracy>=97", "accuracy>=97% or accuracy>=0.97"),
    ("accuracy>1", "between 0 and 1"),
    ("accuracy<=150", "between 0 and 1"),
])
def test_fraction_metric_budget_outside_0_1_names_the_fix(text, hint):
    with pytest.raises(BudgetError, match="can never be met") as e:
        _budgets(text)
    assert hint in str(e.value)


def test_budgets_within_bounds_and_metrics_without_bounds_pass():
    # each passes, and the same budget just past the bound is rejected
    for ok, past in [("accuracy>=0.97", "accuracy>=1.5"), ("accuracy>=97%", "accuracy>=197%"),
                     ("accuracy>=1", "accuracy>1"), ("accuracy<=0", "accuracy<0")]:
        assert _rejected(ok) == "" and "can never be met" in _rejected(past), (ok, past)
    # a metric without bounds takes any value
    check_budgets(parse_budgets(["loss<=3"]), Metric("loss", "minimize", lambda m, d: 0.0),
                  "cpu-1t")
    with pytest.raises(BudgetError):
        check_budgets(parse_budgets(["accuracy<=3"]), accuracy(), "cpu-1t")


@pytest.mark.parametrize("texts, shown", [
    (["latency<1ms", "latency>2ms"], "is both > 2 and < 1"),
    (["latency<1ms", "latency>=1ms"], "is both >= 1 and < 1"),
    (["params<10k", "params>20k"], "params is both > 20000 and < 10000"),
    (["accuracy>=0.9", "accuracy<0.5"], "accuracy is both >= 0.9 and < 0.5"),
    (["latency<35%", "latency>50%"], "share of the dense model's latency (p50) is both > 50%"),
    (["speedup>=3x", "latency>=50%"], "is both >= 50% and <= 33.3333%"),
])
def test_contradictory_budgets_are_rejected(texts, shown):
    with pytest.raises(BudgetError, match="contradict each other") as e:
        _budgets(*texts)
    assert shown in str(e.value)


def test_compatible_and_relative_budgets_pass():
    # the same value from both sides when both are inclusive (not when one is strict); other
    # statistics and targets; a relative budget is not compared with an absolute one (the
    # dense model resolves it)
    assert _rejected("latency<=1ms", "latency>=1ms") == ""
    assert "contradict each other" in _rejected("latency<1ms", "latency>=1ms")
    assert _rejected("latency<1ms", "latency>2ms@p90") == ""
    assert "contradict each other" in _rejected("latency<1ms@p90", "latency>2ms@p90")
    assert _rejected("latency<1ms", "latency>2ms@other") == ""
    assert _rejected("latency<35%", "latency>1ms", "speedup>=2x", "params<50%",
                     "params>1k") == ""


def test_missing_local_provider_is_a_usage_error():
    target = dataclasses.replace(load_target("cpu-1t"), name="gpu",
                                 providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(TargetError, match=r"'gpu' needs ONNX Runtime execution provider\(s\) "
                                          r"CUDAExecutionProvider, which this machine"):
        check_targets([target])
    check_targets([load_target("cpu-1t"), load_target("cpu")])


def test_remote_target_reachable_with_token_and_providers(server, monkeypatch, tmp_path):
    port = server.address[1]
    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)
    check_targets([load_target(f"remote://127.0.0.1:{port}")])
    gpu = dataclasses.replace(load_target(f"remote://127.0.0.1:{port}"),
                              providers=("CUDAExecutionProvider",))
    with pytest.raises(TargetError, match=f"which the latency server at 127.0.0.1:{port} "
                                          "does not have"):
        check_targets([gpu])
    monkeypatch.setenv(TOKEN_ENV_VAR, "wrong")
    with pytest.raises(TargetError, match="rejected the token.*--token-file"):
        check_targets([load_target(f"remote://127.0.0.1:{port}")])
    monkeypatch.delenv(TOKEN_ENV_VAR)
    with pytest.raises(TargetError, match="needs a token"):
        check_targets([load_target(f"remote://127.0.0.1:{port}")])


def _no_trials(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(autoprune.trial, "run_trial", fail)
    monkeypatch.setattr("autoprune.search._optuna.run_trial", fail)


@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "--trials must be at least 1, got 0"),
    (["--trials", "-3"], "--trials must be at least 1, got -3"),
    (["--budget", "accuracy>=2"], "accuracy>=2% or accuracy>=0.02"),
    (["--budget", "latency<1ms,latency>2ms"], "contradict each other"),
    (["--target", "remote://127.0.0.1:{port}"], "cannot reach the latency server"),
])
def test_cli_preflight_exits_2_before_any_trial_or_output(extra, message, tmp_path, capsys,
                                                          monkeypatch, fast_target):
    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)
    _no_trials(monkeypatch)
    out = tmp_path / "run"
    extra = [x.format(port=_free_port()) for x in extra]
    targets = [] if "--target" in extra else ["--target", fast_target]
    code = main(["search", "--task", SYNTHETIC, "--trials", "3", *targets, *extra,
                 "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_budget_the_space_cannot_reach_fails_before_the_first_trial(tmp_path, fast_target,
                                                                       capsys):
    out = tmp_path / "run"
    code = main(["search", "--task", SYNTHETIC, "--target", fast_target, "--budget",
                 "latency<2%", "--trials", "5", "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("budget latency<2% (= latency<" in err and "is out of reach of search space "
            "'per_layer_structured': its most pruned plan (every searched group at sparsity "
            "0.75, structured) measures" in err)
    assert "Raise the budget (e.g. latency<" in err and "`quantize: [none, int8]`" in err
    assert not (out / "run.json").exists() and not (out / "trials.jsonl").exists()
    # params are exact: 75 % of every group's channels still keeps more than 1 % of them
    code = main(["search", "--task", SYNTHETIC, "--target", fast_target, "--budget",
                 "params<1%", "--trials", "5", "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "budget params<1% (= params<" in err and "Raise the budget" in err
    assert not (out / "run.json").exists()  # the same --output works once the budget is fixed
    # the suggested budget keeps the statistic
    code = main(["search", "--task", SYNTHETIC, "--target", fast_target, "--budget",
                 "latency<2%@p90", "--trials", "5", "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"Raise the budget \(e\.g\. latency<\d+%@p90\)", err)


def test_a_budget_only_int8_can_reach_is_a_warning(tmp_path, fast_target, capsys):
    out = tmp_path / "run"
    code = main(["search", "--task", SYNTHETIC, "--space", "mixed", "--target", fast_target,
                 "--budget", "size<5%", "--trials", "5", "--finetune-steps", "2",
                 "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and (out / "run.json").is_file()
    assert "warning: budget size<5% (= size<" in err and "only INT8 plans can meet it" in err


def test_ctrl_c_before_the_first_trial_says_to_run_again(tmp_path, fast_target, monkeypatch,
                                                         capsys):
    from autoprune.search._optuna import OptunaBackend

    def interrupted(self, ctx, plans, screen=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(OptunaBackend, "measure", interrupted)  # while timing the dense model
    out = tmp_path / "run"
    assert main(["search", "--task", SYNTHETIC, "--target", fast_target, "--trials", "3",
                 "--output", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first trial: nothing to resume; run the same command" in err
    assert "--resume" not in err and not (out / "run.json").exists()
