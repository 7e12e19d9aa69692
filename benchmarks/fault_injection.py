"""Break searches on purpose and print what survives.

- driver ``kill -9`` at ``--kills`` random points of a ``--trials`` search (Optuna backend,
  synthetic task, ``latency<80%``), ``--resume`` after each: kills survived, trials finished
  before a kill that the final run lost, plans tried twice (and results reused instead);
- a Ray worker killed with SIGKILL in the middle of a trial: does the search finish?
- a 2-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, one temp directory per
  node) driven through ``--address``: a measurement lock file per node, fronts re-measured;
- a finished Ray search resumed with more ``--trials``: does it run the extra trials?
- the malformed-input corpus (``tests/data/malformed``): inputs rejected with exit 2 or a 4xx
  answer and no traceback.

Run: ``.venv/bin/python benchmarks/fault_injection.py [--kills 5] [--trials 20] [--skip-ray]``
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from autoprune.testing.faults import (
    cluster_search,
    extend_ray_search,
    kill_driver,
    kill_ray_worker,
)
from autoprune.testing.malformed import MalformedRunner, load_corpus

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "malformed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray parts")
    parser.add_argument("--workdir", help="keep the run directories here (default: a temp dir)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="autoprune-faults-") as tmp:
        work = Path(args.workdir or tmp)
        summary = []
        start = time.time()
        kill = kill_driver(work / "kill", kills=args.kills, trials=args.trials, seed=args.seed)
        print(f"\ndriver kill -9 at {kill.kills} random points (s after each start: "
              f"{', '.join(map(str, kill.kill_times))}), --resume after each "
              f"({time.time() - start:.0f} s): final run {kill.trials} trials, exit "
              f"{kill.exit_code}; {kill.finished_at_kills} trials had finished before a kill")
        summary += [f"kills survived: {kill.survived} of {kill.kills}",
                    f"finished trials lost: {len(kill.lost)}"
                    + (f" (trials {kill.lost})" if kill.lost else ""),
                    f"plans repeated: {len(kill.repeated)}"
                    + (f" (trials {kill.repeated})" if kill.repeated else "")
                    + f"; results reused for a repeated plan: {kill.reused}"]
        if not args.skip_ray:
            worker = kill_ray_worker(work / "ray-worker")
            print(f"\nRay worker killed mid-trial ({worker.killed or 'none found'}): exit "
                  f"{worker.exit_code}, {worker.trials} of {worker.wanted} trials recorded "
                  f"({worker.failed} failed), retried: {worker.retried}, {worker.seconds} s")
            summary.append(f"Ray worker killed mid-trial: search "
                           f"{'completed' if worker.exit_code == 0 else 'FAILED'} "
                           f"({worker.trials} of {worker.wanted} trials, {worker.failed} failed)")
            cluster = cluster_search(work / "cluster")
            print(f"\n2-node Ray cluster via --address: {cluster.nodes} nodes, exit "
                  f"{cluster.exit_code}, {cluster.trials} trials, {cluster.seconds} s; lock file "
                  f"per node: {cluster.node_locks}; front: {cluster.front} plans, "
                  f"{cluster.front_screened} with a screening latency")
            summary.append(f"2-node cluster: {sum(cluster.node_locks.values())} of "
                           f"{cluster.nodes} nodes measured under their own lock; "
                           f"{cluster.front - cluster.front_screened} of {cluster.front} front "
                           f"plans re-measured in full")
            extend = extend_ray_search(work / "extend")
            print(f"\nRay search of {extend.first} trials resumed with --trials {extend.asked}: "
                  f"{extend.trials} trials, exits {extend.exit_codes}")
            summary.append(f"restored Ray search extended: {extend.trials > extend.first} "
                           f"({extend.first} -> {extend.trials} trials, asked {extend.asked})")
        with MalformedRunner() as runner:
            outcomes = [runner.run(case) for case in load_corpus(CORPUS)]
        bad = [o for o in outcomes if not (o.rejected and o.says_why)]
        for o in bad:
            print(f"NOT REJECTED WITH ITS REASON {o.case.id}: {o.detail}")
        summary.append(f"malformed inputs rejected with the expected reason: "
                       f"{len(outcomes) - len(bad)} of {len(outcomes)}")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
