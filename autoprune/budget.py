"""Budgets ("latency<10ms", "latency<35%", "speedup>=3x", "accuracy>=0.97") and objectives.

A budget is a hard constraint. Latency, params, FLOPs and size are known before fine-tuning, so
a plan that breaks one of them is stopped early; task-metric budgets are checked at the end.
A cost budget may be relative to the dense model on the same target (``latency<35%``,
``latency<0.35x``, ``speedup>=3x``, ``params<50%``): the dense model's measurement resolves it
to an absolute threshold before the first trial (:meth:`Budget.resolve`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from autoprune.errors import BudgetError
from autoprune.metrics import SIDE_BY_SIDE, STATISTICS, Direction, latency_key, latency_metrics

__all__ = ["Budget", "Objective", "parse_budget", "parse_budgets", "parse_objectives",
           "objective_names", "resolve_budgets", "latency_key", "latency_metrics", "STATISTICS",
           "COST_METRICS", "EXTRA_OBJECTIVES"]

COST_METRICS = ("latency", "params", "flops", "macs", "size")  # known before fine-tuning

_TIME = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}  # -> milliseconds
_COUNT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}  # params / flops / macs
_BYTES = {"b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
_PATTERN = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w.-]*)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<number>[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*(?P<unit>[A-Za-zµ%]*)\s*"
    r"(?P<at>(@[\w.:/-]+)*)\s*$"
)
_RELATIVE = {"%": 0.01, "x": 1.0}  # cost budgets relative to the dense model
_EXAMPLES = ('latency<10ms, latency<35%, speedup>=3x, latency<=2.5ms@p90, latency<5ms@cpu-1t, '
             'accuracy>=0.97, params<1M, params<50%, flops<50M, size<4MB')


@dataclass(frozen=True)
class Budget:
    """One hard constraint on a measured value.

    Example:
        >>> b = parse_budget("latency<=2.5ms@p90")
        >>> (b.metric, b.op, b.value, b.statistic, b.satisfied(2.4))
        ('latency', '<=', 2.5, 'p90', True)
    """

    metric: str  # latency | params | flops | macs | size | a task metric name (e.g. accuracy)
    op: str  # <, <=, >, >=
    value: float  # threshold in base units: ms, count, bytes, or the metric's own scale
    statistic: str = "p50"  # latency statistic the budget is about
    target: str | None = None  # target name for latency budgets (None: the first target)
    text: str = ""  # what the user wrote
    # Relative budgets: the threshold as a fraction of the dense model's value (0.35 for
    # latency<35%, 1/3 for speedup>=3x); ``value`` is NaN until :meth:`resolve` sets it.
    fraction: float | None = None

    @property
    def is_cost(self) -> bool:
        """Known before fine-tuning (so a violated plan is stopped before it)."""
        return self.metric in COST_METRICS

    def limits_latency_on(self, target: str, primary: str) -> bool:
        """A latency budget on ``target`` (one without ``@target`` is on the ``primary``)."""
        return self.metric == "latency" and (self.target or primary) == target

    def metric_key(self, default_target: str) -> str:
        """The key of the measured value in a trial's metrics."""
        if self.metric == "latency":
            return latency_key(self.target or default_target, self.statistic)
        return "size_bytes" if self.metric == "size" else self.metric

    @property
    def resolved(self) -> bool:
        return not math.isnan(self.value)

    def resolve(self, reference: dict[str, float], primary: str) -> Budget:
        """The absolute budget, from the dense model's metrics (``reference``) on ``primary``.

        Example:
            >>> b = parse_budget("speedup>=4x").resolve({"latency_p50_ms@cpu": 2.0}, "cpu")
            >>> (b.op, b.value)
            ('<=', 0.5)
        """
        if self.fraction is None:
            return self
        key = self.metric_key(primary)
        if key not in reference:
            raise BudgetError(f"budget {self.text!r} is relative to the dense model, whose "
                              f"{key} was not measured")
        return replace(self, value=self.fraction * reference[key])

    def describe(self) -> str:
        """What the user wrote and, for a relative budget, the absolute value it resolved to."""
        if self.fraction is None or not self.resolved:
            return str(self)
        unit = {"latency": "ms", "size": " B"}.get(self.metric, "")
        return f"{self} (= {self.metric}{self.op}{self.value:.4g}{unit})"

    def satisfied(self, measured: float | None, limit: float | None = None) -> bool:
        """``measured`` against this budget's value (or ``limit``, e.g. its fraction)."""
        if not self.resolved:
            raise BudgetError(f"budget {self.text!r} is relative to the dense model and was "
                              f"not resolved (Budget.resolve)")
        limit = self.value if limit is None else limit
        return measured is not None and not math.isnan(measured) and _OPS[self.op](
            measured, limit)

    def side_by_side(self, metrics: dict[str, float], primary: str) -> float | None:
        """For a relative latency budget, the plan's latency as a fraction of the dense
        model's where the two were timed side by side (the plans a search returns), else
        None. Medians taken minutes apart drift with the machine, and the budget was resolved
        from the dense model's median at the start: where this ratio exists, it is judged."""
        if self.fraction is None or self.metric != "latency":
            return None
        return metrics.get(SIDE_BY_SIDE + self.metric_key(primary))

    def judged(self, metrics: dict[str, float], primary: str) -> tuple[float | None, float]:
        """The value of a trial's metrics this budget is judged on, and its limit."""
        ratio = self.side_by_side(metrics, primary)
        if ratio is not None:
            return ratio, self.fraction
        return metrics.get(self.metric_key(primary)), self.value

    def met_by(self, metrics: dict[str, float], primary: str) -> bool:
        """Whether a trial's metrics meet this budget (see :meth:`judged`)."""
        return self.satisfied(*self.judged(metrics, primary))

    def violation(self, measured: float | None, limit: float | None = None) -> float:
        """Optuna-style constraint value: <= 0 when satisfied, relative excess otherwise."""
        if measured is None or math.isnan(measured):
            return 1.0
        if not self.resolved:
            self.satisfied(measured)  # raises the explanation
        limit = self.value if limit is None else limit
        scale = abs(limit) or 1.0
        excess = measured - limit if self.op in ("<", "<=") else limit - measured
        if self.satisfied(measured, limit):
            return min(excess / scale, 0.0)
        return max(excess / scale, 1e-9)

    def violation_by(self, metrics: dict[str, float], primary: str) -> float:
        """:meth:`violation` of a trial's metrics (see :meth:`judged`)."""
        return self.violation(*self.judged(metrics, primary))

    def __str__(self) -> str:
        return self.text or f"{self.metric}{self.op}{self.value}"


def parse_budget(text: str) -> Budget:
    """Parse one budget string; raises :class:`BudgetError` naming the problem."""
    m = _PATTERN.match(text)
    if not m:
        raise BudgetError(f"cannot parse budget {text!r}: expected METRIC OP VALUE[UNIT][@...], "
                          f"for example {_EXAMPLES}")
    metric, op, unit = m["metric"].lower(), m["op"], m["unit"]
    number = float(m["number"])
    ats = [a for a in m["at"].split("@") if a]
    statistic, target = "p50", None
    if metric == "speedup":  # speedup>=3x: latency <= dense / 3
        if unit.lower() != "x":
            raise BudgetError(f"budget {text!r}: speedup is a ratio to the dense model, "
                              f"e.g. speedup>=3x")
        if number <= 0:
            raise BudgetError(f"budget {text!r}: a speed-up must be greater than 0x")
        metric, op, unit, number = "latency", _FLIP[op], "x", 1 / number
    for a in ats:
        if a in STATISTICS:
            statistic = a
        elif metric == "latency":
            if target is not None:
                raise BudgetError(f"budget {text!r} names two targets ({target}, {a})")
            target = a
        else:
            raise BudgetError(f"budget {text!r}: '@{a}' only applies to latency budgets")
    fraction = None
    if metric in COST_METRICS and unit.lower() in _RELATIVE:
        fraction = number * _RELATIVE[unit.lower()]
        value = math.nan
        if fraction <= 0 and op in ("<", "<="):
            raise BudgetError(f"budget {text!r} can never be met: no plan costs nothing")
    elif metric == "latency":
        if unit not in _TIME:
            raise BudgetError(f"budget {text!r}: latency needs a time unit (ms, us or s) or a "
                              f"share of the dense model's, e.g. latency<10ms or latency<35%")
        value = number * _TIME[unit]
    elif metric in ("params", "flops", "macs"):
        if unit.lower() not in _COUNT:
            raise BudgetError(f"budget {text!r}: unknown unit {unit!r} for {metric}; use K, M "
                              f"or G, or % of the dense model, e.g. {metric}<1.5M or "
                              f"{metric}<50%")
        value = number * _COUNT[unit.lower()]
    elif metric == "size":
        if unit.lower() not in _BYTES:
            raise BudgetError(f"budget {text!r}: size needs a unit (B, KB, MB, GB, KiB, MiB, "
                              f"GiB) or % of the dense model, e.g. size<4MB or size<25%")
        value = number * _BYTES[unit.lower()]
    elif unit == "%":
        value = number / 100
    elif unit:
        raise BudgetError(f"budget {text!r}: unexpected unit {unit!r} for task metric {metric!r}")
    else:
        value = number
    if value < 0 or (metric in COST_METRICS and value == 0 and op in ("<", "<=")):
        raise BudgetError(f"budget {text!r} can never be met")
    return Budget(metric, op, value, statistic, target, text.strip(), fraction)


def parse_budgets(texts: list[str] | str | None) -> list[Budget]:
    """Parse several budgets; each string may hold several separated by commas."""
    if texts is None:
        return []
    if isinstance(texts, str):
        texts = [texts]
    return [parse_budget(part) for t in texts for part in t.split(",") if part.strip()]


def resolve_budgets(budgets: list[Budget], reference: dict[str, float], primary: str
                    ) -> tuple[list[Budget], list[str]]:
    """Resolve relative budgets against the dense model's metrics.

    Returns:
        The absolute budgets, and a warning for every cost budget the dense model already
        meets (it constrains nothing).
    """
    resolved = [b.resolve(reference, primary) for b in budgets]
    warnings = [f"budget {b.describe()} is met by the dense model ({b.metric_key(primary)} "
                f"{reference[b.metric_key(primary)]:.4g}): it prunes nothing away"
                for b in resolved if b.is_cost and b.metric_key(primary) in reference
                and b.op in ("<", "<=") and b.satisfied(reference[b.metric_key(primary)])]
    return resolved, warnings


@dataclass(frozen=True)
class Objective:
    """One search objective, e.g. maximize accuracy or minimize latency on a target."""

    key: str  # metrics key, e.g. "accuracy" or "latency_p50_ms@cpu-1t"
    direction: Direction  # a plain string is taken as its Direction

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", Direction(self.direction))


# Objectives a search may add to the task metric and latency: name -> metrics key
EXTRA_OBJECTIVES = {"params": "params", "flops": "flops", "macs": "macs", "size": "size_bytes"}


def objective_names(objectives: list[Objective]) -> list[str]:
    """The names ``parse_objectives`` takes for the extra objectives in ``objectives`` (those
    after the task metric and latency): what resumes a search with the same objectives."""
    names = {key: name for name, key in EXTRA_OBJECTIVES.items()}
    return [names[o.key] for o in objectives[2:]]


def parse_objectives(
    names: list[str] | None, metric: str, metric_direction: str, target: str,
    statistic: str = "p50",
) -> list[Objective]:
    """Default: the task metric and latency on the first target; extras: params/flops/size."""
    objectives = [Objective(metric, metric_direction), Objective(latency_key(target, statistic),
                                                                 Direction.MINIMIZE)]
    allowed = EXTRA_OBJECTIVES
    for name in names or []:
        for part in (p.strip().lower() for p in name.split(",") if p.strip()):
            if part in (metric, "latency"):
                continue
            if part not in allowed:
                raise BudgetError(f"unknown objective {part!r}; the task metric ({metric}) and "
                                  f"latency are always objectives, add any of "
                                  f"{', '.join(allowed)}")
            objectives.append(Objective(allowed[part], Direction.MINIMIZE))
    return objectives
