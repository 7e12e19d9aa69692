import dataclasses

import pytest

from autoprune.finetune import FinetuneSettings
from autoprune.search import run_search
from autoprune.testing.tasks import synthetic_task


def test_the_dense_baseline_keeps_the_tasks_own_fine_tuning(tmp_path, fast_target):
    """A task whose lr is 100x below the shipped spaces' old absolute range: the space samples
    a multiplier of it, and the dense baseline is fine-tuned with the task's settings as they
    are, so it keeps the unpruned model's metric."""
    task = synthetic_task()
    task = dataclasses.replace(task, finetune=FinetuneSettings(steps=6, lr=3e-5,
                                                               optimizer="adamw"))
    unpruned = task.evaluate(task.build_model())
    result = run_search(task, "per_layer_structured", [], targets=[fast_target], trials=6,
                        output=tmp_path / "r", progress=False)
    dense = next(r for r in result.results if r.baseline == "dense")
    assert dense.status == "complete" and dense.plan.finetune == {"lr_scale": 1.0}
    assert dense.metrics["accuracy"] == pytest.approx(unpruned, abs=0.01)
    scales = [r.plan.finetune["lr_scale"] for r in result.results]
    assert all(0.3 <= s <= 3 for s in scales)
