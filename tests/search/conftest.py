import pytest

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"


@pytest.fixture(scope="session")
def fast_target(tmp_path_factory):
    """A one-thread CPU target with a short measurement protocol (tests only)."""
    path = tmp_path_factory.mktemp("targets") / "fast.yaml"
    path.write_text("base: cpu-1t\nname: fast\nwarmup_runs: 2\nwarmup_seconds: 0\n"
                    "min_runs: 5\nmin_seconds: 0\nmax_seconds: 0.2\n")
    return str(path)
