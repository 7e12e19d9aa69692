"""Where and when a benchmark ran: command, date, commit, machine and load, for results files.

Every results file a benchmark writes starts with :func:`header`; docs quote numbers only from
such files.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    """The checked-out commit, marked if tracked files differ from it (results files left
    aside: a run writing one is not a change to the code)."""
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)benchmarks/results")
    return (_git("rev-parse", "--short", "HEAD") or "unknown") + (
        " (uncommitted changes in the tree)" if dirty else "")


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
               platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}"


def load() -> str:
    return "load average {:.1f} {:.1f} {:.1f} (1, 5, 15 min)".format(*os.getloadavg())


def header() -> str:
    """Lines naming the command, date, commit, machine and load at the start."""
    return "\n".join([
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        f"date:    {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"commit:  {commit()}",
        f"machine: {machine()}",
        f"load:    {load()} at the start",
    ])
