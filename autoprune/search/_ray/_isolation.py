"""Latency isolation between the trials of one node (on the workers)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoprune.errors import UsageError
from autoprune.search._base import SearchContext

ISOLATION = ("node", "measurements")  # latency isolation modes (backend option "isolation")


def _isolation_mode(ctx: SearchContext) -> str:
    mode = ctx.backend_options.get("isolation") or ISOLATION[0]
    if mode not in ISOLATION:
        raise UsageError(f"isolation must be one of {', '.join(ISOLATION)}, got {mode!r}")
    return mode


class NodeIsolation:
    """Gives a trial's latency measurement the node to itself (``isolation="node"``).

    ``run_trial`` times models holding the node's lock file exclusively
    (``TrialSettings.measure_lock``). This object makes the other trials on the node step
    aside for it, through the task's own hooks:

    * while a trial prunes and measures, it marks itself *pending* (a shared lock on
      ``LOCK.pending``) until its fine-tuning or evaluation starts;
    * fine-tuning and evaluation hold the measurement lock *shared*, so a measurement waits
      until they leave it, and they cannot start while a measurement runs;
    * at every fine-tuning step (the task's ``loss_fn``), a trial that sees a pending
      neighbour lets go of the lock and waits until no trial is pending, so a measurement waits
      for at most one step of each neighbour, and never starves.

    Pruning itself is not covered (it is short); a task's own ``finetune_fn`` is covered as a
    whole, without the per-step hand-over unless it calls ``task.loss_fn``.

    Example:
        >>> node = NodeIsolation("/tmp/autoprune-measure.lock")  # doctest: +SKIP
        >>> task = node.wrap(task)  # doctest: +SKIP
        >>> with node.trial():  # doctest: +SKIP
        ...     result = run_trial(task, plan, settings)  # measure_lock: the same path
    """

    def __init__(self, lock: str):
        self.lock = lock  # the node's measurement lock file (TrialSettings.measure_lock)
        self._pending_path = lock + ".pending"
        self._depth = 0  # nesting of compute() (evaluation inside fine-tuning)
        self._shared: Any = None  # open lock file while compute() holds it shared
        self._pending: Any = None  # open pending file while this trial is pending
        self._probe: Any = None  # the pending file, opened once, to see if others are pending

    @staticmethod
    def _open(path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a")

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """Around one ``run_trial``: pending from here until its fine-tuning/evaluation."""
        self._pending = self._open(self._pending_path)
        fcntl.flock(self._pending, fcntl.LOCK_SH)
        try:
            yield
        finally:
            self._measured()

    def _measured(self) -> None:
        if self._pending is not None:
            fcntl.flock(self._pending, fcntl.LOCK_UN)
            self._pending.close()
            self._pending = None

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Hold the measurement lock shared (re-entrant); ends this trial's pending phase."""
        self._measured()
        if self._depth == 0:
            self._shared = self._open(self.lock)
            fcntl.flock(self._shared, fcntl.LOCK_SH)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._shared, fcntl.LOCK_UN)
                self._shared.close()
                self._shared = None

    def step(self) -> None:
        """During fine-tuning: step aside while a neighbour waits to prune and measure."""
        if self._depth == 0:
            return
        if self._probe is None:
            self._probe = self._open(self._pending_path)
        try:
            fcntl.flock(self._probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a neighbour is pending: let its measurement in, wait
            fcntl.flock(self._shared, fcntl.LOCK_UN)
            fcntl.flock(self._probe, fcntl.LOCK_EX)
            fcntl.flock(self._probe, fcntl.LOCK_UN)
            fcntl.flock(self._shared, fcntl.LOCK_SH)
        else:
            fcntl.flock(self._probe, fcntl.LOCK_UN)

    def wrap(self, task: Any) -> Any:
        """A copy of ``task`` whose fine-tuning, evaluation and loss go through this object."""
        from autoprune.finetune import finetune_

        user_finetune, user_evaluate, user_loss = task.finetune_fn, task.evaluate_fn, task.loss_fn

        def finetune_fn(model, task_, settings, *, teacher=None, on_eval=None,
                        hidden_distill=0.0):
            with self.compute():
                plain = dataclasses.replace(task_, finetune_fn=user_finetune)
                return finetune_(model, plain, settings, teacher=teacher, on_eval=on_eval,
                                 hidden_distill=hidden_distill)

        finetune_fn.takes_recovery = True  # finetune_ passes the teacher cache and recovery

        def evaluate_fn(model):
            with self.compute():
                if user_evaluate is not None:
                    return user_evaluate(model)
                return task.metric.fn(model, task.val_data)

        def loss_fn(outputs, targets):
            self.step()
            return user_loss(outputs, targets)

        return dataclasses.replace(task, finetune_fn=finetune_fn, evaluate_fn=evaluate_fn,
                                   loss_fn=loss_fn)
