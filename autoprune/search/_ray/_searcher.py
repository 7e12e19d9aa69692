"""Sampling on the driver: ``OptunaSearch`` over the space's define-by-run ``sample``.

``_Sample`` is what ``OptunaSearch`` calls for every new trial: the space's own ``sample``
(the same function the Optuna backend calls), plus the trial number and baseline name.
``_Searcher`` is told every finished trial the way the Optuna backend tells its study.
"""

from __future__ import annotations

import functools
from typing import Any

from autoprune.metrics import Direction
from autoprune.search._base import SearchContext
from autoprune.search._optuna import make_sampler, tell_result
from autoprune.search._ray._session import _active
from autoprune.search._ray._trainable import CONFIG_KEY, RESULT_KEY, _parse, _payload


class _Sample:
    """The define-by-run space for ``OptunaSearch``: the space's own ``sample`` function, plus
    the Optuna trial number and baseline name so results keep the Optuna backend's numbering."""

    def __init__(self, space: Any):
        self.space = space  # BoundSpace

    def __call__(self, trial) -> dict[str, Any]:
        params = self.space.sample(trial)
        baseline = trial.user_attrs.get("baseline")
        session = _active()
        meta = {"number": trial.number, "baseline": baseline, "params": params}
        if session is not None:
            session.on_suggest(trial.number, params, baseline)
            meta["steered"], meta["predicted"] = session.ctx.steer(params, baseline)
            earlier = session.ctx.reuse(session.ctx.plan_for(meta["steered"]))
            if earlier is not None:  # a plan tried already: its result, without a new run
                earlier.number, earlier.params, earlier.baseline = trial.number, params, baseline
                earlier.metrics.update(meta["predicted"])
                meta["reused"] = _payload(earlier, [], session.ctx.objectives)
        return {CONFIG_KEY: meta}


def _make_searcher(ctx: SearchContext, done: int = 0):
    """The searcher of a new Tune experiment; ``done`` trials already finished (a resumed
    search goes on with a fresh seed, as the Optuna backend's does)."""
    return _searcher_class()(
        ctx.baselines(), list(ctx.settings.budgets), ctx.settings.primary,
        list(ctx.objectives), space=_Sample(ctx.space),
        metric=[o.key for o in ctx.objectives],
        mode=["max" if o.direction == Direction.MAXIMIZE else "min" for o in ctx.objectives],
        sampler=make_sampler(ctx.config.sampler, ctx.config.seed + done))


@functools.cache
def _searcher_class() -> type:
    """``_Searcher``, defined on first use (Ray is imported lazily). Tune pickles the searcher
    (tuner.pkl); the class is reachable as ``autoprune.search._ray._searcher._Searcher``
    (module ``__getattr__``), so pickle stores a reference and a restored searcher sees the
    live search."""
    from ray.tune.search.optuna import OptunaSearch

    class _Searcher(OptunaSearch):
        """``OptunaSearch`` told results the way the Optuna backend tells them: constraints
        from the budgets, and complete / pruned / failed states from the trial's status.
        Baselines are enqueued with their names, and so is a fit baseline steered again
        (before the next suggestion); on restore, suggestions made after Ray's last snapshot are
        replayed from the journal so trial numbers keep their parameters."""

        def __init__(self, baselines: dict[str, dict], budgets: list, primary: str,
                     objectives: list, **kwargs: Any):
            self._baselines = baselines  # plain data only: Tune pickles the searcher
            self._budgets = budgets  # resolved Budgets (frozen dataclasses)
            self._primary = primary
            self._objectives = objectives
            super().__init__(**kwargs)

        def _setup_study(self, mode):
            super()._setup_study(mode)
            replayed = self._replay()
            for name, params in self._baselines.items():  # those not suggested yet
                if name not in replayed:
                    self._ot_study.enqueue_trial(params, user_attrs={"baseline": name})

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            self._replay()

        def _replay(self) -> set[str]:
            """Enqueue the journal's suggestions the study does not hold yet, in number order;
            return the baselines among all the journal's suggestions."""
            session = _active()
            if session is None or not session.suggested:
                return set()
            known = len(self._ot_study.get_trials(deepcopy=False))
            for number in sorted(n for n in session.suggested if n >= known):
                s = session.suggested[number]
                attrs = {"baseline": s["baseline"]} if s["baseline"] else {}
                self._ot_study.enqueue_trial(s["params"], user_attrs=attrs)
            return {s["baseline"] for s in session.suggested.values() if s["baseline"]}

        def suggest(self, trial_id: str) -> dict | None:
            session = _active()
            while session is not None and session.again:  # fit baselines steered again
                again = session.again.pop(0)
                self._ot_study.enqueue_trial(again["params"],
                                             user_attrs={"baseline": again["baseline"]})
            return super().suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # multi-objective: Optuna takes no intermediate values

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            from optuna.trial import TrialState

            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._completed_trials.add(trial_id)
            trial = self._ot_trials[trial_id]
            if error or not result or RESULT_KEY not in result:
                self._ot_study.tell(trial, state=TrialState.FAIL)
                return
            tell_result(self._ot_study, trial, _parse(result),
                        self._budgets, self._primary, self._objectives,
                        keep_result=False)

    _Searcher.__qualname__ = "_Searcher"
    return _Searcher


def __getattr__(name: str) -> Any:
    if name == "_Searcher":
        return _searcher_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
