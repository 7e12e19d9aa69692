"""How a search was configured (``run.json``): what --resume, show, report and plan read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from autoprune.budget import Budget, Objective, parse_budgets
from autoprune.run.layout import RUN_JSON

__all__ = ["RunConfig"]


@lru_cache(maxsize=64)
def _resolved(budgets: tuple[str, ...], reference: tuple[tuple[str, float], ...],
              primary: str) -> tuple[Budget, ...]:
    parsed = parse_budgets(list(budgets))
    if not reference:  # not measured yet: relative budgets stay unresolved
        return tuple(parsed)
    return tuple(b.resolve(dict(reference), primary) for b in parsed)


@dataclass
class RunConfig:
    """How a search was configured; saved as ``run.json``."""

    task: str  # task spec ("digits", "file.py:make_task", ...)
    space: dict[str, Any]  # the search space as plain data
    budgets: list[str]  # budget strings as the user wrote them
    targets: list[dict[str, Any]]  # target profiles (first = primary)
    objectives: list[dict[str, str]]  # [{key, direction}]
    metric: str  # the task metric's name
    metric_direction: str  # maximize | minimize
    backend: str = "optuna"  # optuna | ray
    sampler: str = "tpe"  # tpe | nsga2 | random
    trials: int = 40  # trials requested
    seed: int = 0  # sampler seed
    finetune_steps: int | None = None  # override of the task's fine-tuning steps
    screen_latency: bool = True  # trials timed with the screening protocol (front: full)
    steer: bool = True  # scale sampled allocations onto the cost budgets (search/_steer.py)
    # The dense model's cost metrics (full latency protocol) measured before the first trial:
    # they resolve relative budgets ("latency<35%"), so verdicts do not move during a search.
    reference: dict[str, float] = field(default_factory=dict)

    @property
    def target_names(self) -> list[str]:
        return [t["name"] for t in self.targets]

    @property
    def primary(self) -> str:
        return self.targets[0]["name"]

    def parsed_budgets(self) -> list[Budget]:
        """The budgets, relative ones resolved against the dense model (``reference``); parsed
        once per distinct (budgets, reference), not on every call."""
        return list(_resolved(tuple(self.budgets), tuple(sorted(self.reference.items())),
                              self.primary))

    def budgets_text(self, budgets: list[Budget] | None = None) -> str:
        """Budgets as written, each relative one with the absolute value it resolved to."""
        shown = self.parsed_budgets() if budgets is None else budgets
        return ", ".join(b.describe() for b in shown) or "none"

    def parsed_objectives(self) -> list[Objective]:
        return [Objective(o["key"], o["direction"]) for o in self.objectives]

    def save(self, run_dir: Path) -> None:
        (run_dir / RUN_JSON).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> RunConfig:
        return cls(**json.loads((run_dir / RUN_JSON).read_text()))
