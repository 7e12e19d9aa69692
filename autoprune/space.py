"""Search spaces: which groups take part, sparsity ranges, criteria, modes, fine-tuning knobs.

A :class:`SearchSpace` is plain data loaded from YAML (see ``search_spaces/``). Bound to a
model's prunable groups it becomes a :class:`BoundSpace`, whose ``sample(trial)`` is a pure
define-by-run function (usable by Optuna and by Ray Tune's ``OptunaSearch``) and whose
``build(params)`` turns sampled parameters into a :class:`PruningPlan`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from autoprune.errors import PlanError, SearchSpaceError, unknown_fields
from autoprune.plan import (
    CRITERIA,
    MODES,
    QUANTIZE,
    UNSTRUCTURED_CRITERIA,
    LayerRule,
    PruningPlan,
    Recovery,
)

__all__ = ["SearchSpace", "BoundSpace", "GroupInfo", "load_space", "builtin_spaces",
           "SPACES_DIR", "PRECISIONS"]

# The shipped spaces: inside the package when installed from a wheel (setup.py maps
# search_spaces/ to autoprune/_spaces), at the top of the source tree otherwise.
SPACES_DIR = Path(__file__).resolve().parent / "_spaces"
if not SPACES_DIR.is_dir():  # a source checkout or an editable install
    SPACES_DIR = SPACES_DIR.parent.parent / "search_spaces"

_SHARES = ("per_layer", "per_stage", "global")
# `autoprune search --quantize` values -> the plan's quantize value they allow besides fp32
PRECISIONS = {"none": "none", "static": "int8", "dynamic": "int8-dynamic"}


@dataclass(frozen=True)
class GroupInfo:
    """What a space needs to know about one prunable group (no torch objects)."""

    name: str  # leading layer (structured rules are keyed by it)
    producers: tuple[str, ...]  # layers whose outputs the group's channels are
    whole_groups: bool = False  # a grouped conv's outputs whose conv groups may go whole


@dataclass(frozen=True)
class FloatRange:
    low: float  # smallest value
    high: float  # largest value
    step: float | None = None  # grid step (None: continuous)
    log: bool = False  # sample on a log scale


@dataclass(frozen=True)
class SearchSpace:
    """A search space as written in YAML.

    Example:
        >>> space = SearchSpace(name="demo", sparsity=FloatRange(0.0, 0.6, 0.1))
        >>> space.share
        'per_layer'
    """

    name: str  # shown in reports
    description: str = ""  # one line for humans
    include: tuple[str, ...] = ("re:.*",)  # groups taking part: exact names or re: patterns
    exclude: tuple[str, ...] = ()  # groups left alone (skip)
    sparsity: FloatRange = FloatRange(0.0, 0.7, 0.05)  # sampled sparsity per unit
    share: str = "per_layer"  # per_layer | per_stage | global: how many sparsities are sampled
    stage_pattern: str = r"^(.*?\d+)\."  # per_stage: first capture group names a group's stage
    modes: tuple[str, ...] = ("structured",)  # modes to choose from (per unit if several)
    criteria: tuple[str, ...] = ("l1",)  # criteria to choose from
    criteria_share: str = "global"  # per_layer | per_stage | global: how many are sampled
    round_to: tuple[int | None, ...] = (None,)  # structured round_to choices
    quantize: tuple[str, ...] = ("none",)  # none | int8 (static) | int8-dynamic, see quantize.py
    # Fine-tuning knobs: lr_scale (a multiplier of the task's own lr) or, explicitly, any
    # FinetuneSettings field such as an absolute lr
    finetune: dict[str, FloatRange] = field(default_factory=dict)
    # Recovery choices (plan.Recovery): reconstruct true/false, hidden_distill weights,
    # calibration_samples; a field with one choice is fixed, absent fields keep the defaults
    recovery: dict[str, tuple] = field(default_factory=dict)
    # Depth: up to this many blocks of the main stack may be dropped (a sampled count; which
    # ones go is ranked once per search, see autoprune.prune.rank_blocks); 0 = width only
    depth: int = 0
    # Grouped convs: remove whole conv groups (true) or channels inside every group (false);
    # two choices are sampled once per plan (see prune.grouped_advice for which pays)
    whole_groups: tuple[bool, ...] = (False,)

    @classmethod
    def from_dict(cls, data: Any, source: str = "space") -> SearchSpace:
        if not isinstance(data, dict):
            raise SearchSpaceError(f"{source}: expected a mapping, got {type(data).__name__}")
        known = {"name", "description", "groups", "sparsity", "share", "stage_pattern", "modes",
                 "criteria", "criteria_share", "round_to", "quantize", "finetune", "recovery",
                 "depth", "whole_groups"}
        if extra := unknown_fields(data, known):
            raise SearchSpaceError(f"{source}: {extra}")
        groups = data.get("groups") or {}
        if not isinstance(groups, dict):
            raise SearchSpaceError(f"{source}.groups: expected {{include: [...], exclude: [...]}}")
        space = cls(
            name=str(data.get("name", source)),
            description=str(data.get("description", "")),
            include=tuple(_str_list(groups.get("include", ["re:.*"]), f"{source}.groups.include")),
            exclude=tuple(_str_list(groups.get("exclude", []), f"{source}.groups.exclude")),
            sparsity=_range(data.get("sparsity", {"low": 0.0, "high": 0.7, "step": 0.05}),
                            f"{source}.sparsity"),
            share=data.get("share", "per_layer"),
            stage_pattern=data.get("stage_pattern", r"^(.*?\d+)\."),
            modes=tuple(_choices(data.get("modes", ["structured"]), MODES, f"{source}.modes")),
            criteria=tuple(_choices(data.get("criteria", ["l1"]), CRITERIA,
                                    f"{source}.criteria")),
            criteria_share=data.get("criteria_share", "global"),
            round_to=tuple(data.get("round_to", [None]) or [None]),
            quantize=tuple(_choices(data.get("quantize", ["none"]), QUANTIZE,
                                    f"{source}.quantize")),
            finetune={k: _range(v, f"{source}.finetune.{k}")
                      for k, v in (data.get("finetune") or {}).items()},
            recovery=_recovery_choices(data.get("recovery") or {}, f"{source}.recovery"),
            depth=data.get("depth", 0),
            whole_groups=tuple(_bools(data.get("whole_groups", [False]),
                                      f"{source}.whole_groups")),
        )
        space._validate(source)
        return space

    def _validate(self, source: str) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise SearchSpaceError(f"{source}.depth: {self.depth!r} must be a whole number of "
                                   f"blocks >= 0 (0 = no block is dropped)")
        s = self.sparsity
        if not 0 <= s.low <= s.high < 1:
            raise SearchSpaceError(f"{source}.sparsity: need 0 <= low <= high < 1, got "
                                   f"low={s.low}, high={s.high}")
        for name in ("share", "criteria_share"):
            if getattr(self, name) not in _SHARES:
                raise SearchSpaceError(f"{source}.{name}: {getattr(self, name)!r} is not one of "
                                       f"{', '.join(_SHARES)}")
        try:
            re.compile(self.stage_pattern)
        except re.error as e:
            raise SearchSpaceError(f"{source}.stage_pattern: invalid regular expression: {e}"
                                   ) from None
        from autoprune.finetune_settings import FinetuneSettings

        knobs = {"lr_scale", *FinetuneSettings.__dataclass_fields__}
        for knob in self.finetune:
            if knob not in knobs:
                raise SearchSpaceError(
                    f"{source}.finetune.{knob}: not a fine-tuning setting; use lr_scale (a "
                    f"multiplier of the task's lr, e.g. {{low: 0.3, high: 3, log: true}}) or "
                    f"one of {', '.join(sorted(knobs - {'lr_scale'}))}")
        if "lr" in self.finetune and "lr_scale" in self.finetune:
            raise SearchSpaceError(f"{source}.finetune: lr (absolute) and lr_scale (relative to "
                                   f"the task's lr) exclude each other; keep one")
        for r in self.round_to:
            if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
                raise SearchSpaceError(f"{source}.round_to: {r!r} must be a positive integer "
                                       f"or null")
        if "unstructured" in self.modes and not set(self.criteria) & set(UNSTRUCTURED_CRITERIA):
            raise SearchSpaceError(f"{source}.criteria: unstructured mode needs one of "
                                   f"{', '.join(UNSTRUCTURED_CRITERIA)}")

    def with_precision(self, scheme: str) -> SearchSpace:
        """This space with its quantize choices limited to fp32 and ``scheme`` (``none``,
        ``static`` or ``dynamic``: what ``autoprune search --quantize`` passes).

        Example:
            >>> load_space("mixed").with_precision("dynamic").quantize
            ('none', 'int8-dynamic')
        """
        if scheme not in PRECISIONS:
            raise SearchSpaceError(f"--quantize {scheme!r}: expected one of "
                                   f"{', '.join(PRECISIONS)}")
        wanted = {"none", PRECISIONS[scheme]}
        kept = tuple(q for q in self.quantize if q in wanted)
        if PRECISIONS[scheme] not in kept:
            raise SearchSpaceError(
                f"--quantize {scheme}: space {self.name!r} does not search "
                f"{PRECISIONS[scheme]} (its quantize choices: {', '.join(self.quantize)})")
        return dataclasses.replace(self, quantize=kept)

    def bind(self, groups: list[GroupInfo]) -> BoundSpace:
        """Fix the units this space samples for a model's prunable groups."""
        chosen = [g for g in groups if _matches(g.name, self.include)
                  and not _matches(g.name, self.exclude)]
        if not chosen and self.share != "global":
            raise SearchSpaceError(
                f"space {self.name!r}: groups.include/exclude leave no prunable group; the "
                f"model's groups are: {', '.join(g.name for g in groups)}")
        units: dict[str, list[GroupInfo]] = {}
        for g in chosen:
            if self.share == "per_layer":
                key = g.name
            elif self.share == "global":
                key = "all"
            else:
                key = self.stage_of(g.name)
            units.setdefault(key, []).append(g)
        skipped = [g for g in groups if g not in chosen]
        return BoundSpace(self, units, skipped)

    def stage_of(self, group: str) -> str:
        """The stage a group belongs to: ``stage_pattern``'s first capture group."""
        m = re.search(self.stage_pattern, group)
        return m.group(1) if m and m.groups() else (m.group(0) if m else group)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else p == name for p in patterns)


def _str_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SearchSpaceError(f"{where}: expected a list of names or re: patterns")
    return value


def _bools(value: Any, where: str) -> list[bool]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, bool) for v in values):
        raise SearchSpaceError(f"{where}: expected true, false or a list of them, got {value!r}")
    return list(dict.fromkeys(values))


def _choices(value: Any, allowed: tuple[str, ...], where: str) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value:
        raise SearchSpaceError(f"{where}: expected a non-empty list from {', '.join(allowed)}")
    for v in value:
        if v not in allowed:
            raise SearchSpaceError(f"{where}: {v!r} is not one of {', '.join(allowed)}")
    return value


def _recovery_choices(value: Any, where: str) -> dict[str, tuple]:
    """``{reconstruct: [true, false], hidden_distill: [0, 1]}``: each field's choices, every
    choice checked as a plan's recovery section would be."""
    if not isinstance(value, dict):
        raise SearchSpaceError(f"{where}: expected a mapping such as {{reconstruct: [true, "
                               f"false], hidden_distill: [0.0, 1.0]}}")
    if extra := unknown_fields(value, {f.name for f in fields(Recovery)}):
        raise SearchSpaceError(f"{where}: {extra}")
    choices = {}
    for name, options in value.items():
        options = options if isinstance(options, list) else [options]
        if not options:
            raise SearchSpaceError(f"{where}.{name}: expected a value or a non-empty list")
        for option in options:
            try:
                Recovery(**{name: option})
            except PlanError as e:
                raise SearchSpaceError(f"{where}.{name}: {str(e).split(': ', 1)[1]}") from None
        choices[name] = tuple(options)
    return choices


def _range(value: Any, where: str) -> FloatRange:
    if not isinstance(value, dict) or "low" not in value or "high" not in value:
        raise SearchSpaceError(f"{where}: expected {{low: ..., high: ..., step: ...}} "
                               f"(step and log optional), got {value!r}")
    extra = set(value) - {"low", "high", "step", "log"}
    if extra:
        raise SearchSpaceError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
    try:
        r = FloatRange(float(value["low"]), float(value["high"]),
                       float(value["step"]) if value.get("step") else None,
                       bool(value.get("log", False)))
    except (TypeError, ValueError):
        raise SearchSpaceError(f"{where}: low/high/step must be numbers, got {value!r}") from None
    if r.low > r.high or (r.log and r.low <= 0):
        raise SearchSpaceError(f"{where}: need low <= high (and low > 0 with log), got {value!r}")
    return r


@dataclass
class BoundSpace:
    """A space bound to one model's groups: ``sample(trial)`` and ``build(params)``."""

    space: SearchSpace  # the YAML-level description
    units: dict[str, list[GroupInfo]]  # sampled unit -> the groups it sets
    skipped: list[GroupInfo]  # groups outside include/exclude
    # The main stack's blocks in the order they are dropped (set by the search when the
    # space's depth > 0); a plan of depth n drops the first n
    block_order: list[str] = field(default_factory=list)

    @property
    def whole_choice(self) -> bool:
        """Whether plans choose between whole conv groups and channels inside groups."""
        return len(self.space.whole_groups) > 1 and any(
            g.whole_groups for groups in self.units.values() for g in groups)

    @property
    def max_depth(self) -> int:
        """The most blocks a plan of this space drops."""
        return min(self.space.depth, len(self.block_order))

    def sample(self, trial: Any) -> dict[str, Any]:
        """Define-by-run sampling with an Optuna trial; returns the parameters."""
        sp, s = self.space, self.space.sparsity
        crit_all = list(sp.criteria)
        if len(crit_all) > 1 and sp.criteria_share == "global":
            trial.suggest_categorical("criterion", crit_all)
        if len(sp.round_to) > 1:
            trial.suggest_categorical("round_to", list(sp.round_to))
        if len(sp.quantize) > 1:
            trial.suggest_categorical("quantize", list(sp.quantize))
        for knob, r in sp.finetune.items():
            trial.suggest_float(f"ft.{knob}", r.low, r.high, step=r.step, log=r.log)
        for name, options in sp.recovery.items():
            if len(options) > 1:
                trial.suggest_categorical(f"rec.{name}", list(options))
        if self.max_depth:
            trial.suggest_int("depth", 0, self.max_depth)
        if self.whole_choice:
            trial.suggest_categorical("whole_groups", list(sp.whole_groups))
        for unit, groups in self.units.items():
            mode = sp.modes[0]
            if len(sp.modes) > 1:
                mode = trial.suggest_categorical(f"mode.{unit}", list(sp.modes))
            if mode != "skip":
                trial.suggest_float(f"s.{unit}", s.low, s.high, step=s.step)
                if len(crit_all) > 1 and sp.criteria_share != "global":  # a stage's: once
                    for key in dict.fromkeys(self._criterion_key(g.name) for g in groups):
                        trial.suggest_categorical(key, crit_all)
        return dict(trial.params)

    def _criterion_key(self, group: str) -> str:
        """The parameter that picks ``group``'s criterion."""
        share = self.space.criteria_share
        if share == "global":
            return "criterion"
        return "criterion." + (group if share == "per_layer" else self.space.stage_of(group))

    def _rule(self, params: dict[str, Any], group: GroupInfo, mode: str, sparsity: float,
              round_to: int | None) -> LayerRule:
        crit = params.get(self._criterion_key(group.name), self.space.criteria[0])
        if mode == "unstructured" and crit not in UNSTRUCTURED_CRITERIA:
            crit = "l1"  # fpgm / bn_scale score channels only
        whole = (mode == "structured" and group.whole_groups
                 and params.get("whole_groups", self.space.whole_groups[0]))
        return LayerRule(mode, round(sparsity, 6), crit,
                         round_to if mode == "structured" else None, bool(whole))

    def build(self, params: dict[str, Any]) -> PruningPlan:
        """Turn sampled parameters into a plan (pure and deterministic)."""
        sp = self.space
        round_to = params.get("round_to", sp.round_to[0])
        rules: dict[str, LayerRule] = {g.name: LayerRule("skip") for g in self.skipped}
        default = LayerRule("skip")
        for unit, groups in self.units.items():
            mode = params.get(f"mode.{unit}", sp.modes[0])
            sparsity = float(params.get(f"s.{unit}", 0.0)) if mode != "skip" else 0.0
            if sp.share == "global" and mode == "unstructured" and not self.skipped:
                # global unstructured: every Conv/Linear, output layer included
                default = self._rule(params, groups[0], mode, sparsity, round_to)
                continue
            for g in groups:
                rule = self._rule(params, g, mode, sparsity, round_to)
                if mode == "unstructured":  # masks go on the layers producing the channels
                    rules.update({p: rule for p in g.producers})
                else:
                    rules[g.name] = rule
        finetune = {k[3:]: v for k, v in params.items() if k.startswith("ft.")}
        recovery = Recovery(**{name: params.get(f"rec.{name}", options[0])
                               for name, options in sp.recovery.items()})
        depth = int(params.get("depth", 0))
        if depth > len(self.block_order):
            raise SearchSpaceError(f"depth {depth}: only {len(self.block_order)} blocks of "
                                   f"the model are ranked to drop")
        return PruningPlan(default=default, rules=rules,
                           quantize=params.get("quantize", sp.quantize[0]), finetune=finetune,
                           recovery=recovery, drop_blocks=tuple(self.block_order[:depth]))

    def uniform_params(self, sparsity: float, mode: str | None = None) -> dict[str, Any]:
        """Parameters of a uniform plan in this space (baselines enqueued before searching)."""
        sp = self.space
        mode = mode or next((m for m in sp.modes if m != "skip"), "structured")
        s = self._snap(sparsity)
        params: dict[str, Any] = {}
        if len(sp.criteria) > 1:
            keys = ["criterion"] if sp.criteria_share == "global" else [
                self._criterion_key(g.name) for groups in self.units.values() for g in groups]
            params.update(dict.fromkeys(keys, sp.criteria[0]))
        if len(sp.round_to) > 1:
            params["round_to"] = sp.round_to[0]
        if len(sp.quantize) > 1:
            params["quantize"] = "none"
        for name, options in sp.recovery.items():  # baselines recover as the first choice
            if len(options) > 1:
                params[f"rec.{name}"] = options[0]
        if self.max_depth:
            params["depth"] = 0
        if self.whole_choice:
            params["whole_groups"] = sp.whole_groups[0]
        for knob, r in sp.finetune.items():
            # The task's own lr where the range allows it, else the middle of the range
            mid = math.sqrt(r.low * r.high) if r.log else (r.low + r.high) / 2
            own = knob == "lr_scale" and r.low <= 1.0 <= r.high
            params[f"ft.{knob}"] = self._snap_to(1.0 if own else mid, r)
        for unit in self.units:
            if len(sp.modes) > 1:
                params[f"mode.{unit}"] = mode
            params[f"s.{unit}"] = s
        return params

    def allocation_params(self, sparsities: dict[str, float],
                          criterion: str | None = None) -> dict[str, Any]:
        """Parameters of a plan that gives each group its own sparsity (a unit of several
        groups takes their mean; groups not named keep everything), ranked by ``criterion``
        (a choice of the space; its first if None)."""
        params = self.uniform_params(0.0)
        if criterion is not None:
            params = {k: criterion if k.startswith("criterion") else v for k, v in params.items()}
        for unit, groups in self.units.items():
            values = [sparsities[g.name] for g in groups if g.name in sparsities]
            if values:
                params[f"s.{unit}"] = self._snap(sum(values) / len(values))
        return params

    def baselines(self, sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)) -> dict[str, dict]:
        """The dense model and uniform plans, by name, as parameters of this space."""
        out = {}
        if self.space.sparsity.low == 0:
            out["dense"] = self.uniform_params(0.0)
        elif "skip" in self.space.modes:
            out["dense"] = {k: ("skip" if k.startswith("mode.") else v)
                            for k, v in self.uniform_params(0.0).items() if not k.startswith("s.")}
        mode = next((m for m in self.space.modes if m != "skip"), "structured")
        for s in sparsities:
            snapped = self._snap(s)
            if snapped > 0:
                out.setdefault(f"uniform-{mode}-{snapped:g}", self.uniform_params(snapped, mode))
        return out

    def _snap(self, value: float) -> float:
        return self._snap_to(value, self.space.sparsity)

    @staticmethod
    def _snap_to(value: float, r: FloatRange) -> float:
        value = min(max(value, r.low), r.high)
        if r.step:
            value = r.low + round((value - r.low) / r.step) * r.step
            value = min(value, r.high)
        return round(value, 10)


def builtin_spaces() -> dict[str, Path]:
    """Ready spaces shipped in ``search_spaces/``, by name (file stem)."""
    return {p.stem: p for p in sorted(SPACES_DIR.glob("*.yaml"))}


def load_space(spec: str | Path | SearchSpace) -> SearchSpace:
    """A space from a YAML file path or the name of a shipped space (e.g. ``per_layer``)."""
    if isinstance(spec, SearchSpace):
        return spec
    import yaml

    path = Path(spec)
    if not path.is_file():
        shipped = builtin_spaces()
        if str(spec) not in shipped:
            raise SearchSpaceError(f"search space {spec!r} is neither a file nor a shipped "
                                   f"space; shipped: {', '.join(shipped)}")
        path = shipped[str(spec)]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"{path}: not valid YAML ({e})") from None
    return SearchSpace.from_dict(data, source=str(path))
