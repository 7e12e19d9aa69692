"""Fine-tuning settings: the budget a task carries and a trial may override.

Imported by the task contract (``autoprune.task``) and by the fine-tuning loop
(``autoprune.finetune``, which exports ``FinetuneSettings`` too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from autoprune.errors import UsageError

__all__ = ["FinetuneSettings"]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FinetuneSettings:
    """How a pruned model is fine-tuned; tasks carry defaults, ``replace()`` to change them.

    Example:
        >>> s = FinetuneSettings(steps=100, lr=0.01)
        >>> s.replace(distill_weight=0.5).distill_weight
        0.5
    """

    steps: int = 200  # optimizer steps (0 = no fine-tuning); the data is cycled as needed
    lr: float = 0.01  # peak learning rate
    optimizer: str = "sgd"  # "sgd" (with momentum, Nesterov) or "adamw"
    momentum: float = 0.9  # SGD momentum; AdamW uses it as beta1
    weight_decay: float = 5e-4  # L2 (SGD) or decoupled (AdamW) weight decay
    schedule: str = "cosine"  # "cosine" (decays to 0 at `steps`) or "constant"
    warmup_steps: int = 0  # linear warm-up steps before the schedule
    batch_size: int | None = None  # None = the task's batches; else re-batch its DataLoader
    distill_weight: float = 0.0  # weight of the distillation loss in [0, 1]; 0 = off
    temperature: float = 4.0  # softmax temperature of the distillation loss
    eval_every: int = 0  # evaluate (and call on_eval) every N steps; 0 = never
    # Training batches over which BatchNorm statistics are re-estimated (reset, cumulative
    # average, no gradients) before every evaluation, as EagleEye's adaptive BN; 0 = off.
    # On by default: it raised the Kendall tau of brief fine-tuning against the final metric
    # on every digits setting of benchmarks/search_quality.py, for about 8 forward passes
    bn_recalibration: int = 8
    seed: int = 0  # seeds torch and the training data order

    def __post_init__(self) -> None:
        def number(name: str, ok: Callable[[float], bool], wanted: str, integer: bool = False):
            value = getattr(self, name)
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
                problems.append(f"{name} must be {wanted}, got {value!r}")

        problems: list[str] = []
        number("steps", lambda v: v >= 0, "an int >= 0", integer=True)
        number("lr", lambda v: 0 < v < math.inf, "a number > 0")
        if self.optimizer not in _OPTIMIZERS:
            problems.append(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            problems.append(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        number("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
        number("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0")
        number("warmup_steps", lambda v: v >= 0, "an int >= 0", integer=True)
        if self.batch_size is not None:
            number("batch_size", lambda v: v >= 1, "None or an int >= 1", integer=True)
        number("distill_weight", lambda v: 0 <= v <= 1, "in [0, 1]")
        number("temperature", lambda v: 0 < v < math.inf, "a number > 0")
        number("eval_every", lambda v: v >= 0, "an int >= 0", integer=True)
        number("bn_recalibration", lambda v: v >= 0, "an int >= 0", integer=True)
        number("seed", lambda v: True, "an int", integer=True)
        if problems:
            raise UsageError("invalid FinetuneSettings: " + "; ".join(problems))

    def with_overrides(self, overrides: dict[str, Any]) -> FinetuneSettings:
        """A plan's fine-tuning overrides applied: fields by name, and ``lr_scale``, a
        multiplier of this (the task's) learning rate.

        Example:
            >>> FinetuneSettings(lr=0.01).with_overrides({"lr_scale": 0.5}).lr
            0.005
        """
        changes = dict(overrides)
        scale = changes.pop("lr_scale", None)
        if scale is not None:
            if "lr" in changes:
                raise UsageError("fine-tuning overrides name both lr and lr_scale; keep one")
            changes["lr"] = self.lr * float(scale)
        return self.replace(**changes) if changes else self

    def replace(self, **changes: Any) -> FinetuneSettings:
        """A copy with some fields changed (validated)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise UsageError(
                f"unknown fine-tuning setting(s) {', '.join(unknown)}; known: "
                f"{', '.join(f.name for f in fields(self))}"
            )
        return replace(self, **changes)
