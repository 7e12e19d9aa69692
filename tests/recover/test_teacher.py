"""The dense teacher runs once per training batch per search, and hidden states are distilled."""

import pytest
import torch

from autoprune.finetune import finetune_
from autoprune.plan import PruningPlan, Recovery
from autoprune.recover import TeacherCache, capture_blocks, hidden_loss, main_blocks
from autoprune.testing import create_test_model
from autoprune.testing.tasks import synthetic_task
from autoprune.trial import TrialSettings, run_trial


@pytest.fixture(scope="module")
def task():
    return synthetic_task(finetune_steps=6)


def test_the_teacher_runs_once_per_batch_for_every_trial_of_a_search(task):
    # 6 steps over 64-sample batches of 512 training samples: 6 distinct batches
    cache = TeacherCache(task.build_model)
    settings = TrialSettings(targets=[], teacher_cache=cache,
                             finetune=task.finetune.replace(distill_weight=0.5))
    plan = PruningPlan.uniform(0.5, recovery=Recovery(hidden_distill=1.0))
    first = run_trial(task, plan, settings)
    assert first.status == "complete" and cache.forwards == 6
    second = run_trial(task, PruningPlan.uniform(0.25, recovery=Recovery(hidden_distill=1.0)),
                       settings)
    assert second.status == "complete" and cache.forwards == 6  # all from the cache
    assert first.timings["reconstruct"] > 0 and "reconstruction_error" in first.metrics


def test_without_a_cache_the_teacher_runs_every_step(task):
    counted = []
    teacher = task.build_model()
    teacher.register_forward_hook(lambda *_: counted.append(1))
    finetune_(task.build_model(), task, task.finetune.replace(distill_weight=0.5),
              teacher=teacher)
    assert len(counted) == 6


def test_hidden_distillation_pulls_block_outputs_toward_the_teacher(task):
    blocks = main_blocks(task.build_model())
    assert blocks == ["stages.0", "stages.1", "stages.2"]
    cache = TeacherCache(task.build_model)
    x = next(iter(task.train_data))[0]

    def drifted():  # a student that moved away from the dense model
        torch.manual_seed(0)
        student = task.build_model()
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return student

    def loss(student):
        with torch.no_grad(), capture_blocks(student, blocks) as got:
            student(x)
        return hidden_loss(got, cache.outputs(x, blocks)[1]).item()

    settings = task.finetune.replace(steps=20, lr=0.02)
    plain, distilled = drifted(), drifted()
    start = loss(plain)
    finetune_(plain, task, settings, teacher=cache)
    finetune_(distilled, task, settings, teacher=cache, hidden_distill=10.0)
    assert loss(distilled) < 0.7 * min(start, loss(plain)), (start, loss(plain))
    assert hidden_loss({"a": torch.ones(2)}, {"a": torch.ones(3)}) is None  # shapes differ


def test_main_blocks_are_the_largest_stack_of_like_modules():
    assert main_blocks(create_test_model("transformer_tiny")) == ["layers.0", "layers.1"]
