"""Fault injection (slow): searches run as a user runs them, broken on purpose
(autoprune.testing.faults; benchmarks/fault_injection.py prints the same measurements)."""

from __future__ import annotations

import pytest

from autoprune.testing.faults import (
    cluster_search,
    extend_ray_search,
    kill_driver,
    kill_ray_worker,
)

pytestmark = pytest.mark.slow


def test_driver_killed_at_random_points_loses_no_finished_trial(tmp_path):
    report = kill_driver(tmp_path, kills=2, trials=12, seed=3)
    assert (report.kills, report.survived, report.exit_code, report.trials) == (2, 2, 0, 12)
    assert report.finished_at_kills >= 2 and report.lost == []
    assert report.repeated == []  # a repeated plan reuses its recorded result instead


@pytest.mark.ray
def test_ray_worker_killed_mid_trial_the_search_completes(tmp_path):
    report = kill_ray_worker(tmp_path, trials=6)
    assert report.killed.startswith("pid ") and "ImplicitFunc.train" in report.killed
    assert (report.exit_code, report.trials, report.failed) == (0, 6, 0)
    assert report.retried  # the killed trial ran again


@pytest.mark.ray
def test_two_node_cluster_measures_under_each_nodes_lock(tmp_path):
    report = cluster_search(tmp_path, trials=6)
    assert (report.nodes, report.exit_code, report.trials) == (2, 0, 6)
    assert report.node_locks == {"node 0": True, "node 1": True}
    assert report.front >= 1 and report.front_screened == 0


@pytest.mark.ray
def test_restored_ray_search_extends_its_trial_count(tmp_path):
    report = extend_ray_search(tmp_path, first=3, then=6)
    assert report.exit_codes == [0, 0] and report.trials == 6
    assert report.repeated == []
    # the baselines the first run never reached run in the extension
    assert report.baselines == ["dense", "uniform-structured-0.25", "uniform-structured-0.5",
                                "uniform-structured-0.75", "uniform-fit"]
