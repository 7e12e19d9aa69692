import pytest

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"


@pytest.fixture(scope="session")
def fast_target(tmp_path_factory):
    """A one-thread CPU target with a short measurement protocol (tests only)."""
    path = tmp_path_factory.mktemp("targets") / "fast.yaml"
    path.write_text("base: cpu-1t\nname: fast\nwarmup_runs: 2\nwarmup_seconds: 0\n"
                    "min_runs: 5\nmin_seconds: 0\nmax_seconds: 0.2\n")
    return str(path)


@pytest.fixture(scope="session")
def compute_bound_task(tmp_path_factory):
    """The synthetic task on the 1 M-parameter CNN: pruning it to 75 % runs ~5x faster, where
    the tiny default model's latency is mostly ONNX Runtime's fixed cost per call."""
    path = tmp_path_factory.mktemp("tasks") / "compute_bound.py"
    path.write_text("from autoprune.testing.tasks import synthetic_task\n\n\n"
                    "def make_task():\n"
                    "    return synthetic_task(model='resnet_1m', train_steps=20)\n")
    return str(path)


@pytest.fixture
def kept_metrics():
    """Compare a trial's metrics before a kill and after --resume: equal, except the latency
    of front and baseline plans, which the end of the search re-measures in full and times
    side by side with the dense model."""
    from autoprune.metrics import DENSE_END, SCREENED, SIDE_BY_SIDE, SPEEDUP

    def check(saved: dict, now: dict, target: str = "fast") -> None:
        now = {k: v for k, v in now.items() if k not in (SPEEDUP + target, DENSE_END + target)
               and not k.startswith(SIDE_BY_SIDE)}
        if SCREENED + target in saved and SCREENED + target not in now:
            saved = {k: v for k, v in saved.items() if not k.endswith("@" + target)}
            now = {k: v for k, v in now.items() if not k.endswith("@" + target)}
        assert now == saved

    return check
