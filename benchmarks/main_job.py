"""The main job, recorded: runs ``make search`` and writes its output and figures to a
results file (``benchmarks/results/main-job-<date>.json``), which the README quotes.

Run it from a clean clone on a quiet machine: ``python benchmarks/main_job.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

# value name -> (pattern in the summary, group names for its groups)
FIGURES = {
    "recommended": (r"- cpu-1t: pareto/trial_(\d+)\.json - accuracy ([\d.]+), ([\d.]+) ms, "
                    r"([\d.]+)x faster", ("trial", "accuracy", "ms", "speedup")),
    "vs_uniform": (r"accuracy ([+-][\d.]+) vs best uniform baseline at equal latency "
                   r"\(([^:]+): ([\d.]+)", ("gap", "plan", "accuracy")),
    "inside": (r"(\d+) of (\d+) searched plans met", ("plans", "of")),
    "cost_error": (r"median \|predicted / measured - 1\| ([\d.]+) % over (\d+) trials, "
                   r"([\d.]+) % after the first 10", ("all", "trials", "after_10")),
    "dense": (r"Dense model: accuracy ([\d.]+), p50 ms @cpu-1t ([\d.]+)", ("accuracy", "ms")),
    "budget": (r"budgets: latency<20% \(= latency<([\d.]+)ms\)", ("ms",)),
    "verified": (r"reaches accuracy ([\d.]+) and the best uniform baseline at equal latency "
                 r"\(([^,]+), trial \d+\) ([\d.]+): ([+-][\d.]+) \(noise ([\d.]+)\)",
                 ("recommended", "uniform_plan", "uniform", "gap", "noise")),
    "tau": (r"Kendall tau between proxy and final accuracy over (\d+) plans: (-?\d+\.\d+|nan)",
            ("plans", "tau")),
    "trials": (r"(\d+) trials \((\d+) complete, (\d+) infeasible, (\d+) pruned, (\d+) failed[;)]",
               ("all", "complete", "infeasible", "pruned", "failed")),
    "run_dir": (r"run directory: (\S+)", ("path",)),
}


def main() -> int:
    with provenance.recorded("main-job") as record:
        start = time.monotonic()
        proc = subprocess.Popen(["make", "-s", "search"], cwd=provenance.ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        if proc.wait():
            raise SystemExit(f"make search exited with {proc.returncode}")
        seconds = time.monotonic() - start
        record.value("wall", f"{int(seconds // 60)} min {int(seconds % 60)} s")
        log = "".join(lines)
        for name, (pattern, groups) in FIGURES.items():
            m = re.search(pattern, log)
            if m is None:
                raise SystemExit(f"the summary has no {name} line (pattern {pattern!r})")
            for key, val in zip(groups, m.groups(), strict=True):
                record.value(f"{name}.{key}", val)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
