"""Deployment target profiles: where and how latency is measured, as plain data."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from autoprune.errors import TargetError

__all__ = [
    "Target",
    "BUILTIN_TARGETS",
    "TOKEN_ENV_VAR",
    "TARGET_FORMAT_VERSION",
    "load_target",
    "list_targets",
    "resolve_token",
]

TARGET_FORMAT_VERSION = 1
TOKEN_ENV_VAR = "AUTOPRUNE_LATENCY_TOKEN"
REMOTE_SCHEME = "remote://"

_OPT_LEVELS = ("disable", "basic", "extended", "all")
_STATISTICS = ("p50", "p90")


@dataclass(frozen=True)
class Target:
    """A deployment target: execution providers, threads, batch and the measurement protocol.

    Built-ins are ``cpu-1t`` (one intra-op thread, the default) and ``cpu`` (all cores). A
    profile file (YAML or JSON) holds the same fields; ``base: cpu`` starts from a built-in.

    Example:
        >>> target = load_target("cpu-1t")
        >>> target.intra_op_threads, target.statistic
        (1, 'p50')
        >>> dataclasses.replace(target, batch_size=8).key()
        'CPUExecutionProvider|intra=1|inter=1|opt=all|batch=8|shapes=example|pin=0|local'
    """

    name: str = "cpu-1t"  # label shown in reports (not part of the cache key)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ORT execution providers, in order
    intra_op_threads: int = 1  # threads inside one op; 0 = ORT default (one per core)
    inter_op_threads: int = 1  # threads across independent ops (sequential execution: 1)
    graph_optimization_level: str = "all"  # ORT graph optimizations: disable|basic|extended|all
    batch_size: int | None = 1  # replaces dim 0 of every example input; None keeps it
    input_shapes: tuple[tuple[int, ...], ...] | None = None  # exact input shapes, if given
    pin_threads: bool = False  # pin the measuring thread(s) to fixed cores while timing
    warmup_runs: int = 20  # untimed runs before timing (caches, allocator, CPU frequency)
    warmup_seconds: float = 0.25  # ... and at least this long
    min_runs: int = 30  # timed runs before the stopping rule is checked
    min_seconds: float = 1.0  # ... and timing lasts at least this long (outlasts load bursts)
    max_runs: int = 10000  # cap on timed runs
    max_seconds: float = 10.0  # cap on timing wall time (at least min_runs are still done)
    target_ci: float = 0.01  # stop when the 95 % CI half-width of the median / median < this
    statistic: str = "p50"  # the statistic latency budgets compare against: p50 | p90
    remote: str | None = None  # "host:port" of an `autoprune serve-latency` server, or None
    token_file: str | None = field(default=None, compare=False, repr=False)  # remote token

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.providers, str):
            fix("providers", (self.providers,))
        fix("providers", tuple(self.providers))
        if self.input_shapes is not None:
            try:
                fix("input_shapes", tuple(tuple(int(d) for d in s) for s in self.input_shapes))
            except (TypeError, ValueError):
                raise TargetError(
                    f"target {self.name!r}: input_shapes must be a list of shapes such as "
                    f"[[1, 3, 224, 224]], got {self.input_shapes!r}"
                ) from None
        self._validate()

    def _validate(self) -> None:
        def bad(message: str) -> TargetError:
            return TargetError(f"target {self.name!r}: {message}")

        if not self.providers or not all(isinstance(p, str) and p for p in self.providers):
            raise bad(f"providers must be a non-empty list of names, got {self.providers!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"{name} must be an integer >= 0 (0 = ORT default), got {value!r}")
        if self.graph_optimization_level not in _OPT_LEVELS:
            raise bad(
                f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, "
                f"got {self.graph_optimization_level!r}"
            )
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise bad(f"batch_size must be a positive integer or null, got {self.batch_size!r}")
        if self.input_shapes is not None and any(
            not s or any(d < 1 for d in s) for s in self.input_shapes
        ):
            raise bad(f"input_shapes must hold positive dimensions, got {self.input_shapes!r}")
        for name in ("warmup_runs", "min_runs", "max_runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"{name} must be an integer >= 0, got {value!r}")
        if self.min_runs < 1 or self.max_runs < self.min_runs:
            raise bad(
                f"need 1 <= min_runs <= max_runs, got min_runs={self.min_runs}, "
                f"max_runs={self.max_runs}"
            )
        for name in ("warmup_seconds", "min_seconds", "max_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise bad(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not isinstance(self.target_ci, (int, float)) or not 0 < self.target_ci < 1:
            raise bad(f"target_ci must be in (0, 1), e.g. 0.02 for 2 %, got {self.target_ci!r}")
        if self.statistic not in _STATISTICS:
            raise bad(f"statistic must be one of {', '.join(_STATISTICS)}, got {self.statistic!r}")
        if self.remote is not None:
            _parse_address(self.remote)

    def key(self) -> str:
        """A stable string naming what the measured latency depends on (for cache keys).

        It covers the device (local, or the remote address) and the runtime settings, not the
        profile's name nor how many runs are taken.
        """
        shapes = (
            "example"
            if self.input_shapes is None
            else ";".join("x".join(str(d) for d in s) for s in self.input_shapes)
        )
        return "|".join(
            [
                ",".join(self.providers),
                f"intra={self.intra_op_threads}",
                f"inter={self.inter_op_threads}",
                f"opt={self.graph_optimization_level}",
                f"batch={self.batch_size if self.batch_size is not None else 'example'}",
                f"shapes={shapes}",
                f"pin={int(self.pin_threads)}",
                f"remote={self.remote}" if self.remote else "local",
            ]
        )

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def screening(self) -> Target:
        """The quick protocol a search screens plans with; never slower than this one.

        Warm-up: 10 runs and 20 ms (instead of 20 runs and 0.25 s); then at least 20 timed
        runs over at least 50 ms, stopping at a 3 % CI of the median (about 0.08 s for a
        sub-millisecond model, against 1.26 s for the full ``cpu-1t`` protocol). A search
        re-measures its front with the full protocol; ``benchmarks/latency_fidelity.py``
        prints how close the two are.
        """
        return dataclasses.replace(
            self,
            warmup_runs=min(self.warmup_runs, 10),
            warmup_seconds=min(self.warmup_seconds, 0.02),
            min_runs=min(self.min_runs, 20),
            min_seconds=min(self.min_seconds, 0.05),
            max_seconds=min(self.max_seconds, 2.0),
            target_ci=max(self.target_ci, 0.03),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-ready), including ``version``; the token file is left out."""
        data: dict[str, Any] = {"version": TARGET_FORMAT_VERSION}
        for f in dataclasses.fields(self):
            if f.name == "token_file":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            data[f.name] = value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "target") -> Target:
        """Build a target from plain data; unknown fields raise :class:`TargetError`.

        ``base`` (a built-in name) supplies the fields the data leaves out.
        """
        if not isinstance(data, dict):
            raise TargetError(f"{source}: a target profile must be a mapping, got {data!r}")
        data = dict(data)
        version = data.pop("version", TARGET_FORMAT_VERSION)
        if version != TARGET_FORMAT_VERSION:
            raise TargetError(
                f"{source}: target format version {version!r} is not supported "
                f"(this autoprune reads version {TARGET_FORMAT_VERSION})"
            )
        base_name = data.pop("base", None)
        base = _builtin(base_name, source) if base_name is not None else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TargetError(
                f"{source}: unknown target field(s) {', '.join(map(repr, unknown))}; "
                f"known fields: {', '.join(sorted(known - {'token_file'}))}, base, version"
            )
        if "name" not in data:
            data["name"] = Path(source).stem if source != "target" else base.name
        return dataclasses.replace(base, **data)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


BUILTIN_TARGETS: dict[str, Target] = {
    # One intra-op thread: the most repeatable setting, and what a single-core edge device or
    # one replica per core looks like.
    "cpu-1t": Target(name="cpu-1t"),
    # All cores of this machine (ORT default thread count).
    "cpu": Target(name="cpu", intra_op_threads=0),
}


def list_targets() -> list[str]:
    """Names of the built-in targets."""
    return sorted(BUILTIN_TARGETS)


def _builtin(name: str, source: str = "target") -> Target:
    if name not in BUILTIN_TARGETS:
        raise TargetError(
            f"{source}: unknown built-in target {name!r}; built-ins: {', '.join(list_targets())}"
        )
    return BUILTIN_TARGETS[name]


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(
            f"bad remote address {address!r}: expected host:port, e.g. 192.168.1.20:8765"
        )
    return host, int(port)


def load_target(spec: str | Path | Target, *, token_file: str | Path | None = None) -> Target:
    """Resolve a target spec: a built-in name, a YAML/JSON profile, or ``remote://host:port``.

    ``remote://host:port`` measures on an ``autoprune serve-latency`` server with the settings
    of ``cpu-1t``; ``remote://host:port/NAME`` uses built-in ``NAME``'s settings instead. The
    token is read at measurement time from ``token_file`` or the ``AUTOPRUNE_LATENCY_TOKEN``
    environment variable.

    Raises:
        TargetError: unknown name, missing or malformed file, unknown fields, bad values.
    """
    if isinstance(spec, Target):
        target = spec
    else:
        text = str(spec).strip()
        if text.startswith(REMOTE_SCHEME):
            address, _, profile = text[len(REMOTE_SCHEME) :].partition("/")
            _parse_address(address)
            base = _builtin(profile or "cpu-1t", text)
            target = dataclasses.replace(base, name=text, remote=address)
        elif text in BUILTIN_TARGETS:
            target = BUILTIN_TARGETS[text]
        elif Path(text).suffix.lower() in (".yaml", ".yml", ".json"):
            target = _load_file(Path(text))
        else:
            raise TargetError(
                f"unknown target {text!r}: use a built-in ({', '.join(list_targets())}), a "
                "profile file (.yaml/.yml/.json), or remote://host:port"
            )
    if token_file is not None:
        target = dataclasses.replace(target, token_file=str(token_file))
    return target


def _load_file(path: Path) -> Target:
    if not path.is_file():
        raise TargetError(f"target profile {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (ValueError, ImportError) as exc:
        raise TargetError(f"target profile {str(path)!r} is not valid: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise TargetError(f"target profile {str(path)!r} is not valid YAML: {exc}") from None
    try:
        return Target.from_dict(data, source=str(path))
    except TypeError as exc:
        raise TargetError(f"target profile {str(path)!r}: {exc}") from None


def resolve_token(token_file: str | Path | None = None) -> str:
    """The remote-measurement token: from ``token_file``, else ``$AUTOPRUNE_LATENCY_TOKEN``."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise TargetError(f"token file {str(path)!r} does not exist")
        token = path.read_text().strip()
        if not token:
            raise TargetError(f"token file {str(path)!r} is empty")
        return token
    token = os.environ.get(TOKEN_ENV_VAR, "").strip()
    if not token:
        raise TargetError(
            f"remote latency measurement needs a token: pass --token-file FILE or set "
            f"{TOKEN_ENV_VAR}"
        )
    return token


@lru_cache(maxsize=1)
def local_device() -> str:
    """This machine as a latency cache sees it: CPU model, usable cores, ORT version."""
    from importlib.metadata import PackageNotFoundError, version

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        ort_version = version("onnxruntime")
    except PackageNotFoundError:  # pragma: no cover
        ort_version = "?"
    return f"local={model}/{cores}cpu/ort{ort_version}"
