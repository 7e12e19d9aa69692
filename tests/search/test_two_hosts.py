"""A search across two hosts that share no files (``tests/cluster/two_hosts.py``, run by
``make test-cluster``): two network namespaces joined by a veth pair, the worker node in a
private mount namespace, its raylet killed mid-search. Needs root, ``ip`` and ``unshare``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SCRIPT = Path(__file__).parents[1] / "cluster" / "two_hosts.py"


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("unshare")),
                    reason="needs root, ip and unshare (network and mount namespaces)")
def test_search_on_two_hosts_that_share_no_files():
    pytest.importorskip("ray")
    work = Path(f"/tmp/apc-test-{os.getpid()}")  # short: Ray's socket paths live in it
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--keep", str(work)], timeout=900)
        summary = json.loads((work / "summary.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert "error" not in summary and proc.returncode == 0
    worker, nodes = summary["worker_node"], summary["nodes"]
    assert len(nodes) == 2 and worker in nodes.values()
    # The worker node saw none of the driver's files, and wrote nothing at their paths.
    assert not any(summary["worker_sees_before"].values())
    assert not any(summary["worker_sees_after"].values())
    # The search completed; trials ran on the worker node (recorded in their results).
    trials = summary["trials"]
    assert summary["exit_code"] == 0 and [t["number"] for t in trials] == list(range(10))
    # The head has no CPUs: every trial that ran, ran on the worker's host, first on the
    # worker node, then on the node that replaced it.
    new = summary["new_worker_node"]
    ran = [t.get("node") for t in trials if t.get("reused_from") is None]
    assert set(ran) <= {worker, new} and worker in ran and new in ran
    # The raylet was killed while a trial ran there: that trial was retried on the new node
    # or recorded failed with the reason; no trial that had finished before the kill was lost.
    kill = summary["kill"]
    assert kill["running"] and len(kill["finished_before"]) >= 2
    assert summary["lost"] == []
    failed = [t for t in trials if t["status"] == "failed"]
    assert summary["retry_lines"] or failed
    assert all("retries exhausted" in t["reason"] for t in failed)
    assert all(t["status"] in ("complete", "infeasible", "pruned", "failed") for t in trials)
    # Nothing left behind.
    assert summary["left_processes"] == []
    namespaces = subprocess.run(["ip", "netns", "list"], text=True, capture_output=True).stdout
    assert not [ns for ns in summary["namespaces"] if ns in namespaces]
    links = subprocess.run(["ip", "link"], text=True, capture_output=True).stdout
    assert not [ns for ns in summary["namespaces"] if ns.replace("-", "") in links]
