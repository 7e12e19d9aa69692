"""Pruning plans: what to prune, how much and by which criterion. Plain, versioned data.

A plan holds a default rule and per-layer rules keyed by exact module name or ``re:`` pattern.
Structured rules are looked up by a prunable group's leading layer (see ``autoprune layers``);
unstructured rules by each Conv/Linear layer's own name. Plans never hold torch objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from autoprune.errors import PlanError, unknown_fields

__all__ = ["PLAN_VERSION", "MODES", "CRITERIA", "UNSTRUCTURED_CRITERIA", "QUANTIZE",
           "LayerRule", "Recovery", "PruningPlan", "within"]

# 5: a rule's whole_groups; 4: drop_blocks; 3: a recovery section; 2: quantize names the
# scheme (version 1's "int8" was dynamic INT8)
PLAN_VERSION = 5
MODES = ("structured", "unstructured", "skip")
CRITERIA = ("l1", "l2", "taylor", "fpgm", "bn_scale", "lamp", "random", "activation", "fisher")
# Criteria that score whole channels only, so they have no meaning for single weights.
_STRUCTURED_ONLY = ("fpgm", "bn_scale", "fisher")
UNSTRUCTURED_CRITERIA = tuple(c for c in CRITERIA if c not in _STRUCTURED_ONLY)
# none: fp32; int8: static INT8 (QDQ, calibrated); int8-dynamic: INT8 weights, activations
# quantized at run time. See autoprune.quantize.
QUANTIZE = ("none", "int8", "int8-dynamic")
# Plan format versions read by from_dict, and how their quantize values map to this version's.
_QUANTIZE_OF_VERSION = {1: {"none": "none", "int8": "int8-dynamic"}, 2: {}, 3: {}, 4: {}, 5: {}}


def within(name: str, blocks: tuple[str, ...] | list[str]) -> bool:
    """Whether module ``name`` lies inside one of ``blocks`` (e.g. a plan's ``drop_blocks``).

    Example:
        >>> within("encoder.layer.2.output.dense", ["encoder.layer.2"])
        True
        >>> within("encoder.layer.21.output.dense", ["encoder.layer.2"])
        False
    """
    return name.startswith(tuple(f"{b}." for b in blocks)) if blocks else False


@dataclass(frozen=True)
class LayerRule:
    """How one layer (or prunable group) is pruned.

    Example:
        >>> LayerRule(mode="structured", sparsity=0.5, criterion="l2", round_to=8)
        LayerRule(mode='structured', sparsity=0.5, criterion='l2', round_to=8)
    """

    mode: str = "skip"  # structured (remove channels/heads) | unstructured (zero weights) | skip
    sparsity: float = 0.0  # fraction removed (structured) or zeroed (unstructured), 0 <= s < 1
    criterion: str = "l1"  # importance used to pick what goes, one of CRITERIA
    round_to: int | None = None  # structured: keep a multiple of this many channels
    # structured, on a grouped convolution's output channels: remove whole conv groups (with
    # the input channels that feed them) instead of the same channels inside every group
    # (docs/plans-and-spaces.md#grouped-convolutions)
    whole_groups: bool = False

    def __post_init__(self) -> None:
        _check_rule(self, "rule")

    @property
    def active(self) -> bool:
        return self.mode != "skip" and self.sparsity > 0


def _check_rule(rule: LayerRule, where: str) -> None:
    if rule.mode not in MODES:
        raise PlanError(f"{where}.mode: {rule.mode!r} is not one of {', '.join(MODES)}")
    s = rule.sparsity
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
        raise PlanError(f"{where}.sparsity: {s!r} must be a number with 0 <= sparsity < 1")
    if rule.criterion not in CRITERIA:
        raise PlanError(
            f"{where}.criterion: {rule.criterion!r} is not one of {', '.join(CRITERIA)}"
        )
    if rule.mode == "unstructured" and rule.criterion in _STRUCTURED_ONLY:
        raise PlanError(
            f"{where}.criterion: {rule.criterion!r} scores whole channels and works with "
            f"mode 'structured' only; for unstructured use one of "
            f"{', '.join(UNSTRUCTURED_CRITERIA)}"
        )
    r = rule.round_to
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise PlanError(f"{where}.round_to: {r!r} must be a positive integer or null")
    if not isinstance(rule.whole_groups, bool):
        raise PlanError(f"{where}.whole_groups: {rule.whole_groups!r} must be true or false")


def _rule_dict(rule: LayerRule) -> dict[str, Any]:
    """A rule as plain data; whole_groups only when set, so plans without it keep their keys."""
    data = asdict(rule)
    if not rule.whole_groups:
        del data["whole_groups"]
    return data


@dataclass(frozen=True)
class Recovery:
    """How a pruned model gets back what it knew: before fine-tuning (reconstruction) and
    during it (hidden-state distillation). See docs/recovery.md.

    Example:
        >>> Recovery(calibration_samples=128).to_dict()
        {'reconstruct': True, 'calibration_samples': 128, 'hidden_distill': 0.0}
    """

    # Refit every Conv/Linear layer whose input channels were removed, by ridge least squares,
    # so that its outputs match the dense layer's on calibration data (no training)
    reconstruct: bool = True
    calibration_samples: int = 256  # training samples it fits on; a quarter picks the ridge
    # Weight of the hidden-state loss (each block's output against the dense model's) added
    # to the task's loss while fine-tuning; 0 = off
    hidden_distill: float = 0.0

    def __post_init__(self) -> None:
        _check_recovery(self, "recovery")

    @classmethod
    def none(cls) -> Recovery:
        """No reconstruction, no hidden-state distillation (plans of format version 2)."""
        return cls(reconstruct=False, hidden_distill=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_recovery(r: Recovery, where: str) -> None:
    if not isinstance(r.reconstruct, bool):
        raise PlanError(f"{where}.reconstruct: {r.reconstruct!r} must be true or false")
    n = r.calibration_samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise PlanError(f"{where}.calibration_samples: {n!r} must be an integer >= 2")
    w = r.hidden_distill
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 100:
        raise PlanError(f"{where}.hidden_distill: {w!r} must be a number in [0, 100] "
                        f"(0 turns hidden-state distillation off)")


@dataclass(frozen=True)
class PruningPlan:
    """A complete, serializable pruning plan for one model.

    Rules are resolved per name: exact match first, then ``re:`` patterns in order
    (full match), then ``default``.

    Example:
        >>> plan = PruningPlan(
        ...     default=LayerRule("structured", 0.5),
        ...     rules={"fc": LayerRule("skip"),
        ...            "re:stages\\.0\\..*": LayerRule("unstructured", 0.8)},
        ... )
        >>> plan.rule_for("stages.0.conv1").mode
        'unstructured'
        >>> PruningPlan.from_json(plan.to_json()) == plan
        True
    """

    default: LayerRule = field(default_factory=LayerRule)  # rule for names no other rule matches
    rules: dict[str, LayerRule] = field(default_factory=dict)  # exact name or "re:pattern" -> rule
    quantize: str = "none"  # post-training quantization: none | int8 | int8-dynamic
    finetune: dict[str, Any] = field(default_factory=dict)  # fine-tuning overrides (e.g. lr)
    recovery: Recovery = field(default_factory=Recovery)  # reconstruction and distillation
    # Blocks of the main stack replaced by a pass-through (depth), by module name
    drop_blocks: tuple[str, ...] = ()
    fingerprint: list[str] | None = None  # architecture signature of the model it was made for
    version: int = PLAN_VERSION  # plan format version

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise PlanError(
                f"version: plan format {self.version!r} is not supported (this autoprune reads "
                f"version {PLAN_VERSION})"
            )
        if self.quantize not in QUANTIZE:
            raise PlanError(f"quantize: {self.quantize!r} is not one of {', '.join(QUANTIZE)}")
        blocks = self.drop_blocks
        if not isinstance(blocks, (tuple, list)) or not all(isinstance(b, str) for b in blocks):
            raise PlanError(f"drop_blocks: {blocks!r} must be a list of block names such as "
                            f"['encoder.layer.2'] (`autoprune layers` lists the blocks)")
        if len(set(blocks)) != len(blocks):
            raise PlanError(f"drop_blocks: {list(blocks)!r} names a block twice")
        object.__setattr__(self, "drop_blocks", tuple(blocks))
        for key in self.rules:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise PlanError(f"rules[{key!r}]: invalid regular expression: {e}") from None

    # -- lookup ---------------------------------------------------------------------------
    @property
    def removes_whole_groups(self) -> bool:
        """Whether a rule of the plan removes whole conv groups (``whole_groups``)."""
        return any(r.whole_groups for r in [self.default, *self.rules.values()])

    def rule_for(self, name: str) -> LayerRule:
        """The rule for ``name``: exact key, then the first matching ``re:`` key, then default."""
        if name in self.rules:
            return self.rules[name]
        for key, rule in self.rules.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return rule
        return self.default

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def uniform(
        cls, sparsity: float, mode: str = "structured", criterion: str = "l1", **kwargs: Any
    ) -> PruningPlan:
        """The same rule for every layer, e.g. ``PruningPlan.uniform(0.5)``."""
        return cls(default=LayerRule(mode, sparsity, criterion), **kwargs)

    def with_fingerprint(self, signature: list[str]) -> PruningPlan:
        return replace(self, fingerprint=list(signature))

    # -- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "default": _rule_dict(self.default),
            "rules": {k: _rule_dict(r) for k, r in self.rules.items()},
            "quantize": self.quantize,
            "finetune": dict(self.finetune),
            "recovery": self.recovery.to_dict(),
            "drop_blocks": list(self.drop_blocks),
            "fingerprint": self.fingerprint,
        }

    def key(self) -> str:
        """What the plan does, as text: equal keys prune a model the same way (the
        fingerprint and format version are left out)."""
        data = self.to_dict()
        del data["version"], data["fingerprint"]
        if not data["drop_blocks"]:  # keys of plans without depth stay as they were
            del data["drop_blocks"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> PruningPlan:
        """Build a plan from plain data, naming the offending field on any error."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a mapping with 'default' and 'rules', got "
                            f"{type(data).__name__}")
        # A plan file written by a search carries metrics next to the plan.
        if "plan" in data and isinstance(data["plan"], dict):
            data = data["plan"]
        known = {"version", "default", "rules", "quantize", "finetune", "recovery",
                 "drop_blocks", "fingerprint"}
        if extra := unknown_fields(data, known):
            raise PlanError(f"{source}: {extra}")
        version = data.get("version", PLAN_VERSION)
        if type(version) is not int or version not in _QUANTIZE_OF_VERSION:
            raise PlanError(f"{source}.version: plan format {version!r} is not supported "
                            f"(this autoprune reads versions "
                            f"{', '.join(map(str, _QUANTIZE_OF_VERSION))})")
        quantize = data.get("quantize", "none")
        # An older plan's value keeps its meaning under this version's name.
        quantize = _QUANTIZE_OF_VERSION[version].get(quantize, quantize)
        rules = data.get("rules") or {}
        if not isinstance(rules, dict):
            raise PlanError(f"{source}.rules: expected a mapping of layer name -> rule")
        fingerprint = data.get("fingerprint")
        if fingerprint is not None and not (
            isinstance(fingerprint, list) and all(isinstance(e, str) for e in fingerprint)
        ):
            raise PlanError(f"{source}.fingerprint: expected a list of strings or null")
        finetune = data.get("finetune") or {}
        if not isinstance(finetune, dict):
            raise PlanError(f"{source}.finetune: expected a mapping such as {{lr: 0.01}}")
        # Plans before version 3 were applied without recovery, and keep that meaning.
        recovery = (_recovery_from(data["recovery"], f"{source}.recovery") if "recovery" in data
                    else Recovery() if version >= 3 else Recovery.none())
        return cls(
            default=_rule_from(data.get("default", {}), f"{source}.default"),
            rules={str(k): _rule_from(v, f"{source}.rules[{k!r}]") for k, v in rules.items()},
            quantize=quantize,
            finetune=finetune,
            recovery=recovery,
            drop_blocks=data.get("drop_blocks") or (),
            fingerprint=fingerprint,
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> PruningPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "plan") -> PruningPlan:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"{source}: not valid YAML ({e})") from None
        return cls.from_dict(data, source)

    def save(self, path: str | Path) -> Path:
        """Write JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(text, source=str(path))
        return cls.from_json(text, source=str(path))


def _rule_from(data: Any, where: str) -> LayerRule:
    if isinstance(data, LayerRule):
        return data
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected a mapping like {{mode: structured, sparsity: 0.5, "
                        f"criterion: l1}}, got {data!r}")
    if extra := unknown_fields(data, {f.name for f in fields(LayerRule)}):
        raise PlanError(f"{where}: {extra}")
    rule = object.__new__(LayerRule)  # validate with the field path before constructing
    defaults = (("mode", "skip"), ("sparsity", 0.0), ("criterion", "l1"), ("round_to", None),
                ("whole_groups", False))
    for k, default in defaults:
        object.__setattr__(rule, k, data.get(k, default))
    _check_rule(rule, where)
    return LayerRule(**{k: data[k] for k in data})


def _recovery_from(data: Any, where: str) -> Recovery:
    if isinstance(data, Recovery):
        return data
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected a mapping like {{reconstruct: true, "
                        f"calibration_samples: 256, hidden_distill: 0.0}}, got {data!r}")
    if extra := unknown_fields(data, {f.name for f in fields(Recovery)}):
        raise PlanError(f"{where}: {extra}")
    recovery = object.__new__(Recovery)  # validate with the field path before constructing
    for f in fields(Recovery):
        object.__setattr__(recovery, f.name, data.get(f.name, f.default))
    _check_recovery(recovery, where)
    return Recovery(**data)
