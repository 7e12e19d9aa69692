"""Two hosts that share no files, on this machine: a Ray search across them, then a node lost.

Two network namespaces joined by a veth pair stand for two hosts: the Ray head and the driver
in one (``HEAD_IP``), a Ray worker node in the other (``WORKER_IP``). The worker node also runs
in a private mount namespace, with empty file systems over ``/tmp`` and the checkout: the
driver's checkout, task file, weights and run directory do not exist there. It gets the
installed packages (the venv, bound at ``/mnt/venv``) and autoprune built as a wheel
(``/mnt/site``), as a node of a real cluster would.

The head has no CPUs for trials (as heads of KubeRay clusters often have), so every trial
runs on the worker node. The driver searches with a ``file.py`` task (which imports a module
beside it and reads its weights from a file on the driver's machine) and ``--address``. Once
trials have finished on the worker node and another runs there, the worker node's raylet is
killed; when Ray has declared the node dead, a new worker node starts on that host (as a
cluster manager replaces a lost node) and the search must finish, with no finished trial
lost. Everything started here (namespaces, veth, Ray processes, the driver) is torn down at
the end, also on failure.

Run as root: ``python tests/cluster/two_hosts.py [--keep DIR]`` (``make test-cluster`` runs it
through ``tests/search/test_two_hosts.py``). It prints what happened and writes
``summary.json`` in its work directory (kept with ``--keep``); exit code 0 when the search
finished with trials on the worker node and no finished trial lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = Path(__file__).resolve().parent / "task"
PY = sys.executable  # the venv's python: the head, the driver and (bound) the worker node
VENV = Path(sys.prefix)
RAY_CLI = 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; main()'
NODE_OPTS = ["--object-store-memory", "100000000", "--disable-usage-stats"]


def say(text: str) -> None:
    print(f"[two-hosts] {text}", flush=True)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


class Hosts:
    """The two namespaces, the Ray nodes and the driver; ``close()`` removes all of them."""

    def __init__(self, work: Path):
        tag = f"apc{os.getpid() % 100000}"
        self.work = work
        self.head_ns, self.worker_ns = f"{tag}-h", f"{tag}-w"
        self.veth = (f"{tag}h", f"{tag}w")
        net = f"10.{231 + os.getpid() % 20}.{os.getpid() % 250}"
        self.head_ip, self.worker_ip = f"{net}.1", f"{net}.2"
        self.address = f"{self.head_ip}:6379"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN":
                    secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1",
                    # the GCS declares a silent node dead after 3 missed checks of 1 s
                    "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        self.holder: int | None = None  # a process holding the worker's mount namespace

    def open(self) -> None:
        for ns in (self.head_ns, self.worker_ns):
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, ip in ((self.head_ns, self.veth[0], self.head_ip),
                             (self.worker_ns, self.veth[1], self.worker_ip)):
            run("ip", "link", "set", veth, "netns", ns)
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", veth, "up")
            # Ray finds a process's node IP from its route to the outside world
            run("ip", "-n", ns, "route", "add", "default", "dev", veth)
        say(f"hosts: {self.head_ns} {self.head_ip} (head + driver), "
            f"{self.worker_ns} {self.worker_ip} (worker node), joined by veth {self.veth}")

    def start_head(self) -> None:
        with open(self.work / "head.log", "w") as log:  # Ray's daemons keep it open
            subprocess.run(["ip", "netns", "exec", self.head_ns, PY, "-c", RAY_CLI, "start",
                            "--head", "--node-ip-address", self.head_ip, "--port", "6379",
                            "--include-dashboard=false", "--temp-dir", str(self.work / "h"),
                            "--num-cpus", "0", *NODE_OPTS], check=True, stdout=log,
                           stderr=subprocess.STDOUT, env=self.env)
        say(f"Ray head started at {self.address} (0 CPUs: it runs no trials)")

    def raylet_command(self) -> str:
        """``ray start`` for the worker node, inside its namespaces."""
        return (f"PYTHONPATH=/mnt/site /mnt/venv/bin/python -c '{RAY_CLI}' start --address "
                f"{self.address} --node-ip-address {self.worker_ip} --num-cpus 1 "
                f"{' '.join(NODE_OPTS)} > /mnt/ray-start.log 2>&1 "
                f"|| {{ cat /mnt/ray-start.log; exit 1; }}")

    def start_worker(self, site: Path) -> None:
        """The worker node, in a private mount namespace without the driver's files."""
        hide = ["/tmp", str(REPO)]
        script = "\n".join([
            "set -e",
            "mount -t tmpfs apc-mnt /mnt && mkdir /mnt/venv /mnt/site",
            f"mount --bind {VENV} /mnt/venv && mount --bind {site} /mnt/site",
            *(f"if [ -d {d} ]; then mount -t tmpfs apc-hide {d}; fi" for d in hide),
            "cd /",
            self.raylet_command(),
            "exec sleep infinity",  # holds the mount namespace for the checks below
        ])
        proc = subprocess.Popen(["ip", "netns", "exec", self.worker_ns, "unshare", "--mount",
                                 "--propagation", "private", "bash", "-c", script],
                                env=self.env, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker node did not start (exit {proc.returncode})")
            if self.pids(self.worker_ns, "sleep"):
                self.holder = self.pids(self.worker_ns, "sleep")[0]
                say(f"Ray worker node started at {self.worker_ip}, in a private mount "
                    f"namespace (pid {self.holder} holds it)")
                return
            time.sleep(0.5)
        raise RuntimeError("the worker node did not start within 120 s")

    def restart_worker(self) -> None:
        """A new worker node on the worker's host (its namespaces), as a cluster manager
        replaces a lost node."""
        subprocess.run(["nsenter", "-t", str(self.holder), "-m", "-n", "bash", "-c",
                        self.raylet_command()], check=True, env=self.env)

    def nodes(self, count: int = 2, not_id: str = "") -> dict[str, str]:
        """Alive Ray nodes, IP -> node id, once there are ``count`` and ``not_id`` is not
        among them (asked from the head's namespace)."""
        code = ("import json, ray, time\n"
                f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
                "deadline = time.time() + 90\n"
                "while time.time() < deadline:\n"
                "    alive = {n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes()"
                " if n['Alive']}\n"
                f"    if len(alive) == {count} and {not_id!r} not in alive.values(): break\n"
                "    time.sleep(0.5)\n"
                "print(json.dumps(alive))\n")
        out = run("ip", "netns", "exec", self.head_ns, PY, "-c", code, env=self.env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def worker_sees(self, paths: list[Path]) -> dict[str, bool]:
        """Which of ``paths`` exist in the worker node's mount namespace."""
        seen = {}
        for p in paths:
            res = subprocess.run(["nsenter", "-t", str(self.holder), "-m", "test", "-e",
                                  str(p)])
            seen[str(p)] = res.returncode == 0
        return seen

    def driver(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(["ip", "netns", "exec", self.head_ns, PY, "-m",
                                     "autoprune.cli", *args], stdout=f,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True, cwd=self.work)

    @staticmethod
    def pids(ns: str, comm: str | None = None) -> list[int]:
        """Processes in network namespace ``ns`` (those named ``comm`` only, if given)."""
        res = subprocess.run(["ip", "netns", "pids", ns], text=True, capture_output=True)
        found = []
        for pid in res.stdout.split():
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                if comm is None or name == comm:
                    found.append(int(pid))
        return found

    def titles(self, ns: str) -> dict[int, str]:
        """Command lines (Ray worker titles) of the processes in ``ns``."""
        found = {}
        for pid in self.pids(ns):
            with contextlib.suppress(OSError):
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace").strip()
        return found

    def close(self) -> None:
        """Kill every process in both namespaces, delete them (and so the veth pair)."""
        for ns in (self.worker_ns, self.head_ns):
            for _ in range(20):
                pids = self.pids(ns)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        left = [ns for ns in (self.head_ns, self.worker_ns)
                if ns in run("ip", "netns", "list").stdout]
        veth = subprocess.run(["ip", "link", "show", self.veth[0]], capture_output=True)
        say(f"torn down: namespaces left {left or 'none'}, veth "
            f"{'left' if veth.returncode == 0 else 'gone'}")


def build_site(work: Path) -> Path:
    """autoprune as a wheel installed into a directory of its own (not the checkout)."""
    wheels, site = work / "wheel", work / "site"
    for stale in (REPO / "build").glob("*"):  # setuptools would ship modules left in build/
        shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix="apc-build-"))
    try:
        run(PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
            str(wheels), str(REPO), env={**os.environ, "TMPDIR": str(build)})
    finally:
        shutil.rmtree(build, ignore_errors=True)
    wheel = next(wheels.glob("autoprune-*.whl"))
    run(PY, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
        str(wheel))
    return site


def journal_finished(run_dir: Path) -> dict[int, dict]:
    """Finished trials in the driver's journal: number -> TrialResult dict."""
    path = run_dir / "ray" / "journal.jsonl"
    if not path.is_file():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("event") == "finish":
                found[rec["number"]] = json.loads(rec["payload"]["autoprune_result"])
    return found


def search(hosts: Hosts, work: Path, trials: int, summary: dict) -> None:
    from autoprune.testing.faults import FAST_TARGET
    from autoprune.testing.tasks import synthetic_task

    driver_dir = work / "driver"
    task_dir, run_dir = driver_dir / "task", driver_dir / "run"
    shutil.copytree(TASK_DIR, task_dir, ignore=shutil.ignore_patterns("__pycache__"))
    import torch

    torch.save(synthetic_task().build_model().state_dict(), driver_dir / "weights.pt")
    (driver_dir / "fast.yaml").write_text(FAST_TARGET)
    task_file = task_dir / "cluster_task.py"
    nodes = hosts.nodes()
    worker_node = nodes[hosts.worker_ip]
    summary.update(nodes=nodes, worker_node=worker_node, run_dir=str(run_dir))
    say(f"nodes: {', '.join(f'{ip} = {nid[:12]}' for ip, nid in sorted(nodes.items()))}")
    paths = [REPO / "autoprune", task_file, driver_dir / "weights.pt", run_dir.parent]
    summary["worker_sees_before"] = hosts.worker_sees(paths)
    for p, seen in summary["worker_sees_before"].items():
        say(f"the worker node {'SEES' if seen else 'cannot see'} {p}")

    args = ["search", "--task", f"{task_file}:make_task", "--space", "uniform_structured",
            "--target", str(driver_dir / "fast.yaml"), "--budget", "params<15k", "--trials",
            str(trials), "--finetune-steps", "20", "--backend", "ray", "--address",
            hosts.address, "--workers", "2", "--cpus-per-trial", "1", "--max-failures", "2",
            "--output", str(run_dir)]
    say(f"driver: autoprune {' '.join(args)}")
    log = work / "driver.log"
    proc = hosts.driver(args, log)
    start, killed = time.time(), None
    try:
        while proc.poll() is None and time.time() - start < 600:
            if killed is None:
                killed = maybe_kill(hosts, run_dir, worker_node, start)
                if killed is not None:
                    hosts.restart_worker()
                    summary["new_worker_node"] = hosts.nodes(not_id=worker_node)[
                        hosts.worker_ip]
                    say(f"a new worker node joined on {hosts.worker_ip} at "
                        f"{time.time() - start:.1f} s: "
                        f"{summary['new_worker_node'][:12]}")
            time.sleep(0.2)
        if proc.poll() is None:
            raise RuntimeError("the search did not finish within 600 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    summary.update(exit_code=proc.returncode, seconds=round(time.time() - start, 1),
                   retry_lines=[ln for ln in text.splitlines() if "retrying" in ln])
    summary["kill"] = killed
    say(f"driver exited with {proc.returncode} after {summary['seconds']} s")
    if proc.returncode != 0:
        print(text[-4000:], flush=True)
    for line in summary["retry_lines"]:
        say(f"driver: {line.strip()}")
    outcome(run_dir, summary)
    summary["worker_sees_after"] = hosts.worker_sees([run_dir, run_dir / "latency_cache.json"])
    for p, seen in summary["worker_sees_after"].items():
        say(f"after the search, the worker node {'SEES' if seen else 'has no'} {p}")


def maybe_kill(hosts: Hosts, run_dir: Path, worker_node: str, start: float) -> dict | None:
    """Kill the worker node's raylet once trials finished there and another runs there."""
    finished = journal_finished(run_dir)
    if sum(r.get("node") == worker_node for r in finished.values()) < 2:
        return None
    running = [t for t in hosts.titles(hosts.worker_ns).values()
               if t.startswith("ray::ImplicitFunc") and "train" in t]
    raylets = hosts.pids(hosts.worker_ns, "raylet")
    if not running or not raylets:
        return None
    time.sleep(0.3)  # well inside the trial
    finished = journal_finished(run_dir)
    for pid in raylets:
        os.kill(pid, signal.SIGKILL)
    kill = {"at": round(time.time() - start, 1), "raylet": raylets, "running": running,
            "finished_before": {str(n): r for n, r in finished.items()}}
    say(f"KILLED the worker node's raylet (pid {raylets[0]}) at {kill['at']} s, while it "
        f"ran {running[0]!r}; {len(finished)} trial(s) had finished: {sorted(finished)}")
    hosts.nodes(count=1, not_id=worker_node)  # Ray declared the node dead
    say(f"Ray declared the worker node dead at {time.time() - start:.1f} s")
    return kill


def outcome(run_dir: Path, summary: dict) -> None:
    path = run_dir / "trials.jsonl"
    final = [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []
    summary["trials"] = final
    names = {nid: f"{ip} (head)" for ip, nid in summary["nodes"].items()}
    names[summary["worker_node"]] = "the worker node"
    if summary.get("new_worker_node"):
        names[summary["new_worker_node"]] = "the new worker node"
    for t in final:
        if t.get("reused_from") is not None:  # a plan tried before: nothing ran
            say(f"trial {t['number']}: {t['status']}, trial {t['reused_from']}'s result reused")
            continue
        where = names.get(t.get("node"), t.get("node"))
        reason = f" ({t['reason'][:90]})" if t["status"] == "failed" else ""
        say(f"trial {t['number']}: {t['status']} on {where}{reason}")
    kill = summary.get("kill") or {}
    by_number = {t["number"]: t for t in final}
    lost = [int(n) for n, r in kill.get("finished_before", {}).items()
            if int(n) not in by_number or by_number[int(n)]["timings"] != r["timings"]]
    summary["lost"] = lost
    on_worker = sum(t.get("node") == summary["worker_node"] for t in final)
    on_new = sum(t.get("node") == summary.get("new_worker_node") for t in final)
    say(f"outcome: {len(final)} trials, {on_worker} ran on the worker node, {on_new} on the "
        f"new one, {sum(t['status'] == 'failed' for t in final)} failed; "
        f"{len(kill.get('finished_before', {}))} had finished before the kill, {len(lost)} of "
        f"them lost")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a "
                        "temporary one, removed at the end)")
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("two_hosts.py needs root (ip netns, unshare, mount)", file=sys.stderr)
        return 2
    # Short paths: Ray keeps Unix sockets in its temp directory (108-byte limit).
    work = args.keep or Path(tempfile.mkdtemp(prefix="apc", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    hosts = Hosts(work)
    summary: dict = {"namespaces": [hosts.head_ns, hosts.worker_ns]}
    try:
        site = build_site(work)
        hosts.open()
        hosts.start_head()
        hosts.start_worker(site)
        search(hosts, work, args.trials, summary)
    except Exception as e:  # reported, then torn down
        summary["error"] = f"{type(e).__name__}: {e}"
        say(f"FAILED: {summary['error']}")
    finally:
        hosts.close()
        left = subprocess.run(["pgrep", "-f", str(work)], text=True, capture_output=True)
        summary["left_processes"] = [int(p) for p in left.stdout.split()
                                     if int(p) != os.getpid()]  # this script names it too
        (work / "summary.json").write_text(json.dumps(summary, indent=1))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = (not summary.get("error") and summary.get("exit_code") == 0 and summary.get("kill")
          and not summary.get("lost")
          and any(t.get("node") == summary.get("worker_node") for t in summary["trials"]))
    say("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
