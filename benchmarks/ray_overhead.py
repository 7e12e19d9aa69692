"""Ray backend vs the embedded Optuna backend: trials/hour and per-trial overhead, 1 and 2
workers, on the same short trials; then latency isolation of concurrent Ray trials.

    python benchmarks/ray_overhead.py                 # both parts (~6 min on 2 cores)
    python benchmarks/ray_overhead.py --skip-isolation --finetune-steps 300
    python benchmarks/ray_overhead.py --skip-overhead --rounds 10

Part 1 runs the same seeded search (synthetic task, per_layer_structured space, so every
backend tries the same plans) with the Optuna backend, then Ray with 1 and 2 workers. Only the
backend's ``run`` is timed (task loading and the run directory are the same for all). Torch
runs one thread per trial everywhere (the Ray workers get 1 CPU each).

* trials/hour: trials / backend wall time.
* in-trial: mean seconds in the timed phases of ``run_trial`` (prune, latency, fine-tune,
  evaluate).
* overhead/trial: (wall time x workers - in-trial time) / trials -- worker-seconds per trial
  spent elsewhere (the trial function's untimed work, the sampler, and for Ray: start-up,
  worker start-up and task loading, scheduling, reporting, idle workers). "steady" leaves out
  ray.init/shutdown.

Part 2 shows whether a trial's latency measurement is disturbed by a concurrent trial on the
same node. Two Ray workers (1 CPU each): worker A times a probe model (resnet_1m 32x32, target
cpu-1t) as a trial would, either alone or while worker B runs real trials (``run_trial``) --
the situation of ``--workers 2`` -- with ``isolation="node"`` (the default) and with
``isolation="measurements"``; for contrast, A and B also time at the same moment without the
lock. Every phase is bracketed by two measurements of A alone, so machine drift cancels.

The output goes to ``benchmarks/results/ray-overhead-<date>.txt``, its tables (``backends``,
``isolation``) and values to ``ray-overhead-<date>.json`` (see ``provenance.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
FAST_TARGET = ("base: cpu-1t\nname: fast\nwarmup_runs: 5\nwarmup_seconds: 0\nmin_runs: 20\n"
               "min_seconds: 0.05\nmax_seconds: 0.3\n")
STEPS = 150  # fine-tuning steps of the neighbour trials in part 2


# -- part 1: overhead ---------------------------------------------------------------------------


def _timed_search(backend: str, workers: int, trials: int, steps: int, root: Path,
                  target: str, isolation: str) -> dict[str, float]:
    import autoprune.search as search_mod

    timing: dict[str, float] = {"ray_init": 0.0, "ray_shutdown": 0.0}
    real_get_backend = search_mod.get_backend

    def get_backend(name):
        b = real_get_backend(name)
        real_run = b.run

        def run(ctx):
            start = time.perf_counter()
            try:
                return real_run(ctx)
            finally:
                timing["wall"] = time.perf_counter() - start

        b.run = run
        return b

    patches = [(search_mod, "get_backend", get_backend)]
    if backend == "ray":
        import ray

        for name in ("init", "shutdown"):
            real = getattr(ray, name)

            def timed(*a, __real=real, __key=f"ray_{name}", **k):
                start = time.perf_counter()
                try:
                    return __real(*a, **k)
                finally:
                    timing[__key] += time.perf_counter() - start

            patches.append((ray, name, timed))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        result = search_mod.run_search(
            SYNTHETIC, "per_layer_structured", None, targets=[target], trials=trials,
            finetune_steps=steps, output=root / f"{backend}-{workers}", backend=backend,
            workers=workers, backend_options={"cpus_per_trial": 1, "isolation": isolation},
            progress=False)
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    inside = sum(sum(r.timings.values()) for r in result.results)
    n = len(result.results)
    wall, startup = timing["wall"], timing["ray_init"] + timing["ray_shutdown"]
    return {
        "trials": n, "wall": wall, "startup": startup, "trials_per_hour": n / wall * 3600,
        "in_trial": inside / n, "overhead": (wall * workers - inside) / n,
        "steady_overhead": ((wall - startup) * workers - inside) / n,
    }


def overhead(trials: int, steps: int, target: str, isolation: str,
             rec: provenance.Record) -> None:
    import torch

    torch.set_num_threads(1)  # as in a Ray worker with 1 CPU: the same trials for every backend
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, workers in (("optuna", 1), ("ray", 1), ("ray", 2)):
            print(f"running {backend} x{workers} ...", flush=True)
            rows.append((f"{backend} ({workers} worker{'s' if workers > 1 else ''})",
                         _timed_search(backend, workers, trials, steps, Path(tmp), target,
                                       isolation)))
    print(f"\n{trials} trials, fine-tuning {steps} steps, synthetic task (resnet_tiny 16x16), "
          f"target cpu-1t (short protocol), Ray isolation={isolation}")
    head = ["backend", "wall s", "trials/hour", "in-trial s", "overhead/trial s",
            "steady overhead/trial s", "ray start+stop s"]
    cells = [[name, f"{r['wall']:.1f}", f"{r['trials_per_hour']:.0f}", f"{r['in_trial']:.2f}",
              f"{r['overhead']:.2f}", f"{r['steady_overhead']:.2f}",
              f"{r['startup']:.1f}" if r["startup"] else "-"] for name, r in rows]
    provenance.print_table("backends", head, cells, right=tuple(range(1, len(head))))
    rec.value("trials", trials)
    rec.value("finetune_steps", steps)
    rec.value("overhead_isolation", isolation)


# -- part 2: latency isolation ------------------------------------------------------------------


def _isolation_actor(ray):
    @ray.remote(num_cpus=1)
    class Worker:
        """One Ray worker of a 2-worker search: runs trials and/or times the probe model."""

        def __init__(self, lock: str, steps: int):
            import torch

            from autoprune.latency import LatencyCache, load_target
            from autoprune.plan import PruningPlan
            from autoprune.search._ray import NodeIsolation
            from autoprune.task import load_task
            from autoprune.testing.models import create_test_model
            from autoprune.trial import TrialSettings

            torch.set_num_threads(1)  # what the backend does with --cpus-per-trial 1
            self.lock = lock
            task = load_task(SYNTHETIC, finetune_steps=steps)
            # As the Ray backend sets up a worker: isolation "measurements" runs the task as
            # it is; isolation "node" steps aside while a neighbour prunes and measures.
            self.node = NodeIsolation(lock)
            self.tasks = {"measurements": task, "node": self.node.wrap(task)}
            # Trials measure under the lock too; repeated shapes come from the cache, so a
            # neighbour trial mostly fine-tunes (the load it puts on the node).
            self.settings = TrialSettings(targets=[load_target("cpu-1t")], measure_lock=lock,
                                          latency_cache=LatencyCache())
            self.plans = [PruningPlan.uniform(s) for s in (0.25, 0.5, 0.0)]
            self.probe_model = create_test_model("resnet_1m")
            self.inputs = self.probe_model.example_inputs()
            self.target = load_target("cpu-1t")

        def ready(self) -> int:
            return os.getpid()

        def probe(self, locked: bool) -> tuple[float, float]:
            """A trial's latency measurement: the probe model, timed under the lock (and,
            as a trial of isolation=node does, marked pending first)."""
            from autoprune._filelock import file_lock
            from autoprune.latency import measure_latency

            pending = self.node.trial() if locked else contextlib.nullcontext()
            lock = file_lock(self.lock) if locked else contextlib.nullcontext()
            with pending, lock:
                stats = measure_latency(self.probe_model, self.inputs, self.target)
            return stats.p50_ms, stats.ci_rel

        def trials(self, seconds: float, isolation: str) -> int:
            """Run real trials (their own locked measurements included) for ``seconds``."""
            from autoprune.trial import run_trial

            end, done = time.perf_counter() + seconds, 0
            while time.perf_counter() < end:
                node = self.node.trial() if isolation == "node" else contextlib.nullcontext()
                with node:
                    run_trial(self.tasks[isolation], self.plans[done % len(self.plans)],
                              self.settings)
                done += 1
            return done

    return Worker


def isolation(rounds: int, rec: provenance.Record) -> None:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    names = {"alone": "alone (control: an alone measurement vs its neighbours)",
             "node": "next to a trial, isolation=node (default)",
             "measurements": "next to a trial, isolation=measurements (lock only)",
             "unlocked": "at the same time as B's measurement (no lock)"}
    # Per round: alone, node, alone, measurements, alone, unlocked, alone -- every phase is
    # compared with the mean of the alone measurements just before and just after it.
    dev: dict[str, list[float]] = {k: [] for k in names}
    cis: dict[str, list[float]] = {k: [] for k in names}
    p50s: dict[str, list[float]] = {k: [] for k in names}
    trials_run = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lock = str(Path(tmp) / "measure.lock")
            worker = _isolation_actor(ray)
            a, b = worker.remote(lock, STEPS), worker.remote(lock, STEPS)
            ray.get([a.ready.remote(), b.ready.remote()])
            ray.get([a.probe.remote(True), b.trials.remote(1.0, "node")])  # warm up both
            for i in range(rounds):
                print(f"round {i + 1}/{rounds}", flush=True)
                alone = [ray.get(a.probe.remote(True))]
                for mode in ("node", "measurements", "unlocked"):
                    if mode == "unlocked":
                        got = ray.get([a.probe.remote(False), b.probe.remote(False)])[0]
                    else:
                        busy = b.trials.remote(4.0, mode)
                        time.sleep(0.5)  # B is inside a trial when A starts timing
                        got = ray.get(a.probe.remote(True))
                        trials_run += ray.get(busy)
                    alone.append(ray.get(a.probe.remote(True)))
                    ref = (alone[-2][0] + alone[-1][0]) / 2
                    dev[mode].append(got[0] / ref - 1)
                    cis[mode].append(got[1])
                    p50s[mode].append(got[0])
                for j in range(1, len(alone) - 1):  # the control, with the same statistic
                    ref = (alone[j - 1][0] + alone[j + 1][0]) / 2
                    dev["alone"].append(alone[j][0] / ref - 1)
                cis["alone"] += [c for _, c in alone]
                p50s["alone"] += [p for p, _ in alone]
    finally:
        ray.shutdown()
    from autoprune.latency import load_target

    target_ci = load_target("cpu-1t").target_ci
    print(f"\nprobe: resnet_1m 32x32 on cpu-1t, timed by worker A; {rounds} rounds; worker B "
          f"ran {trials_run} trials (fine-tuning {STEPS} steps) next to it.\n'vs alone': median "
          f"over rounds of p50 / mean of the alone p50s just before and after (IQR in "
          f"brackets); the control row is an alone measurement vs its neighbours. 'net': vs "
          f"alone minus the control (the bias of the design). 'within measured CI': |net| <= "
          f"sqrt(CI_phase^2 + CI_alone^2), the 95 % CI of a difference of two medians; "
          f"'within target CI': |net| <= the target's CI goal ({target_ci:.0%}, where its "
          f"stopping rule ends a measurement).")
    head = ["worker A measures", "median p50 ms", "median CI of one measurement",
            "vs alone", "net", "within measured CI", "within target CI"]
    rows = []
    ci_alone = statistics.median(cis["alone"])
    control = statistics.median(dev["alone"])
    for key, name in names.items():
        d = sorted(dev[key])
        diff, ci = statistics.median(d), statistics.median(cis[key])
        q1, q3 = d[len(d) // 4], d[(3 * len(d)) // 4]
        net, within, within_target = "-", "-", "-"
        if key != "alone":
            net = f"{(diff - control) * 100:+.2f} %"
            ok = abs(diff - control) <= (ci ** 2 + ci_alone ** 2) ** 0.5
            within = "yes" if ok else "no"
            within_target = "yes" if abs(diff - control) <= target_ci else "no"
        rows.append([name, f"{statistics.median(p50s[key]):.4f}", f"+-{ci * 100:.2f} %",
                     f"{diff * 100:+.2f} % [{q1 * 100:+.1f}, {q3 * 100:+.1f}]", net, within,
                     within_target])
    provenance.print_table("isolation", head, rows, right=(1, 2, 3, 4))
    rec.value("rounds", rounds)
    rec.value("neighbour_trials", trials_run)
    rec.value("neighbour_finetune_steps", STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--finetune-steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=8, help="isolation rounds")
    parser.add_argument("--isolation", default="node", choices=["node", "measurements"],
                        help="Ray backend isolation mode in the overhead runs")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-isolation", action="store_true")
    args = parser.parse_args()
    with provenance.recorded("ray-overhead") as rec:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "fast.yaml"
            target.write_text(FAST_TARGET)
            if not args.skip_overhead:
                overhead(args.trials, args.finetune_steps, str(target), args.isolation, rec)
        if not args.skip_isolation:
            with contextlib.suppress(KeyboardInterrupt):
                isolation(args.rounds, rec)


if __name__ == "__main__":
    main()
