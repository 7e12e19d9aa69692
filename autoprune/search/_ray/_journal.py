"""Journal and resume: what the driver must not forget when it is killed.

Ray snapshots its experiment (``RUN/ray/tune``) every few seconds; ``--resume`` continues it
with ``Tuner.restore``. Tune cannot change a restored experiment's trial count, so ``--resume``
with another ``--trials`` starts a new experiment (``RUN/ray/tune-2``, ...) that replays the
journal's suggestions (finished trials report their recorded results) and then samples the rest.

Between snapshots the driver appends every suggestion and every finished
trial to ``RUN/ray/journal.jsonl``: on resume, suggestions made after the last snapshot are
replayed with the same trial numbers (``_Searcher``), and trials that had finished are not run
again (``_trainable``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

EXPERIMENT = "tune"  # Ray's experiment directory: RUN/ray/tune


class _Journal:
    """Append-only JSON lines, flushed and fsync'd: what the driver must not forget."""

    def __init__(self, path: Path):
        self.path = path  # RUN/ray/journal.jsonl

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a kill
                records.append(json.loads(line))
        return records

    def state(self) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]],
                             dict[int, dict[str, Any]]]:
        """What the journal holds: the last start ({trials, experiment}; None: a new journal),
        the suggestions by number ({params, baseline}) and the finished trials by number
        ({params, payload, curve})."""
        start, suggested, finished = None, {}, {}
        for rec in self.read():
            if rec.get("event") == "start":
                start = {"trials": rec["trials"], "experiment": rec.get("experiment", EXPERIMENT)}
            elif rec.get("event") == "suggest":
                suggested[rec["number"]] = {"params": rec["params"],
                                            "baseline": rec.get("baseline")}
            elif rec.get("event") == "finish":
                finished[rec["number"]] = rec
        return start, suggested, finished


def _restorable(exp_dir: Path) -> bool:
    """Whether Ray saved the experiment in ``exp_dir`` far enough for ``Tuner.restore``."""
    return (exp_dir / "tuner.pkl").is_file() and any(exp_dir.glob("experiment_state-*.json"))
