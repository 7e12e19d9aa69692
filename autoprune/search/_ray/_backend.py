"""The Ray backend on the driver: starts the search, runs ``Tuner.fit``, returns the results."""

from __future__ import annotations

import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

from autoprune.errors import UsageError
from autoprune.run.layout import RAY_DIR
from autoprune.search._base import Backend, EarlyStopper, SearchContext, register_backend
from autoprune.search._ray._cluster import _check_ray, _connected, _env, _log_level
from autoprune.search._ray._isolation import _isolation_mode
from autoprune.search._ray._journal import _Journal, _restorable
from autoprune.search._ray._searcher import _make_searcher
from autoprune.search._ray._session import _activate, _active, _callback_class, _Session
from autoprune.search._ray._trainable import (
    CONFIG_KEY,
    RESULT_KEY,
    _confirm_on_worker,
    _job,
    _measure_on_worker,
    _trainable,
    _trial_dirname,
)
from autoprune.trial import TrialResult

DEFAULT_MAX_FAILURES = 2  # retries of a trial whose worker died


@register_backend("ray")
class RayBackend(Backend):
    """Ray Tune with ``OptunaSearch``: ``--workers`` concurrent trials on a local Ray or a
    cluster (``--address``), each with ``--cpus-per-trial`` / ``--gpus-per-trial``.

    ``backend_options``: ``address``, ``cpus_per_trial``, ``gpus_per_trial`` (from the CLI);
    ``max_failures`` (retries of a trial whose worker died, default 2); ``isolation``
    (``"node"``, default, or ``"measurements"``); ``measure_lock`` (lock file path; default:
    ``autoprune-measure.lock`` in each node's temp directory).

    Example:
        >>> autoprune.search("digits", trials=40, backend="ray", workers=2,
        ...                  output="runs/ray")  # doctest: +SKIP
    """

    name = "ray"

    def check(self) -> None:
        _check_ray()

    def run(self, ctx: SearchContext) -> list[TrialResult]:
        _check_ray()  # the install hint before anything starts
        _isolation_mode(ctx)
        if _active() is not None:
            raise UsageError("a Ray search is already running in this process")
        ray_dir = (ctx.run_dir / RAY_DIR).resolve()
        if not ctx.resume and ray_dir.exists() and any(ray_dir.iterdir()):
            raise UsageError(f"{ray_dir} already holds a Ray experiment: pass --resume")
        journal = _Journal(ray_dir / "journal.jsonl")
        with _connected(ctx) as ray:
            steps = (ctx.settings.finetune or ctx.task.finetune).steps
            stopper = f"autoprune-stopper-{uuid.uuid4().hex[:12]}"
            actor = ray.remote(num_cpus=0)(EarlyStopper).options(name=stopper).remote(
                ctx.task.metric.direction, min_step=max(1, steps // 3))
            try:
                with _activate(_Session(ctx, journal, actor)) as session:
                    grid = []  # resumed with no more trials than finished: nothing to run
                    if len(session.results) < session.trials:
                        grid = self._fit(ctx, ray_dir, stopper, session)
                        self._collect(grid, session)
            finally:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        unfinished = [r for r in grid if (r.config or {}).get(CONFIG_KEY, {}).get("number")
                      not in session.results]
        if unfinished or len(session.results) < session.trials:
            # Tune stops on Ctrl-C (SIGINT) and returns; its state is saved for --resume.
            raise KeyboardInterrupt
        return [session.results[n] for n in sorted(session.results)]

    def measure(self, ctx: SearchContext, plans: list, screen: bool = False
                ) -> list[dict[str, float]]:
        """On a cluster (``--address``), the dense model and the cost profile are measured by
        a Ray task on a node that can run trials, as the trials are (see :meth:`confirm`)."""
        if not ctx.backend_options.get("address"):
            return super().measure(ctx, plans, screen)
        return _on_a_trial_node(ctx, _measure_on_worker, [p.to_dict() for p in plans], screen)

    def confirm(self, ctx: SearchContext, results: list[TrialResult]) -> None:
        """On a cluster (``--address``), the fronts are re-measured by a Ray task that asks
        for the same resources as a trial, so it runs on a node that can run trials (Ray
        picks which one), not necessarily on the driver's machine."""
        from autoprune.search._confirm import screened

        if not ctx.backend_options.get("address"):
            super().confirm(ctx, results)  # a local Ray measured on this machine
            return
        if not screened(results, ctx.config):
            return
        try:
            metrics = _on_a_trial_node(ctx, _confirm_on_worker, [r.to_dict() for r in results],
                                       ctx.config)
        except Exception as e:  # every trial is done: keep their screening latencies, marked
            print(f"re-measuring the front on the cluster failed ({type(e).__name__}: "
                  f"{str(e)[:200]}); its plans keep their screening latencies", flush=True)
            return
        for r in results:
            r.metrics = metrics[r.number]

    def _fit(self, ctx: SearchContext, ray_dir: Path, stopper: str, session: _Session) -> Any:
        import optuna
        import ray
        from ray import tune

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opts = ctx.backend_options
        cpus = float(opts.get("cpus_per_trial") or 1.0)
        gpus = float(opts.get("gpus_per_trial") or 0.0)
        job = _job(ray, ctx, stopper,
                   finished={n: {"params": r["params"], "payload": r["payload"]}
                             for n, r in session.finished.items()})
        trainable = tune.with_resources(tune.with_parameters(_trainable, job=job),
                                        {"cpu": cpus, "gpu": gpus})
        exp_dir = ray_dir / session.experiment
        if ctx.resume and _restorable(exp_dir):
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable,
                                       resume_unfinished=True, resume_errored=False)
        else:
            if exp_dir.exists():  # a driver killed before Ray's first snapshot: start over
                import shutil

                shutil.rmtree(exp_dir)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=_make_searcher(ctx, len(session.finished)),
                    num_samples=session.trials,
                    max_concurrent_trials=max(1, int(ctx.workers or 1)), reuse_actors=True,
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=session.experiment, storage_path=str(ray_dir), verbose=0,
                    callbacks=[_callback_class()()],
                    failure_config=tune.FailureConfig(
                        max_failures=int(opts.get("max_failures", DEFAULT_MAX_FAILURES)))))
        # The classic reporter honours verbose=0; trial errors are reported by the callback.
        with _env(RAY_AIR_NEW_OUTPUT="0"), _log_level("ray.tune", logging.CRITICAL):
            return tuner.fit()

    @staticmethod
    def _collect(grid, session: _Session) -> None:
        """Trials Ray knows as finished that the callbacks did not see (belt and braces)."""
        for res in grid:
            meta = (res.config or {}).get(CONFIG_KEY)
            if not meta or meta["number"] in session.results:
                continue
            if RESULT_KEY in (res.metrics or {}):
                session._finish(meta, res.metrics, res.metrics.get("curve", []))


def _on_a_trial_node(ctx: SearchContext, fn: Any, *args: Any) -> Any:
    """``fn(job, *args)`` as a Ray task that asks for a trial's resources, so it runs on a node
    that can run trials (Ray picks which one); the latency cache entries it returns with its
    value are merged into the driver's cache."""
    cpus = float(ctx.backend_options.get("cpus_per_trial") or 1.0)
    gpus = float(ctx.backend_options.get("gpus_per_trial") or 0.0)
    with _connected(ctx) as ray:
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(fn)
        value, latency = ray.get(remote.remote(_job(ray, ctx, None, {}), *args))
    if ctx.settings.latency_cache is not None:
        ctx.settings.latency_cache.merge(latency)
    return value
