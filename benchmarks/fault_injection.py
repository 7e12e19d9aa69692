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

The output goes to ``benchmarks/results/fault-injection-<date>.txt``, its table (``summary``)
and counts to ``fault-injection-<date>.json`` (see ``provenance.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provenance  # noqa: E402

from autoprune.testing.faults import (  # noqa: E402
    cluster_search,
    extend_ray_search,
    kill_driver,
    kill_ray_worker,
)
from autoprune.testing.malformed import MalformedRunner, load_corpus  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "malformed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--skip-ray", action="store_true", help="no Ray parts")
    parser.add_argument("--workdir", help="keep the run directories here (default: a temp dir)")
    args = parser.parse_args()
    with provenance.recorded("fault-injection") as rec:
        run(args, rec)


def run(args: argparse.Namespace, rec: provenance.Record) -> None:
    """Each part prints its line as it ends; the summary table (check | result) and the counts
    as values come at the end."""
    begin = time.time()
    with tempfile.TemporaryDirectory(prefix="autoprune-faults-") as tmp:
        work = Path(args.workdir or tmp)
        summary: list[list[str]] = []
        start = time.time()
        kill = kill_driver(work / "kill", kills=args.kills, trials=args.trials, seed=args.seed)
        print(f"driver kill -9 at {kill.kills} random points (s after each start: "
              f"{', '.join(map(str, kill.kill_times))}), --resume after each "
              f"({time.time() - start:.0f} s): final run {kill.trials} trials, exit "
              f"{kill.exit_code}; {kill.finished_at_kills} trials had finished before a kill")
        summary += [["kills survived", f"{kill.survived} of {kill.kills} (final run: "
                                       f"{kill.trials} trials, exit {kill.exit_code})"],
                    ["finished trials lost", f"{len(kill.lost)}"
                     + (f" (trials {', '.join(map(str, kill.lost))})" if kill.lost else "")],
                    ["plans repeated", f"{len(kill.repeated)}"
                     + (f" (trials {', '.join(map(str, kill.repeated))})" if kill.repeated
                        else "") + f"; results reused for a repeated plan: {kill.reused}"]]
        rec.values.update({
            "kills_survived": kill.survived,
            "kills": kill.kills,
            "kill_trials": kill.trials,
            "kill_exit_code": kill.exit_code,
            "trials_lost": len(kill.lost),
            "plans_repeated": len(kill.repeated),
            "results_reused": kill.reused,
        })
        if not args.skip_ray:
            worker = kill_ray_worker(work / "ray-worker")
            print(f"\nRay worker killed mid-trial ({worker.killed or 'none found'}): exit "
                  f"{worker.exit_code}, {worker.trials} of {worker.wanted} trials recorded "
                  f"({worker.failed} failed), retried: {worker.retried}, {worker.seconds} s")
            summary.append(["Ray worker killed mid-trial",
                            f"search {'completed' if worker.exit_code == 0 else 'FAILED'} "
                            f"({worker.trials} of {worker.wanted} trials, {worker.failed} "
                            f"failed; the killed one "
                            f"{'retried' if worker.retried else 'not retried'})"])
            rec.values.update({
                "ray_worker_exit_code": worker.exit_code,
                "ray_worker_trials": worker.trials,
                "ray_worker_wanted": worker.wanted,
                "ray_worker_failed": worker.failed,
                "ray_worker_retried": bool(worker.retried),
            })
            cluster = cluster_search(work / "cluster")
            print(f"\n2-node Ray cluster via --address: {cluster.nodes} nodes, exit "
                  f"{cluster.exit_code}, {cluster.trials} trials, {cluster.seconds} s; lock file "
                  f"per node: {cluster.node_locks}; front: {cluster.front} plans, "
                  f"{cluster.front_screened} with a screening latency")
            locked = sum(cluster.node_locks.values())
            summary.append(["2-node cluster",
                            f"{locked} of {cluster.nodes} nodes measured under their own lock; "
                            f"{cluster.front - cluster.front_screened} of {cluster.front} front "
                            f"plans re-measured in full (exit {cluster.exit_code})"])
            rec.values.update({
                "cluster_exit_code": cluster.exit_code,
                "cluster_nodes": cluster.nodes,
                "cluster_nodes_locked": locked,
                "cluster_front": cluster.front,
                "cluster_front_full": cluster.front - cluster.front_screened,
            })
            extend = extend_ray_search(work / "extend")
            print(f"\nRay search of {extend.first} trials resumed with --trials {extend.asked}: "
                  f"{extend.trials} trials, exits {extend.exit_codes}")
            summary.append(["restored Ray search extended",
                            f"{'yes' if extend.trials > extend.first else 'NO'} "
                            f"({extend.first} -> {extend.trials} trials, asked {extend.asked}; "
                            f"exits {', '.join(map(str, extend.exit_codes))})"])
            rec.values.update({
                "extend_first": extend.first,
                "extend_asked": extend.asked,
                "extend_trials": extend.trials,
            })
        with MalformedRunner() as runner:
            outcomes = [runner.run(case) for case in load_corpus(CORPUS)]
        bad = [o for o in outcomes if not (o.rejected and o.says_why)]
        for o in bad:
            print(f"NOT REJECTED WITH ITS REASON {o.case.id}: {o.detail}")
        summary.append(["malformed inputs rejected",
                        f"{len(outcomes) - len(bad)} of {len(outcomes)} (exit 2 or the expected "
                        f"4xx, with the expected reason, no traceback)"])
        rec.values.update({
            "malformed_rejected": len(outcomes) - len(bad),
            "malformed_total": len(outcomes),
            "seconds": round(time.time() - begin),
        })
    provenance.print_table("summary", ["check", "result"], summary)


if __name__ == "__main__":
    main()
