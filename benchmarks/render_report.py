"""Render the HTML report of a real run in headless Chromium: a screenshot and a DOM check.

    python benchmarks/render_report.py                      # small synthetic run, 2 targets
    python benchmarks/render_report.py --task digits --trials 24
    python benchmarks/render_report.py --run runs/digits    # an existing run directory

Runs a small search (unless --run is given), writes ``RUN/report.html`` with
``autoprune.report.write_report``, then opens it in headless Chromium (Debian: ``apt-get install
chromium``) twice: ``--dump-dom`` to check that plotly drew every figure (Plotly.newPlot marks
each chart div ``js-plotly-plot``) and ``--screenshot`` to save a PNG. Prints the PNG's path:
look at it.
Nothing here needs the network: plotly.js is inlined in the report.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--virtual-time-budget=15000"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def chromium(args: list[str], html: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="autoprune-chromium-") as profile:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, html.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout)


def check_dom(html: Path) -> tuple[int, int]:
    """(charts drawn by plotly, chart containers in the file) after the page's scripts ran."""
    dom = chromium(["--dump-dom"], html).stdout
    drawn = len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom))  # added by Plotly.newPlot
    expected = len(re.findall(r'class="plotly-graph-div"', html.read_text(encoding="utf-8")))
    return drawn, expected


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 2400) -> Path:
    png.unlink(missing_ok=True)
    proc = chromium([f"--screenshot={png.resolve()}", f"--window-size={width},{height}"], html)
    if not png.is_file():
        raise SystemExit(f"chromium wrote no screenshot:\n{proc.stderr[-2000:]}")
    return png


def small_run(task: str, trials: int, output: Path, finetune_steps: int | None) -> Path:
    from autoprune.search import run_search

    budgets = ["latency<0.02ms@cpu-1t"] if task.endswith("synthetic_task") else []
    result = run_search(task, "per_layer_structured", budgets, targets=["cpu-1t", "cpu"],
                        trials=trials, output=output, finetune_steps=finetune_steps,
                        progress=True)
    return result.run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="existing run directory (default: run a search)")
    p.add_argument("--task", default="autoprune.testing.tasks:synthetic_task")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--output", type=Path, default=None,
                   help="directory for a new run (default: a fresh temporary directory)")
    p.add_argument("--height", type=int, default=2400, help="screenshot height in pixels")
    args = p.parse_args(argv)

    from autoprune.report import write_report

    run_dir = args.run
    if run_dir is None:
        out = args.output or Path(tempfile.mkdtemp(prefix="autoprune-report-")) / "run"
        started = time.time()
        run_dir = small_run(args.task, args.trials, out, args.finetune_steps)
        print(f"search: {time.time() - started:.1f} s -> {run_dir}")
    html = write_report(run_dir)
    print(f"report: {html} ({html.stat().st_size / 1e6:.1f} MB)")
    drawn, expected = check_dom(html)
    print(f"charts drawn by plotly in chromium: {drawn} of {expected}")
    png = screenshot(html, html.with_suffix(".png"), height=args.height)
    print(png)
    return 0 if drawn == expected and expected > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
