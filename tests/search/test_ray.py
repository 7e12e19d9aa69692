"""The Ray Tune backend on a local 2-CPU Ray: same run directory as the Optuna backend, retried
and failed workers, resume after a killed driver, and the message when Ray is missing."""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from autoprune._filelock import file_lock
from autoprune.cli import main
from autoprune.errors import UsageError
from autoprune.latency import load_target
from autoprune.plan import PruningPlan
from autoprune.results import load_run
from autoprune.search import run_search
from autoprune.search._ray import NodeIsolation
from autoprune.task import load_task
from autoprune.trial import TrialSettings, run_trial

pytestmark = pytest.mark.ray

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
BUDGETS = ["latency<1s", "params<15k"]  # the dense model (19,810 params) is not fine-tuned


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, fast_target):
    """One Ray search (2 workers, 2 CPUs); records how the local Ray was started."""
    pytest.importorskip("ray")
    import ray

    out = tmp_path_factory.mktemp("ray") / "r"
    lock = out.parent / "measure.lock"
    seen = {}
    real_init = ray.init

    def init(*args, **kwargs):
        info = real_init(*args, **kwargs)
        seen.update(kwargs=kwargs, node_ip=ray.util.get_node_ip_address(),
                    cpus=ray.cluster_resources().get("CPU"),
                    webui=info.address_info.get("webui_url"))
        return info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "init", init)
        result = run_search(SYNTHETIC, "per_layer_structured", BUDGETS, targets=[fast_target],
                            trials=6, finetune_steps=3, output=out, backend="ray", workers=2,
                            backend_options={"cpus_per_trial": 1, "measure_lock": str(lock)},
                            progress=False)
    seen["initialized_after"] = ray.is_initialized()
    return result, seen, lock


@pytest.fixture(scope="module")
def optuna_run(tmp_path_factory, fast_target):
    out = tmp_path_factory.mktemp("optuna") / "r"
    return run_search(SYNTHETIC, "per_layer_structured", BUDGETS, targets=[fast_target],
                      trials=6, finetune_steps=3, output=out, progress=False)


def test_ray_search_writes_the_optuna_run_directory(ray_run, optuna_run):
    result, _, _ = ray_run
    out, ref = result.run_dir, optuna_run.run_dir
    common = {"run.json", "trials.jsonl", "trials.csv", "summary.md", "pareto",
              "latency_cache.json"}
    assert common <= {p.name for p in out.iterdir()} and common <= {p.name for p in ref.iterdir()}
    assert (out / "ray" / "tune" / "tuner.pkl").is_file()  # Ray's experiment, under the run
    config, results = load_run(out)
    ref_config, ref_results = load_run(ref)
    assert config.backend == "ray" and config.trials == 6
    assert [r.number for r in results] == list(range(6))
    assert [r.baseline for r in results[:4]] == [
        "dense", "uniform-structured-0.25", "uniform-structured-0.5", "uniform-structured-0.75"]
    # Same seeded sampler, same space: the same parameters and plans, trial by trial.
    assert [r.params for r in results] == [r.params for r in ref_results]
    assert [r.plan for r in results] == [r.plan for r in ref_results]
    dense = results[0]
    assert dense.status == "infeasible" and "params<15k (measured 1.981e+04)" in dense.reason
    assert "finetune" not in dense.timings and dense.metrics["accuracy"] > 0.9
    assert all(r.status == "complete" for r in results[1:])
    assert [r.metrics["params"] for r in results] == [r.metrics["params"] for r in ref_results]
    assert all(r.metrics["finetune_steps"] == 3 for r in results[1:])
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0] == (ref / "trials.csv").read_text().splitlines()[0] and len(rows) == 7
    front = sorted(p.stem for p in (out / "pareto").glob("trial_*.json"))
    assert front and front == sorted(f"trial_{r.number}" for r in result.front)
    for f in (out / "pareto").glob("trial_*.json"):
        data = json.loads(f.read_text())
        assert data["metrics"]["params"] < 15000 and data["targets"][0]["name"] == "fast"
        assert PruningPlan.load(f).fingerprint == results[0].plan.fingerprint
    assert "## Pareto front on fast" in result.summary


def test_resumed_with_fewer_trials_than_finished_runs_nothing(ray_run, tmp_path):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(ray_run[0].run_dir, out)
    again = run_search(None, None, None, trials=4, output=out, resume=True, progress=False)
    assert [r.number for r in again.results] == list(range(6))  # all kept, none added
    assert [r.plan for r in again.results] == [r.plan for r in ray_run[0].results]
    starts = [json.loads(line) for line in (out / "ray" / "journal.jsonl").read_text()
              .splitlines() if '"start"' in line]
    assert starts == [{"event": "start", "trials": 6, "experiment": "tune"},
                      {"event": "start", "trials": 4, "experiment": "tune-2"}]
    assert not (out / "ray" / "tune-2").exists()  # no Tune experiment was started


def test_local_ray_is_loopback_only_and_shut_down(ray_run):
    result, seen, lock = ray_run
    assert seen["kwargs"]["include_dashboard"] is False and seen["webui"] in (None, "")
    assert seen["node_ip"] == "127.0.0.1" and seen["cpus"] == 2
    assert seen["initialized_after"] is False
    # Every worker measured latency under the node's measurement lock file.
    assert lock.is_file()
    assert all("latency_p50_ms@fast" in r.metrics for r in result.results)


def _measurement_would_wait(lock) -> bool:
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_node_isolation_holds_the_lock_while_a_trial_computes(tmp_path, fast_target):
    """isolation=node: fine-tuning and evaluation hold the measurement lock shared, so another
    trial's measurement (exclusive) waits for them, and they wait for it."""
    lock = str(tmp_path / "measure.lock")
    seen = []
    task = load_task(SYNTHETIC, finetune_steps=2)

    def finetune_fn(model, task_, settings, teacher=None, on_eval=None):
        seen.append(("finetune", _measurement_would_wait(lock)))

    def evaluate_fn(model):
        seen.append(("evaluate", _measurement_would_wait(lock)))
        return 0.5

    task.finetune_fn, task.evaluate_fn = finetune_fn, evaluate_fn
    settings = TrialSettings(targets=[load_target(fast_target)], measure_lock=lock)
    node = NodeIsolation(lock)
    with node.trial():
        result = run_trial(node.wrap(task), PruningPlan.uniform(0.25), settings)
    assert result.status == "complete" and result.metrics["accuracy"] == 0.5
    assert seen == [("finetune", True), ("evaluate", True)]
    assert not _measurement_would_wait(lock)  # released after the trial
    seen.clear()  # the task itself is unchanged
    assert run_trial(task, PruningPlan.uniform(0.25), settings).status == "complete"
    assert seen == [("finetune", False), ("evaluate", False)]


def test_node_isolation_hands_the_node_to_a_measurement_mid_finetuning(tmp_path, fast_target):
    """A neighbour waiting to measure gets the node at the next fine-tuning step, not at the
    end of the fine-tuning; no step of the neighbour runs while it measures."""
    lock = str(tmp_path / "measure.lock")
    task = load_task(SYNTHETIC, finetune_steps=150)
    steps, started = [], threading.Event()
    real_loss = task.loss_fn

    def loss_fn(outputs, targets):
        steps.append(time.perf_counter())
        started.set()
        time.sleep(0.002)
        return real_loss(outputs, targets)

    task.loss_fn = loss_fn
    settings = TrialSettings(targets=[load_target(fast_target)], measure_lock=lock)
    neighbour = NodeIsolation(lock)

    def run_neighbour():
        with neighbour.trial():
            run_trial(neighbour.wrap(task), PruningPlan.uniform(0.25), settings)

    thread = threading.Thread(target=run_neighbour)
    thread.start()
    assert started.wait(60)
    with NodeIsolation(lock).trial(), file_lock(lock):  # a trial measuring
        start = time.perf_counter()
        time.sleep(0.3)
        end = time.perf_counter()
    thread.join()
    assert len(steps) == 150
    assert not [t for t in steps if start < t < end]  # the neighbour stepped aside ...
    assert [t for t in steps if t < start] and [t for t in steps if t > end]  # mid-way


def _killer_task(tmp_path):
    """A task file whose fine-tuning SIGKILLs its Ray worker: once for the uniform-0.25 plan
    (11,284 params), every time for the uniform-0.5 plan (5,142 params)."""
    path = tmp_path / "killer_task.py"
    path.write_text(textwrap.dedent(f"""
        import dataclasses
        import os
        import signal

        from autoprune.finetune import finetune_
        from autoprune.testing.tasks import synthetic_task

        MARKERS = {str(tmp_path)!r}


        def make_task():
            task = synthetic_task(finetune_steps=2)

            def finetune_fn(model, task_, settings, teacher=None, on_eval=None):
                n = sum(p.numel() for p in model.parameters())
                kills = len([f for f in os.listdir(MARKERS) if f.startswith(f"kill-{{n}}-")])
                if (n == 11284 and kills < 1) or n == 5142:
                    open(os.path.join(MARKERS, f"kill-{{n}}-{{kills}}"), "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                plain = dataclasses.replace(task_, finetune_fn=None)
                return finetune_(model, plain, settings, teacher=teacher, on_eval=on_eval)

            task.finetune_fn = finetune_fn
            return task
    """))
    return f"{path}:make_task"


def test_killed_workers_are_retried_or_failed_not_the_search(tmp_path, fast_target):
    pytest.importorskip("ray")
    task = _killer_task(tmp_path)
    result = run_search(task, "uniform_structured", BUDGETS, targets=[fast_target], trials=4,
                        output=tmp_path / "r", backend="ray", workers=2, progress=False,
                        backend_options={"max_failures": 1})
    by_baseline = {r.baseline: r for r in result.results}
    assert len(result.results) == 4 and [r.number for r in result.results] == [0, 1, 2, 3]
    # Killed once, retried on a fresh worker, completed.
    assert sorted(p.name for p in tmp_path.glob("kill-11284-*")) == ["kill-11284-0"]
    assert by_baseline["uniform-structured-0.25"].status == "complete"
    # Killed on every attempt (1 + max_failures=1 retry): a failed trial with the reason.
    assert len(list(tmp_path.glob("kill-5142-*"))) == 2
    failed = by_baseline["uniform-structured-0.5"]
    assert failed.status == "failed" and "failed 2 time(s), retries exhausted" in failed.reason
    assert failed.params == {"s.all": 0.5} and failed.plan.fingerprint
    assert {r.sparsity for r in failed.plan.rules.values() if r.mode == "structured"} == {0.5}
    # ... and the search went on.
    assert by_baseline["uniform-structured-0.75"].status == "complete"
    assert by_baseline["dense"].status == "infeasible"
    assert "trial 2 (failed)" in result.summary


def _terminated_in_state(exp_dir):
    """Trials Ray's latest experiment snapshot holds as finished."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # being written
        return 0
    return sum(json.loads(t[0])["status"] == "TERMINATED" for t in data["trial_data"])


def test_killed_driver_resumes_from_ray_state_without_losing_trials(tmp_path, fast_target,
                                                                  kept_metrics):
    pytest.importorskip("ray")
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "autoprune.cli", "search", "--task", SYNTHETIC, "--space",
           "uniform_structured", "--target", fast_target, "--budget", "params<15k",
           "--trials", "6", "--finetune-steps", "3", "--output", str(out), "--backend", "ray",
           "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if _terminated_in_state(out / "ray" / "tune") >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    finally:  # the driver and the local Ray it started (same process group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    journal = [json.loads(line) for line in (out / "ray" / "journal.jsonl").read_text()
               .splitlines()]
    before = {r["number"]: json.loads(r["payload"]["autoprune_result"]) for r in journal
              if r["event"] == "finish"}
    assert len(before) >= 2 and not (out / "trials.jsonl").exists()

    assert main(["search", "--resume", "--output", str(out), "--quiet"]) == 0
    config, results = load_run(out)
    assert config.backend == "ray" and len(results) == 6
    assert [r.number for r in results] == list(range(6))
    assert [r.baseline for r in results[:4]] == [
        "dense", "uniform-structured-0.25", "uniform-structured-0.5", "uniform-structured-0.75"]
    by_number = {r.number: r for r in results}
    for number, saved in before.items():  # every finished trial kept, not run again
        kept_metrics(saved["metrics"], by_number[number].metrics)
        assert by_number[number].timings == saved["timings"]
    assert all(r.status in ("complete", "infeasible") for r in results)
    assert len(list((out / "ray" / "tune").glob("experiment_state-*.json"))) >= 1


def test_cluster_search_re_measures_its_front_on_a_worker(tmp_path, fast_target, monkeypatch):
    """With --address, the driver may be another machine than the workers: the front is
    re-measured by a Ray task (here the driver's confirm_fronts would fail)."""
    ray = pytest.importorskip("ray")
    import autoprune.search._confirm

    def not_here(*args, **kwargs):
        raise AssertionError("the front was re-measured on the driver")

    monkeypatch.setattr(autoprune.search._confirm, "confirm_fronts", not_here)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="autoprune")
    try:
        result = run_search(SYNTHETIC, "uniform_structured", BUDGETS, targets=[fast_target],
                            trials=5, finetune_steps=3, output=tmp_path / "r", backend="ray",
                            backend_options={"address": "auto", "cpus_per_trial": 1},
                            progress=False)
    finally:
        ray.shutdown()
    shipped = [r for r in result.results if r.baseline] + result.front
    assert result.front and all("latency_screened@fast" not in r.metrics for r in shipped)


def test_missing_ray_gives_the_install_hint(tmp_path, monkeypatch, capsys, fast_target):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    from autoprune.search import get_backend

    with pytest.raises(UsageError, match=r"pip install 'autoprune\[ray\]'"):
        get_backend("ray").run(None)
    code = main(["search", "--task", SYNTHETIC, "--backend", "ray", "--target", fast_target,
                 "--trials", "1", "--output", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--backend ray needs Ray Tune" in err and "pip install 'autoprune[ray]'" in err


def test_autoprune_imports_without_ray():
    code = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        import autoprune
        from autoprune.search import get_backend
        assert get_backend("optuna").name == "optuna" and get_backend("ray").name == "ray"
        assert [m for m in sys.modules if m.startswith("ray.")] == []
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    check = "import sys, autoprune.search; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)
