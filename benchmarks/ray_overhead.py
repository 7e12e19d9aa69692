"""Ray backend vs the embedded Optuna backend: trials/hour and per-trial overhead, 1 and 2
workers, on the same short trials; then latency isolation of concurrent Ray trials.

    python benchmarks/ray_overhead.py                 # both parts (~5 min on 2 cores)
    python benchmarks/ray_overhead.py --trials 20 --finetune-steps 8
    python benchmarks/ray_overhead.py --skip-isolation

Part 1 runs the same seeded search (synthetic task, per_layer_structured space, so every
backend tries the same plans) with the Optuna backend, then Ray with 1 and 2 workers. Only the
backend's ``run`` is timed (task loading and the run directory are the same for all). Torch
runs one thread per trial everywhere (the Ray workers get 1 CPU each).

* trials/hour: trials / backend wall time.
* in-trial: mean seconds inside ``run_trial`` per trial (prune + latency + fine-tune + eval).
* overhead/trial: (wall time x workers - time inside run_trial) / trials -- worker-seconds
  per trial spent outside the trial function (Ray start-up, worker start-up and task loading,
  scheduling, result reporting, idle workers). "steady" leaves out ray.init/shutdown.

Part 2 shows that a trial's latency measurement is not disturbed by a concurrent trial on the
same node. Two Ray workers (1 CPU each): worker A measures a probe model (resnet_1m, 32x32,
target cpu-1t) under the node's measurement lock, either alone, or while worker B runs real
trials (``run_trial``: pruning, fine-tuning, its own locked measurements) -- the situation of
``--workers 2``. Phases are interleaved so machine drift hits both alike. For contrast, a third
phase times A and B at the same moment without the lock.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
FAST_TARGET = ("base: cpu-1t\nname: fast\nwarmup_runs: 5\nwarmup_seconds: 0\nmin_runs: 20\n"
               "min_seconds: 0.05\nmax_seconds: 0.3\n")
STEPS = 150  # fine-tuning steps of the neighbour trials in part 2


# -- part 1: overhead ---------------------------------------------------------------------------


def _timed_search(backend: str, workers: int, trials: int, steps: int, root: Path,
                  target: str) -> dict[str, float]:
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
            workers=workers, backend_options={"cpus_per_trial": 1}, progress=False)
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


def overhead(trials: int, steps: int, target: str) -> None:
    import torch

    torch.set_num_threads(1)  # as in a Ray worker with 1 CPU: the same trials for every backend
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, workers in (("optuna", 1), ("ray", 1), ("ray", 2)):
            print(f"running {backend} x{workers} ...", flush=True)
            rows.append((f"{backend} ({workers} worker{'s' if workers > 1 else ''})",
                         _timed_search(backend, workers, trials, steps, Path(tmp), target)))
    print(f"\n{trials} trials, fine-tuning {steps} steps, synthetic task (resnet_tiny 16x16), "
          f"target cpu-1t (short protocol)\n")
    head = ("backend", "wall s", "trials/hour", "in-trial s", "overhead/trial s",
            "steady overhead/trial s", "ray start+stop s")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for name, r in rows:
        cells = [name, f"{r['wall']:.1f}", f"{r['trials_per_hour']:.0f}", f"{r['in_trial']:.2f}",
                 f"{r['overhead']:.2f}", f"{r['steady_overhead']:.2f}",
                 f"{r['startup']:.1f}" if r["startup"] else "-"]
        print("| " + " | ".join(cells) + " |")


# -- part 2: latency isolation ------------------------------------------------------------------


def _isolation_actor(ray):
    @ray.remote(num_cpus=1)
    class Worker:
        """One Ray worker of a 2-worker search: runs trials and/or times the probe model."""

        def __init__(self, lock: str, steps: int):
            import torch

            from autoprune.latency import LatencyCache, load_target
            from autoprune.plan import PruningPlan
            from autoprune.search._ray import isolate_compute
            from autoprune.task import load_task
            from autoprune.testing.models import create_test_model
            from autoprune.trial import TrialSettings

            torch.set_num_threads(1)  # what the backend does with --cpus-per-trial 1
            self.lock = lock
            task = load_task(SYNTHETIC, finetune_steps=steps)
            # As the Ray backend sets up a worker: isolation "measurements" runs the task as
            # it is; isolation "node" holds the lock shared while fine-tuning / evaluating.
            self.tasks = {"measurements": task, "node": isolate_compute(task, lock)}
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
            """A trial's latency measurement: the probe model, timed under the lock."""
            from autoprune.latency import measure_latency
            from autoprune.trial import measurement_lock

            with measurement_lock(self.lock if locked else None):
                stats = measure_latency(self.probe_model, self.inputs, self.target)
            return stats.p50_ms, stats.ci_rel

        def trials(self, seconds: float, isolation: str) -> int:
            """Run real trials (their own locked measurements included) for ``seconds``."""
            from autoprune.trial import run_trial

            end, done = time.perf_counter() + seconds, 0
            while time.perf_counter() < end:
                run_trial(self.tasks[isolation], self.plans[done % len(self.plans)],
                          self.settings)
                done += 1
            return done

    return Worker


def isolation(rounds: int) -> None:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    names = {"alone": "alone (control: again at the end of the round)",
             "node": "next to a trial, isolation=node (default)",
             "measurements": "next to a trial, isolation=measurements (lock only)",
             "unlocked": "at the same time as B's measurement (no lock)"}
    rows: list[dict[str, tuple[float, float]]] = []
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
                row = {"first": ray.get(a.probe.remote(True))}
                for mode in ("node", "measurements"):
                    busy = b.trials.remote(4.0, mode)
                    time.sleep(0.5)  # B is inside a trial when A starts timing
                    row[mode] = ray.get(a.probe.remote(True))
                    trials_run += ray.get(busy)
                row["unlocked"] = ray.get([a.probe.remote(False), b.probe.remote(False)])[0]
                row["alone"] = ray.get(a.probe.remote(True))
                rows.append(row)
    finally:
        ray.shutdown()
    print(f"\nprobe: resnet_1m 32x32 on cpu-1t, timed by worker A; {rounds} rounds, phases "
          f"interleaved; worker B ran {trials_run} trials (fine-tuning {STEPS} steps) next to "
          f"it. 'vs alone': median over rounds of p50 / the round's first (alone) p50.\n")
    head = ("worker A measures", "median p50 ms", "median CI of one measurement",
            "vs alone", "within the CI")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for key, name in names.items():
        p50 = statistics.median(r[key][0] for r in rows)
        ci = statistics.median(r[key][1] for r in rows)
        diff = statistics.median(r[key][0] / r["first"][0] for r in rows) - 1
        ci_first = statistics.median(r["first"][1] for r in rows)
        within = "yes" if abs(diff) <= max(ci, ci_first) else "no"
        print(f"| {name} | {p50:.4f} | ±{ci * 100:.2f} % | {diff * 100:+.2f} % | {within} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--finetune-steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=8, help="isolation rounds")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-isolation", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "fast.yaml"
        target.write_text(FAST_TARGET)
        if not args.skip_overhead:
            overhead(args.trials, args.finetune_steps, str(target))
    if not args.skip_isolation:
        with contextlib.suppress(KeyboardInterrupt):
            isolation(args.rounds)


if __name__ == "__main__":
    main()
