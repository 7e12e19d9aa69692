"""Checksum-verified cache of the built-in tasks' trained weights.

Weights are saved with ``torch.save(state_dict)`` next to a ``sha256sum``-style checksum file,
and loaded with ``torch.load(..., weights_only=True)`` only after the checksum matches (never an
unsafe unpickle). Missing, corrupt or incompatible files are rebuilt by training again. The
cache directory is ``$AUTOPRUNE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/autoprune``, else
``~/.cache/autoprune``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune._filelock import file_lock

__all__ = ["cache_dir", "load_or_train", "weights_path"]

logger = logging.getLogger("autoprune")

CACHE_ENV = "AUTOPRUNE_CACHE_DIR"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The directory holding cached weights (not created here)."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "autoprune"


def weights_path(
    name: str, config: dict[str, Any], directory: str | os.PathLike | None = None
) -> Path:
    """Where the weights of task ``name`` trained with ``config`` are cached."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir(directory) / "weights" / f"{name}-{digest}.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _try_load(path: Path, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The verified state dict at ``path``, or None (with a warning) if unusable."""
    sums = path.with_name(path.name + ".sha256")
    if not path.exists():
        return None
    if not sums.exists():
        logger.warning("cached weights %s have no checksum file; retraining", path)
        return None
    expected = sums.read_text().split()[0] if sums.read_text().strip() else ""
    actual = _sha256(path)
    if actual != expected:
        logger.warning("cached weights %s fail their sha256 checksum; retraining", path)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or mismatching file is rebuilt
        logger.warning("cached weights %s cannot be loaded (%s); retraining", path, e)
        return None
    return state


def load_or_train(
    name: str,
    config: dict[str, Any],
    build: Callable[[], nn.Module],
    train_: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int = 0,
    directory: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """The trained state dict of task ``name``: from the cache, or trained and cached now.

    Args:
        name: task name, the first part of the file name.
        config: everything the trained weights depend on (JSON-serializable); part of the key.
        build: returns a freshly initialized model.
        train_: trains that model in place, returns facts to record (e.g. validation accuracy).
        seed: seeds the initialization and training (the global RNG state is restored after).
        directory: cache directory; see :func:`cache_dir`.
    """
    path = weights_path(name, config, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        state = _try_load(path, build())
        if state is not None:
            return state
        logger.info("training the %s task model (cached afterwards in %s)", name, path)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
            info = train_(model) or {}
        seconds = time.perf_counter() - start
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _atomic_write(path, lambda tmp: torch.save(state, tmp))
        _atomic_write(
            path.with_name(path.name + ".sha256"),
            lambda tmp: tmp.write_text(f"{_sha256(path)}  {path.name}\n"),
        )
        meta = {"task": name, "config": config, "train_seconds": round(seconds, 2), **info}
        _atomic_write(
            path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2))
        )
        logger.info("trained the %s task model in %.1f s: %s", name, seconds, info)
        return state


def trained_model_factory(
    name: str,
    config: dict[str, Any],
    build: Callable[[], nn.Module],
    train_: Callable[[nn.Module], Any],
    *,
    seed: int = 0,
    directory: str | os.PathLike | None = None,
) -> Callable[[], nn.Module]:
    """A task's ``build_model``: fresh copies of the trained model, in eval mode.

    The weights are loaded (or trained) by :func:`load_or_train` on first use, then kept in
    memory for every later copy.
    """
    state: dict[str, torch.Tensor] = {}
    lock = threading.Lock()

    def build_model() -> nn.Module:
        with lock:
            if not state:
                state.update(load_or_train(name, config, build, train_, seed=seed,
                                           directory=directory))
        model = build()
        model.load_state_dict(state)
        return model.eval()

    return build_model
