"""Distributed backend: Ray Tune runs the trials, Optuna samples them (``OptunaSearch``).

The backend only translates: Optuna's parameters into plans and trial configs, and
:func:`~autoprune.trial.run_trial`'s results into Tune reports and Optuna states. The pieces,
by the file that holds them and where they run:

* ``_backend.py`` (driver): ``RayBackend``, which starts the search, runs ``Tuner.fit`` and
  hands the results back to ``run_search``;
* ``_searcher.py`` (driver): ``_Sample`` (the space's define-by-run ``sample`` for
  ``OptunaSearch``) and ``_Searcher`` (an ``OptunaSearch`` told results with the same
  constraints and states as the Optuna backend);
* ``_session.py`` (driver): ``_Session`` collects finished trials, prints progress and keeps
  the journal; ``_DriverCallback`` forwards Tune's trial events to it;
* ``_trainable.py`` (workers, one Ray actor per concurrent trial): ``_trainable`` loads the task
  once per process and calls ``run_trial`` -- the same trial function as every backend;
* ``_isolation.py`` (workers): ``NodeIsolation``, latency isolation between trials of one node;
* ``_journal.py`` (driver): the journal that makes ``--resume`` lose nothing;
* ``_cluster.py`` (driver): connecting to a cluster or starting a local Ray;
* ``_shipping.py`` (driver and workers): what travels to nodes that share no files with the
  driver -- a file task's directory in the job's ``runtime_env`` (``working_dir``), the base
  model's weights in the object store -- and comes back: results and latency measurements.

Latency isolation: every worker measures under ``TrialSettings.measure_lock``, an fcntl lock
file in the node's temp directory, so two trials on one node never time a model at once. With
``isolation="node"`` (the default) workers also hold that lock *shared* while they fine-tune
and evaluate, so a measurement has the node to itself (``NodeIsolation``); a neighbour's
fine-tuning slowed measurements by several percent otherwise (``benchmarks/ray_overhead.py``).

Fault tolerance: ``FailureConfig(max_failures)`` retries a trial whose worker died; a trial that
keeps failing is recorded as ``failed`` and the search goes on. Ray's experiment lives in
``RUN/ray/tune`` and ``--resume`` continues it with ``Tuner.restore``. Ray snapshots its state
every few seconds, so the driver also appends every suggestion and every finished trial to
``RUN/ray/journal.jsonl`` (fsync'd): on resume, suggestions made after the last snapshot are
replayed with the same trial numbers, and trials that had finished are not run again. Resumed
with another ``--trials``, the search starts a new experiment (``RUN/ray/tune-2``, ...) that
replays the journal and then samples the rest (Tune cannot change a restored trial count).

Ray is imported lazily: ``import autoprune`` and the Optuna backend work without it.
"""

from __future__ import annotations

from autoprune.search._ray._backend import RayBackend
from autoprune.search._ray._cluster import INSTALL_HINT
from autoprune.search._ray._isolation import NodeIsolation

__all__ = ["RayBackend", "NodeIsolation", "INSTALL_HINT"]
