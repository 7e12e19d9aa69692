"""Latency cache keyed by (architecture signature, target, input shapes, device)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from autoprune._filelock import file_lock
from autoprune.latency._stats import LatencyStats
from autoprune.latency._target import Target, local_device

__all__ = ["LatencyCache", "CACHE_FORMAT_VERSION"]

CACHE_FORMAT_VERSION = 2  # 2: models exported with symbolic batch and sequence


class LatencyCache:
    """Measured latencies by architecture, in memory and optionally in a JSON file.

    Latency depends on the pruned shapes, not on the weight values, so two plans that prune
    to the same shapes share one measurement. With a ``path``, entries are loaded at start and
    every new entry is merged into the file (atomically, under a file lock), so a resumed
    search, or several worker processes, reuse earlier measurements.

    Example:
        >>> import dataclasses
        >>> from autoprune.latency import load_target, measure_latency
        >>> from autoprune.testing import create_test_model
        >>> cache = LatencyCache()
        >>> fast = dataclasses.replace(load_target("cpu-1t"), min_runs=5, min_seconds=0)
        >>> model = create_test_model("resnet_tiny")
        >>> a = measure_latency(model, model.example_inputs(), fast, cache=cache)
        >>> b = measure_latency(create_test_model("resnet_tiny"), model.example_inputs(), fast,
        ...                     cache=cache)
        >>> b.cached, b.p50_ms == a.p50_ms, cache.hits, cache.misses
        (True, True, 1, 1)
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None  # JSON file, or None (memory)
        self.hits = 0  # lookups answered from the cache
        self.misses = 0  # lookups that needed a measurement
        self._entries: dict[str, dict] = {}
        self._new: dict[str, dict] = {}  # entries put since the last take_new()
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._entries.update(self._read_file())

    @staticmethod
    def key(
        architecture: str,
        target: Target,
        input_shapes: tuple[tuple[int, ...], ...],
        screened: bool = False,
        limit_ms: float | None = None,
    ) -> str:
        """The cache key of a measurement.

        Args:
            architecture: ``signature_digest`` of the (baked) model, or an ONNX graph digest.
            target: the target profile; its :meth:`Target.key` and the device it names (this
                machine's CPU and ONNX Runtime version for local targets, the address for
                remote ones) are part of the key.
            input_shapes: the shapes actually measured.
            screened: a quick screening measurement, kept apart from full-protocol ones.
            limit_ms: the budget a screening measurement decided (it may have stopped early
                against it, so it does not answer for another budget).
        """
        shapes = ";".join("x".join(str(d) for d in s) for s in input_shapes)
        device = f"remote={target.remote}" if target.is_remote else local_device()
        protocol = ""
        if screened:
            protocol = "|screen" + (f"<{limit_ms!r}ms" if limit_ms is not None else "")
        return f"{architecture}|{shapes}|{target.key()}|{device}{protocol}"

    def get(self, *keys: str) -> LatencyStats | None:
        """The stats under the first of ``keys`` present (``cached=True``), counting one hit
        or one miss."""
        with self._lock:
            key = next((k for k in keys if k in self._entries), None)
            if key is None:
                self.misses += 1
                return None
            self.hits += 1
            data = self._entries[key]
        stats = LatencyStats.from_dict(data)
        return replace(stats, cached=True, screened="|screen" in key)

    def put(self, key: str, stats: LatencyStats) -> None:
        """Store a measurement (and merge it into the file, if any)."""
        with self._lock:
            self._entries[key] = self._new[key] = stats.to_dict()
            if self.path is not None:
                self._write_file()

    def entries(self) -> dict[str, dict]:
        """A copy of every entry, as plain data (key -> stats dict), e.g. to send elsewhere."""
        with self._lock:
            return dict(self._entries)

    def take_new(self) -> dict[str, dict]:
        """The entries :meth:`put` since the last call (plain data), forgotten as new.

        A Ray worker measures into a cache in its memory and sends these back with each
        trial; the driver :meth:`merge` s them into the run directory's cache file.
        """
        with self._lock:
            new, self._new = self._new, {}
            return new

    def merge(self, entries: dict[str, dict]) -> None:
        """Add entries made elsewhere (e.g. :meth:`take_new` on a worker), written to the file
        at once; they are not new here."""
        if not entries:
            return
        with self._lock:
            self._entries.update({k: v for k, v in entries.items() if isinstance(v, dict)})
            if self.path is not None:
                self._write_file()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _read_file(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable cache: measure again rather than fail a search
        if not isinstance(data, dict) or data.get("version") != CACHE_FORMAT_VERSION:
            return {}
        entries = data.get("entries", {})
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def _write_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            merged = self._read_file() if self.path.exists() else {}
            merged.update(self._entries)
            self._entries = merged
            payload = json.dumps(
                {"version": CACHE_FORMAT_VERSION, "entries": merged}, indent=1, sort_keys=True
            )
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(payload)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
