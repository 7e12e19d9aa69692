"""Fault injection: searches run as a user runs them (``autoprune search`` in a subprocess) and
broken on purpose. ``benchmarks/fault_injection.py`` prints what each one measured;
``tests/test_fault_injection.py`` (slow) asserts it.

- :func:`kill_driver`: ``kill -9`` of the search at random points, ``--resume`` after each;
  finished trials lost and plans tried twice;
- :func:`kill_ray_worker`: a Ray worker killed in the middle of a trial; does the search finish?
- :func:`cluster_search`: a 2-node Ray cluster on this machine (``ray.cluster_utils.Cluster``,
  each node with its own temp directory) driven through ``--address``; where each node's
  measurement lock is, and whether the fronts hold full-protocol measurements;
- :func:`extend_ray_search`: a finished Ray search resumed with a larger ``--trials``.

Only processes started here are signalled, by their id.

Example:
    >>> report = kill_driver("/tmp/faults", kills=5, trials=20)  # doctest: +SKIP
    >>> report.kills, len(report.lost), len(report.repeated)  # doctest: +SKIP
    (5, 0, 0)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoprune.metrics import SCREENED
from autoprune.run.layout import PARETO_DIR, RUN_JSON, STUDY_DB, TRIALS_JSONL

__all__ = ["KillReport", "RayWorkerReport", "ClusterReport", "ExtendReport", "kill_driver",
           "kill_ray_worker", "cluster_search", "extend_ray_search", "search_command",
           "finished_trials", "repeated_plans"]

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
FAST_TARGET = ("base: cpu-1t\nname: fast\nwarmup_runs: 2\nwarmup_seconds: 0\nmin_runs: 5\n"
               "min_seconds: 0.02\nmax_seconds: 0.2\n")
MEASURE_LOCK = "autoprune-measure.lock"  # the Ray backend's lock file in each node's temp dir


def search_command(workdir: Path, output: Path, trials: int, *extra: str,
                   quiet: bool = True) -> list[str]:
    """``autoprune search`` on the synthetic task with a fast target (written to ``workdir``)."""
    target = workdir / "fast.yaml"
    target.write_text(FAST_TARGET)
    return [sys.executable, "-m", "autoprune.cli", "search", "--task", SYNTHETIC, "--target",
            str(target), "--trials", str(trials), "--finetune-steps", "6", "--budget",
            "latency<80%", "--output", str(output), *(["--quiet"] if quiet else []), *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A search in its own process group (so a kill reaches the processes it started)."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(**env),
                                start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the search's process group, then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finished_trials(run_dir: Path) -> dict[int, dict]:
    """Trials with a recorded result in an Optuna run's study.db, by number (read as a crash
    left it)."""
    db = run_dir / STUDY_DB
    if not db.is_file():
        return {}
    con = sqlite3.connect(str(db), timeout=30)
    try:
        rows = con.execute(
            "SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a "
            "ON a.trial_id = t.trial_id WHERE a.key = 'result'").fetchall()
    except sqlite3.OperationalError:  # killed before Optuna made its tables
        return {}
    finally:
        con.close()
    return {int(n): json.loads(json.loads(v)) for n, v in rows}


def _plan_key(plan: dict) -> str:
    return json.dumps({k: v for k, v in plan.items() if k != "fingerprint"}, sort_keys=True)


def repeated_plans(trials: list[dict]) -> tuple[list[int], int]:
    """(numbers of trials that ran a plan an earlier trial had run, trials that reused the
    recorded result of an earlier one instead)."""
    seen: set[str] = set()
    repeated, reused = [], 0
    for t in sorted(trials, key=lambda t: t["number"]):
        if t.get("reused_from") is not None:
            reused += 1
            continue
        key = _plan_key(t["plan"])
        if key in seen:
            repeated.append(t["number"])
        seen.add(key)
    return repeated, reused


def _final_trials(run_dir: Path) -> list[dict]:
    path = run_dir / TRIALS_JSONL
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@dataclass
class KillReport:
    """What :func:`kill_driver` measured."""

    kills: int = 0  # SIGKILLs of the search process group
    survived: int = 0  # kills after which --resume went on (no error exit)
    finished_at_kills: int = 0  # distinct trials finished before one of the kills
    lost: list[int] = field(default_factory=list)  # ... missing or changed in the final run
    repeated: list[int] = field(default_factory=list)  # trials that ran an earlier trial's plan
    reused: int = 0  # trials that reused an earlier result of the same plan instead
    trials: int = 0  # trials in the final run
    exit_code: int | None = None  # the last --resume's
    kill_times: list[float] = field(default_factory=list)  # seconds after each start


def kill_driver(workdir: str | Path, *, kills: int = 5, trials: int = 20, seed: int = 0,
                timeout: float = 900.0) -> KillReport:
    """Start a search and ``kill -9`` it at a random point, resume it, ``kills`` times; then
    resume it to the end and compare with what had finished.

    A kill point: once 1 to 3 more trials have finished (all of them: in the end-of-search
    re-measurement), a random 0 to 1 s later, so kills land anywhere in a trial, between
    trials, and while the study is written.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out, log = workdir / "killed-run", workdir / "kill_driver.log"
    rng = random.Random(seed)
    report = KillReport()
    seen: dict[int, dict] = {}
    while True:
        resume = ["--resume"] if (out / RUN_JSON).is_file() else []
        started = time.time()
        proc = _start(search_command(workdir, out, trials, *resume), log)
        if report.kills < kills:
            goal = min(trials, len(seen) + rng.randint(1, 3))
            while proc.poll() is None and len(finished_trials(out)) < goal \
                    and time.time() - started < timeout:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                _kill(proc)
                report.kills += 1
                report.kill_times.append(round(time.time() - started, 1))
                seen.update(finished_trials(out))
                continue
        else:
            proc.wait(timeout=timeout)
        report.exit_code = proc.returncode
        if proc.returncode != 0:
            return report  # a run failed by itself: the kills before it were not survived
        break
    report.survived = report.kills
    final = {t["number"]: t for t in _final_trials(out)}
    report.trials = len(final)
    report.finished_at_kills = len(seen)
    report.lost = sorted(n for n, t in seen.items() if n not in final
                         or _plan_key(final[n]["plan"]) != _plan_key(t["plan"])
                         or final[n]["status"] != t["status"])
    report.repeated, report.reused = repeated_plans(list(final.values()))
    return report


def _descendants(pid: int) -> dict[int, str]:
    """Processes under ``pid`` (from /proc): pid -> command line (a Ray worker's title)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        here = frontier.pop()
        for child, ppid in parent.items():
            if ppid == here and child not in found:
                try:
                    raw = (Path("/proc") / str(child) / "cmdline").read_bytes()
                except OSError:
                    continue
                found[child] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
                frontier.append(child)
    return found


def _trial_worker(pid: int) -> tuple[int, str] | None:
    """A Ray worker process under ``pid`` that is running a trial right now, or None."""
    for child, title in _descendants(pid).items():
        if title.startswith("ray::ImplicitFunc") and "train" in title:
            return child, title
    return None


@dataclass
class RayWorkerReport:
    """What :func:`kill_ray_worker` measured."""

    killed: str = ""  # the killed worker: pid and process title
    exit_code: int | None = None  # the search's
    wanted: int = 0  # --trials
    trials: int = 0  # trials in the run directory
    failed: int = 0  # ... recorded as failed
    retried: bool = False  # the driver said it retried the trial
    seconds: float = 0.0  # wall time of the search


def kill_ray_worker(workdir: str | Path, *, trials: int = 8, workers: int = 2,
                    timeout: float = 900.0) -> RayWorkerReport:
    """A Ray search with ``workers`` concurrent trials; the first worker seen running a trial
    (after the first trials finished) is killed with SIGKILL."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out, log = workdir / "ray-worker-run", workdir / "kill_ray_worker.log"
    cmd = search_command(workdir, out, trials, "--backend", "ray", "--workers", str(workers),
                         quiet=False)  # progress lines say when a trial is retried
    report = RayWorkerReport(wanted=trials)
    start = time.time()
    proc = _start(cmd, log)
    try:
        while proc.poll() is None and time.time() - start < timeout:
            journal = out / "ray" / "journal.jsonl"
            done = journal.is_file() and journal.read_text().count('"finish"') >= 2
            worker = _trial_worker(proc.pid) if done and not report.killed else None
            if worker is not None:
                # Well inside the trial, if it still runs one: a short trial may end first,
                # leaving its actor idle, and killing that needs no retry.
                time.sleep(0.3)
                if _trial_worker(proc.pid) == worker:
                    report.killed = f"pid {worker[0]} ({worker[1][:40]})"
                    os.kill(worker[0], signal.SIGKILL)
            time.sleep(0.2)
        proc.wait(timeout=max(1.0, timeout - (time.time() - start)))
    finally:
        if proc.poll() is None:
            _kill(proc)
    report.seconds = round(time.time() - start, 1)
    report.exit_code = proc.returncode
    final = _final_trials(out)
    report.trials = len(final)
    report.failed = sum(t["status"] == "failed" for t in final)
    report.retried = "retrying" in log.read_text(errors="replace")
    return report


@dataclass
class ClusterReport:
    """What :func:`cluster_search` measured."""

    nodes: int = 0  # Ray nodes in the cluster
    node_locks: dict[str, bool] = field(default_factory=dict)  # node temp dir -> lock file made
    exit_code: int | None = None  # the search's
    trials: int = 0  # trials in the run directory
    front: int = 0  # plans in pareto/
    front_screened: int = 0  # ... still holding a screening latency (0: all re-measured)
    seconds: float = 0.0  # wall time of the search


def cluster_search(workdir: str | Path, *, trials: int = 8, timeout: float = 900.0
                   ) -> ClusterReport:
    """Two Ray nodes on this machine, each with its own temp directory (so its own
    measurement lock file), and a search driven through ``--address`` from a third one."""
    from ray.cluster_utils import Cluster

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Short paths: Ray keeps Unix sockets in the temp directory (108-byte limit).
    dirs = [Path(f"/tmp/apf{os.getpid()}-{i}") for i in range(3)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    report = ClusterReport()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "env_vars": {"TMPDIR": str(dirs[0])}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, env_vars={"TMPDIR": str(dirs[1])})
        cluster.wait_for_nodes()
        report.nodes = len(cluster.list_all_nodes())
        out, log = workdir / "cluster-run", workdir / "cluster_search.log"
        cmd = search_command(workdir, out, trials, "--backend", "ray", "--workers", "2",
                             "--address", cluster.address)
        start = time.time()
        proc = _start(cmd, log, TMPDIR=str(dirs[2]))
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                _kill(proc)
        report.seconds = round(time.time() - start, 1)
        report.exit_code = proc.returncode
    finally:
        cluster.shutdown()
    report.node_locks = {f"node {i}": (d / MEASURE_LOCK).exists() for i, d in enumerate(dirs[:2])}
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    final = _final_trials(out)
    report.trials = len(final)
    front = [json.loads(p.read_text()) for p in (out / PARETO_DIR).glob("trial_*.json")] \
        if (out / PARETO_DIR).is_dir() else []
    report.front = len(front)
    report.front_screened = sum(any(k.startswith(SCREENED) for k in p["metrics"])
                                for p in front)
    return report


@dataclass
class ExtendReport:
    """What :func:`extend_ray_search` measured."""

    first: int = 0  # --trials of the first run
    asked: int = 0  # --trials of the resumed run
    trials: int = 0  # trials in the run directory at the end
    exit_codes: list[int | None] = field(default_factory=list)  # of both runs
    repeated: list[int] = field(default_factory=list)  # trials that ran an earlier trial's plan
    baselines: list[str] = field(default_factory=list)  # baseline trials, by number


def extend_ray_search(workdir: str | Path, *, first: int = 3, then: int = 5,
                      timeout: float = 900.0) -> ExtendReport:
    """A finished Ray search, resumed with ``--trials then``: does it run the extra trials?"""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out, log = workdir / "ray-extend-run", workdir / "extend_ray_search.log"
    report = ExtendReport(first=first, asked=then)
    for trials, extra in ((first, ()), (then, ("--resume",))):
        proc = _start(search_command(workdir, out, trials, "--backend", "ray", *extra), log)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                _kill(proc)
        report.exit_codes.append(proc.returncode)
    final = _final_trials(out)
    report.trials = len(final)
    report.repeated, _ = repeated_plans(final)
    report.baselines = [t["baseline"] for t in sorted(final, key=lambda t: t["number"])
                        if t.get("baseline")]
    return report
