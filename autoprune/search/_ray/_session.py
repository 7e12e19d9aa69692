"""Result collection on the driver: the live search, fed by Tune's trial events.

Tune pickles its searcher and callbacks (tuner.pkl, state snapshots), so those keep no live
objects: they reach the running search through :func:`_active`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoprune.metrics import TrialStatus
from autoprune.search._base import SearchContext
from autoprune.search._ray._journal import EXPERIMENT, _Journal
from autoprune.search._ray._trainable import (
    CONFIG_KEY,
    LATENCY_KEY,
    RESULT_KEY,
    _parse,
    _payload,
)
from autoprune.trial import TrialResult


class _Session:
    """The live search in the driver: finished trials, progress, the journal, and the
    completed fine-tuning curves the early stopper learns from."""

    def __init__(self, ctx: SearchContext, journal: _Journal, stopper: Any):
        self.ctx = ctx
        self.journal = journal
        self.stopper = stopper  # EarlyStopper actor handle, or None
        self.results: dict[int, TrialResult] = {}  # finished trials by number
        self.order: list[TrialResult] = []  # the same, in the order they finished
        # fit baselines to try once more (SearchContext.steer_again): {params, baseline}, for
        # the searcher to enqueue before its next suggestion
        self.again: list[dict[str, Any]] = []
        self.trials = ctx.trials
        start, suggested, finished = journal.state()
        self.suggested: dict[int, dict[str, Any]] = suggested  # number -> {params, baseline}
        self.finished: dict[int, dict[str, Any]] = finished  # number -> {params, payload, curve}
        self.experiment = start["experiment"] if start else EXPERIMENT  # RUN/ray/<experiment>
        if start is None or start["trials"] != ctx.trials:
            if start is not None:  # another trial count: a new experiment replays the journal
                self.experiment = _new_experiment(journal.path.parent)
            journal.append({"event": "start", "trials": ctx.trials,
                            "experiment": self.experiment})
        for _, rec in sorted(self.finished.items()):
            self._add(_parse(rec["payload"]), rec.get("curve", []), show=False)

    def on_suggest(self, number: int, params: dict[str, Any], baseline: str | None) -> None:
        if number not in self.suggested:
            self.suggested[number] = {"params": params, "baseline": baseline}
            self.journal.append({"event": "suggest", "number": number, "params": params,
                                 "baseline": baseline})

    def on_complete(self, trial) -> None:
        payload = trial.last_result or {}
        meta = trial.config[CONFIG_KEY]
        if RESULT_KEY not in payload:
            self.on_error(trial, "the trial ended without reporting a result")
            return
        self._finish(meta, payload, payload.get("curve", []))

    def on_error(self, trial, reason: str | None = None) -> None:
        meta = trial.config[CONFIG_KEY]
        if reason is None:
            reason = (f"Ray worker failed {trial.num_failures} time(s), retries exhausted: "
                      f"{_error_line(trial)}")
        result = TrialResult(self._plan(meta.get("steered", meta["params"])), TrialStatus.FAILED,
                             reason=reason,
                             number=meta["number"], params=meta["params"],
                             baseline=meta.get("baseline"))
        self._finish(meta, _payload(result, [], self.ctx.objectives), [])

    def on_retry(self, trial) -> None:
        if self.ctx.progress:
            meta = trial.config[CONFIG_KEY]
            print(f"trial {meta['number']}: Ray worker lost ({_error_line(trial)}); retrying",
                  file=sys.stderr, flush=True)

    def _finish(self, meta: dict[str, Any], payload: dict[str, Any], curve: list) -> None:
        number = meta["number"]
        if number in self.results:  # a journaled trial replayed after a resume
            return
        rec = {"event": "finish", "number": number, "params": meta["params"],
               "payload": payload, "curve": curve}
        self.journal.append(rec)
        self.finished[number] = rec
        if self.ctx.settings.latency_cache is not None:  # the driver writes the cache file
            self.ctx.settings.latency_cache.merge(json.loads(payload.get(LATENCY_KEY) or "{}"))
        self._add(_parse(payload), curve, show=True)

    def _add(self, result: TrialResult, curve: list, show: bool) -> None:
        self.results[result.number] = result
        self.order.append(result)
        self.ctx.record(result)
        if show and self.ctx.steer_again(result, self.order):  # (a replay's are in the journal)
            self.again.append({"params": result.params, "baseline": result.baseline})
        if result.status == TrialStatus.COMPLETE and curve and self.stopper is not None:
            self.stopper.record.remote([tuple(c) for c in curve])
        if show and self.ctx.progress:
            self.ctx.progress(result, list(self.order))

    def _plan(self, params: dict[str, Any]):
        try:
            return self.ctx.plan_for(params)
        except Exception:  # the parameters do not build: record the failure on a dense plan
            from autoprune.plan import PruningPlan

            return PruningPlan.uniform(0.0)


def _new_experiment(ray_dir: Path) -> str:
    """``tune-N``, N from 2 up: the first name no experiment directory has."""
    n = 2
    while (ray_dir / f"{EXPERIMENT}-{n}").exists():
        n += 1
    return f"{EXPERIMENT}-{n}"


_ACTIVE: _Session | None = None  # the search running in this process (one at a time)


def _active() -> _Session | None:
    """The search running in this process, if any."""
    return _ACTIVE


@contextlib.contextmanager
def _activate(session: _Session) -> Iterator[_Session]:
    """Make ``session`` the running search for the duration of the block."""
    global _ACTIVE

    _ACTIVE = session
    try:
        yield session
    finally:
        _ACTIVE = None


def _error_line(trial) -> str:
    with contextlib.suppress(Exception):
        path = trial.error_file
        if path and Path(path).is_file():
            lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
            if lines:  # Ray's last line, without its list of common causes
                return lines[-1].split(" Some common causes")[0][:300]
    return "unknown error"


@functools.cache
def _callback_class() -> type:
    """``_DriverCallback``, defined on first use (Ray is imported lazily). Tune pickles it
    (tuner.pkl); it is reachable as ``autoprune.search._ray._session._DriverCallback`` (module
    ``__getattr__``), so pickle stores a reference, not a copy."""
    from ray.tune import Callback

    class _DriverCallback(Callback):
        """Forwards trial events to the live search (stateless: Tune pickles it)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.on_complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.on_error(trial)

        def on_trial_recover(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.on_retry(trial)

    _DriverCallback.__qualname__ = "_DriverCallback"
    return _DriverCallback


def __getattr__(name: str) -> Any:
    if name == "_DriverCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
