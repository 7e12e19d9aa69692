"""Ray start-up on the driver: connect to a cluster, or start a local Ray bound to loopback."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from autoprune.errors import UsageError
from autoprune.search._base import SearchContext
from autoprune.search._ray._shipping import check_joined, runtime_env

INSTALL_HINT = "pip install 'autoprune[ray]'"


def _import_ray():
    try:
        import ray
        from ray import tune  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--backend ray needs Ray Tune, which is not installed ({e}); "
                         f"install it with: {INSTALL_HINT}  (or use --backend optuna)") from None
    return ray


def _check_ray() -> None:
    """The install hint if Ray is missing, found without importing it (a local Ray is set up
    through environment variables that Ray reads when it is first imported)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["ray"] is None
        found = False
    if not found:
        raise UsageError(f"--backend ray needs Ray Tune, which is not installed; install it "
                         f"with: {INSTALL_HINT}  (or use --backend optuna)")


@contextlib.contextmanager
def _connected(ctx: SearchContext) -> Iterator[Any]:
    """Connect to ``address``, or start a local Ray bound to loopback and shut it down after.

    The job's ``runtime_env`` ships a file task to the nodes (see ``_shipping.py``). A Ray
    already initialized in this process is used as it is (and left running).
    """
    opts = ctx.backend_options
    address = opts.get("address")
    workers = max(1, int(ctx.workers or 1))
    cpus = float(opts.get("cpus_per_trial") or 1.0)
    gpus = float(opts.get("gpus_per_trial") or 0.0)
    if cpus <= 0 or gpus < 0:
        raise UsageError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got "
                         f"{cpus:g} and {gpus:g}")
    # A local Ray: node IP = loopback, so every Ray server binds 127.0.0.1 (Ray reads this
    # variable on import; the constant is patched below in case Ray was imported earlier);
    # no usage reporting. Restored when the search ends.
    local_env = {} if address else {k: v for k, v in (
        ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"))
        if k not in os.environ}
    with _env(**local_env):
        ray = _import_ray()
        from ray._private import ray_constants

        cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
        started = False
        try:
            if not ray.is_initialized():
                common = dict(include_dashboard=False, log_to_driver=False,
                              logging_level=logging.ERROR, namespace="autoprune",
                              runtime_env=runtime_env(ctx))
                if address:
                    try:
                        ray.init(address=address, **common)
                    except ray.exceptions.RuntimeEnvSetupError as e:  # the task's directory
                        raise UsageError(
                            f"cannot ship the task's directory to the Ray cluster ({e}); Ray "
                            f"uploads at most 512 MiB by default: move the task file to a "
                            f"directory of its own, or list large files in a .rayignore there"
                            ) from None
                    except (ConnectionError, RuntimeError, ValueError) as e:
                        first = (str(e).splitlines() or [""])[0][:200]
                        raise UsageError(
                            f"cannot connect to the Ray cluster at {address!r} ({first}); "
                            f"check the address ('ray status' on the head node; 'auto' finds "
                            f"a cluster started on this machine) and, if the cluster uses "
                            f"token authentication, set RAY_AUTH_MODE=token") from None
                else:
                    ray_constants.ENABLE_RAY_CLUSTER = False
                    ray.init(num_cpus=math.ceil(workers * cpus), **common)  # GPUs: detected
                started = True
            else:
                check_joined(ray, ctx)
            total = ray.cluster_resources()
            if total.get("CPU", 0) < cpus or total.get("GPU", 0) < gpus:
                raise UsageError(
                    f"each trial asks for {cpus:g} CPU(s) and {gpus:g} GPU(s), but the Ray "
                    f"cluster has {total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} "
                    f"GPU(s); lower --cpus-per-trial / --gpus-per-trial or add nodes")
            yield ray
        finally:
            if started:
                ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _log_level(name: str, level: int) -> Iterator[None]:
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(saved)
