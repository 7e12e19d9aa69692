from __future__ import annotations

import dataclasses

import pytest

from autoprune.latency import Target, load_target


@pytest.fixture
def fast_target() -> Target:
    """cpu-1t with few runs: tests check values and plumbing, not timing precision."""
    return dataclasses.replace(
        load_target("cpu-1t"),
        warmup_runs=2,
        warmup_seconds=0.0,
        min_runs=5,
        min_seconds=0.0,
        max_runs=40,
        max_seconds=0.5,
    )
