"""A file task on a 2-node Ray cluster (``ray.cluster_utils.Cluster``, one machine): the task
travels in the job's working_dir, the weights in the object store, the latency measurements
back to the driver. The same search across two hosts that share no files is the slow
``tests/search/test_two_hosts.py`` (``make test-cluster``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from autoprune.search import run_search
from autoprune.task import load_task
from autoprune.testing import create_test_model
from autoprune.testing.tasks import synthetic_task

pytestmark = pytest.mark.ray

TASK_DIR = Path(__file__).parents[1] / "cluster" / "task"


def test_file_task_on_a_two_node_cluster(tmp_path, fast_target, monkeypatch):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    task_dir = tmp_path / "task"
    shutil.copytree(TASK_DIR, task_dir, ignore=shutil.ignore_patterns("__pycache__"))
    torch.save(synthetic_task().build_model().state_dict(), tmp_path / "weights.pt")
    calls = tmp_path / "calls.log"
    for key, value in {"AUTOPRUNE_TEST_CALLS": str(calls), "RAY_USAGE_STATS_ENABLED": "0",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    # Short temp paths: Ray keeps Unix sockets there (108-byte limit).
    tmp = [Path(f"/tmp/apc{os.getpid()}-{i}") for i in range(2)]
    for d in tmp:
        d.mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "env_vars": {"TMPDIR": str(tmp[0])}})
    try:
        cluster.add_node(num_cpus=1, env_vars={"TMPDIR": str(tmp[1])})
        cluster.wait_for_nodes()
        nodes = {n.node_id for n in cluster.list_all_nodes()}
        out = tmp_path / "run"
        result = run_search(f"{task_dir / 'cluster_task.py'}:make_task", "uniform_structured",
                            ["params<15k"], targets=[fast_target], trials=3,
                            finetune_steps=2, output=out, backend="ray", workers=2,
                            backend_options={"address": cluster.address, "cpus_per_trial": 1},
                            progress=False)
    finally:
        cluster.shutdown()
        for d in tmp:
            shutil.rmtree(d, ignore_errors=True)
    assert not ray.is_initialized()
    assert [r.number for r in result.results] == [0, 1, 2]
    assert all(r.status in ("complete", "infeasible") for r in result.results)
    # Each trial records the node that ran it; trials.jsonl keeps it.
    assert {r.node for r in result.results} <= nodes and len(nodes) == 2
    saved = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["node"] for t in saved] == [r.node for r in result.results]
    # Only the driver read the weights file; workers built the architecture from the module
    # beside the task file, in their copy of the working_dir, and loaded the driver's weights.
    log = [line.split() for line in calls.read_text().splitlines()]
    readers = {pid for pid, fn, _ in log if fn == "build_model"}
    assert readers == {str(os.getpid())}
    workers = [(pid, path) for pid, fn, path in log if fn == "build_architecture"]
    assert workers and all(pid != str(os.getpid()) for pid, _ in workers)
    assert all("working_dir_files" in path for _, path in workers)
    task = load_task(f"{task_dir / 'cluster_task.py'}:make_task")
    dense = next(r for r in result.results if r.baseline == "dense")
    assert dense.metrics["accuracy"] == pytest.approx(task.evaluate(task.build_model()))
    # Latency measured on the nodes, written by the driver into the run directory's cache.
    cache = json.loads((out / "latency_cache.json").read_text())["entries"]
    assert len(cache) >= 2


def test_what_travels_with_a_file_task(tmp_path):
    """A file task ships its directory only to a cluster; a Ray initialized by the caller
    without that working_dir is a usage error that says what to do."""
    from types import SimpleNamespace

    from autoprune.errors import UsageError
    from autoprune.search._ray._shipping import (
        check_joined,
        runtime_env,
        ships_task,
        worker_spec,
    )

    task = tmp_path / "t.py"
    task.write_text("")

    def ctx(spec, **opts):
        return SimpleNamespace(task_spec=spec, backend_options=opts)

    cluster, local = ctx(f"{task}:make", address="head:6379"), ctx(f"{task}:make")
    assert ships_task(cluster) and not ships_task(local)
    assert runtime_env(cluster)["working_dir"] == str(tmp_path)
    assert "working_dir" not in runtime_env(local)
    assert worker_spec(cluster) == "t.py:make" and worker_spec(local) == f"{task}:make"
    package = ctx("autoprune.testing.tasks:synthetic_task", address="head:6379")
    assert not ships_task(package) and worker_spec(package) == package.task_spec

    def joined(env):
        return SimpleNamespace(get_runtime_context=lambda: SimpleNamespace(runtime_env=env))

    with pytest.raises(UsageError, match=r"without a working_dir.*runtime_env="):
        check_joined(joined({}), cluster)
    check_joined(joined({"working_dir": "gcs://_ray_pkg_x.zip"}), cluster)
    check_joined(joined({}), local)


def test_workers_load_the_drivers_weights_into_the_architecture():
    from autoprune.errors import TaskError
    from autoprune.search._ray._shipping import with_weights

    task = synthetic_task(train_steps=0)
    trained = synthetic_task().build_model()
    task.build_architecture = lambda: create_test_model("resnet_tiny", image_size=16)
    model = with_weights(task, trained.state_dict()).build_model()
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  trained.state_dict().values()))
    task.build_architecture = lambda: create_test_model("resnet_tiny", image_size=16,
                                                        widths=(4, 8, 16))
    with pytest.raises(TaskError, match="the driver's weights do not fit the model built on "
                                        "this node .*size mismatch"):
        with_weights(task, trained.state_dict()).build_model()
