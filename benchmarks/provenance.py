"""Results files: what a benchmark measured, with where and when it ran.

A benchmark runs inside :func:`recorded`: everything it prints goes to the terminal and to
``benchmarks/results/<name>-<date>.txt`` (the raw log), and at the end
``benchmarks/results/<name>-<date>.json`` holds the command, date, commit (and whether the tree
was dirty), the machine (CPU, cores, memory, torch and ONNX Runtime versions), the load average
before and after, whether the machine was busy, and the figures: every Markdown table the
benchmark printed, plus named values. ``bench_docs.py`` renders docs from those files only.

A table is named by a ``table: NAME`` line printed just before it, else ``table<N>`` by order.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REQUIRED = ("benchmark", "command", "date", "commit", "dirty", "machine", "load", "busy",
            "tables", "values", "log")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def dirty() -> bool:
    """Whether tracked code differs from the commit (results files and Markdown left aside:
    writing them is not a change to what is measured)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)benchmarks/results", ":(exclude)*.md"))


def commit() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
               platform.processor())
    meminfo = Path("/proc/meminfo")
    kib = next((int(ln.split()[1]) for ln in (meminfo.read_text().splitlines()
                                              if meminfo.is_file() else [])
                if ln.startswith("MemTotal:")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(kib / 2**20, 1),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": _version("torch"),
            "onnxruntime": _version("onnxruntime")}


def load() -> list[float]:
    """The load average over 1, 5 and 15 minutes."""
    return [round(x, 2) for x in os.getloadavg()]


def is_busy(record: dict[str, Any]) -> bool:
    """A run is busy when the 1-minute load before or after it exceeded the core count."""
    cores = record["machine"].get("cores") or 1
    return any(v is not None and v[0] > cores for v in record["load"].values())


# -- tables in a log -----------------------------------------------------------------------

_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_tables(text: str) -> dict[str, dict[str, Any]]:
    """The Markdown tables in ``text``: name -> {"columns", "align", "rows"}."""
    lines = text.splitlines()
    tables: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith("|") and _SEPARATOR.match(lines[i + 1].strip()):
            before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            label = re.fullmatch(r"table: (\S+)", before)
            name = label.group(1) if label else f"table{len(tables) + 1}"
            align = [("right" if c.strip().endswith(":") else "left")
                     for c in _cells(lines[i + 1])]
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            tables[name] = {"columns": _cells(lines[i]), "align": align, "rows": rows}
            i = j
        else:
            i += 1
    return tables


def print_table(name: str, columns: list[str], rows: list[list[Any]],
                right: tuple[int, ...] = ()) -> None:
    """Print a Markdown table under a ``table: NAME`` line (so its results file names it);
    ``right``: the columns to align right (numbers)."""
    print(f"\ntable: {name}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" if i in right else "---" for i in range(len(columns))) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(flush=True)


# -- recording a run -----------------------------------------------------------------------

@dataclass
class Record:
    """One benchmark run being recorded (see :func:`recorded`)."""

    name: str
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M"))
    values: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists() or self.path.exists():  # a run of the same minute: seconds
            self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.data: dict[str, Any] = {
            "benchmark": self.name,
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "commit": commit(), "dirty": dirty(), "machine": machine(),
            "load": {"before": load(), "after": None}, "finished": None,
        }

    @property
    def log_path(self) -> Path:
        return RESULTS / f"{self.name}-{self.stamp}.txt"

    @property
    def path(self) -> Path:
        return RESULTS / f"{self.name}-{self.stamp}.json"

    def write_log(self, text: str) -> None:
        self.lines.append(text)
        with self.log_path.open("a") as f:
            f.write(text)

    def value(self, name: str, value: Any) -> None:
        """A named figure that is not a table cell (docs quote it by name)."""
        self.values[name] = value

    def save(self, error: str | None = None) -> Path:
        self.data["load"]["after"] = load()
        self.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        log = "".join(self.lines)
        record = {**self.data, "busy": False, "tables": parse_tables(log),
                  "values": self.values, "log": self.log_path.name,
                  **({"error": error} if error else {})}
        record["busy"] = is_busy(record)
        self.path.write_text(json.dumps(record, indent=1) + "\n")
        return self.path


class _Tee:
    def __init__(self, stream, record: Record) -> None:
        self.stream, self.record = stream, record

    def write(self, text: str) -> int:
        self.record.write_log(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def recorded(name: str) -> Iterator[Record]:
    """Run a benchmark's body with its output logged and its results file written at the end
    (also when it fails: the file then says the error)."""
    record = Record(name)
    tee = _Tee(sys.stdout, record)
    sys.stdout = tee
    print(header(record.data))
    error = None
    try:
        yield record
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        sys.stdout = tee.stream
        path = record.save(error)
        print(f"results: {path.relative_to(ROOT)} (log {record.log_path.name})")


def header(data: dict[str, Any]) -> str:
    """The lines naming the command, date, commit, machine and load at the start of a log."""
    m = data["machine"]
    return "\n".join([
        f"command: {data['command']}",
        f"date:    {data['date']}",
        f"commit:  {data['commit']}" + (" (uncommitted changes in the tree)"
                                         if data["dirty"] else ""),
        f"machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, {m['os']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}",
        "load:    load average {} {} {} (1, 5, 15 min) at the start".format(
            *data["load"]["before"]),
        "",
    ])


def import_log(path: Path) -> Path:
    """Write the results file of a raw log recorded before results files existed: the
    command, date, commit, machine and load come from its header lines (what it did not
    record stays null), the tables from its Markdown tables."""
    text = path.read_text()

    def field_(name: str) -> str | None:
        m = re.search(rf"^{name}:\s*(.+)$", text, re.MULTILINE)
        return m.group(1).strip() if m else None

    machine_line, commit_line = field_("machine") or "", field_("commit") or ""
    cores = re.match(r"(\d+) cores, ([^,;]+)(?:, ([^;]+))?", machine_line)
    loads = [[float(x) for x in m] for m in re.findall(
        r"load(?: average)? ([\d.]+),? ([\d.]+),? ([\d.]+)", text)]
    if not (field_("command") and field_("date") and commit_line and cores and loads):
        raise ValueError(f"{path.name}: no command/date/commit/machine/load header to import")
    record = {
        "benchmark": re.sub(r"-\d{8}(-\d{4})?$", "", path.stem),
        "command": field_("command"), "date": field_("date"),
        "commit": commit_line.split()[0], "dirty": "uncommitted" in commit_line,
        "machine": {"cpu": cores.group(2).strip(), "cores": int(cores.group(1)),
                    "memory_gib": None, "os": cores.group(3), "python": None, "torch": None,
                    "onnxruntime": None},
        "load": {"before": loads[0], "after": loads[-1] if len(loads) > 1 else None},
        "finished": None, "imported": "from a raw log written before results files existed",
        "tables": parse_tables(text), "values": {}, "log": path.name,
    }
    record["busy"] = is_busy(record)
    out = path.with_suffix(".json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


def load_results(name: str) -> dict[str, Any]:
    """The results file ``name`` (with or without ``.json``)."""
    path = RESULTS / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path.relative_to(ROOT)}")
    return json.loads(path.read_text())
