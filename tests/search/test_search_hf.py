"""Searches over tiny random-init `transformers` encoders complete without a failed trial."""

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from autoprune.results import load_run  # noqa: E402
from autoprune.search import run_search  # noqa: E402
from autoprune.space import FloatRange, SearchSpace  # noqa: E402
from autoprune.task import load_task  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_encoder_task.py"


@pytest.mark.parametrize("family", ["bert", "distilbert", "vit"])
def test_three_trial_search_on_a_tiny_encoder(family, tmp_path, fast_target):
    # The example's task, at test size: cosine fidelity to the dense embeddings, distilled.
    task = load_task(f"{EXAMPLE}:make_task", family=family, size="tiny", n_train=32, n_val=16,
                     seq_len=8, batch_size=8, steps=3)
    space = SearchSpace(name="heads_and_ffn", sparsity=FloatRange(0.0, 0.6, 0.1))
    result = run_search(task, space, ["latency<10s"], targets=[fast_target], trials=3,
                        output=tmp_path / "run", progress=False)
    _, results = load_run(result.run_dir)
    assert len(results) == 3
    assert [r.status for r in results] == ["complete"] * 3, [r.reason for r in results]
    dense = next(r for r in results if r.baseline == "dense")
    assert dense.metrics["cosine"] == pytest.approx(1.0, abs=1e-3)
    pruned = [r for r in results if r.plan.rules and r is not dense]
    assert pruned and all(0 < r.metrics["cosine"] <= 1 for r in pruned)
    assert all(r.metrics["params"] < dense.metrics["params"] for r in pruned
               if any(rule.sparsity >= 0.2 for rule in r.plan.rules.values()))


def test_a_space_with_depth_starts_from_the_fisher_allocation_with_the_least_needed_layer_gone(
        tmp_path, fast_target):
    task = load_task(f"{EXAMPLE}:make_task", family="bert", size="tiny", n_train=32, n_val=16,
                     seq_len=8, batch_size=8, steps=3)
    space = SearchSpace(name="deep", sparsity=FloatRange(0.0, 0.6, 0.1), criteria=("fisher",),
                        depth=1)
    result = run_search(task, space, ["latency<10s"], targets=[fast_target], trials=7,
                        output=tmp_path / "run", progress=False)
    _, results = load_run(result.run_dir)
    by_start = {r.baseline: r for r in results}
    assert list(by_start) == ["dense", "uniform-structured-0.2", "uniform-structured-0.5",
                              "uniform-structured-0.6", "uniform-fit", "fisher-global",
                              "fisher-global-depth1"]
    deep = by_start["fisher-global-depth1"]
    assert deep.status == "complete", deep.reason
    # the tiny BERT has two layers: one may go, ranked on the calibration data
    assert deep.plan.drop_blocks in (("model.encoder.layer.0",), ("model.encoder.layer.1",))
    assert deep.metrics["params"] < by_start["fisher-global"].metrics["params"]
    assert all(not r.plan.drop_blocks for r in results if r is not deep)
