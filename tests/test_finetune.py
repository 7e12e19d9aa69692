"""Brief fine-tuning: recovery after pruning, distillation, masks, determinism, NaN guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, TensorDataset

from autoprune.errors import NonFiniteLossError, TaskError, UsageError
from autoprune.finetune import FinetuneResult, FinetuneSettings, distillation_loss, finetune_
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan
from autoprune.task import Task, load_task

# 78 k parameters, ~99 % validation accuracy after 5 epochs (seconds of training).
SMALL_DIGITS = {"widths": (8, 16, 32, 64), "epochs": 5}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Task:
    return load_task("digits", **SMALL_DIGITS, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def dense(digits) -> torch.nn.Module:
    return digits.build_model()


def toy_model() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )
    return model.eval()


def toy_task(**kw) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    fields = dict(
        name="toy",
        build_model=toy_model,
        example_inputs=(torch.randn(1, 6),),
        train_data=DataLoader(TensorDataset(x[:192], y[:192]), 16, shuffle=True, generator=g),
        val_data=DataLoader(TensorDataset(x[192:], y[192:]), 64),
        finetune=FinetuneSettings(steps=40, lr=0.05),
    )
    fields.update(kw)
    return Task(**fields)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- digits


def test_finetuning_recovers_a_50_percent_structured_pruned_digits_model(digits, dense):
    assert digits.evaluate(dense) >= 0.97
    plan = PruningPlan.uniform(0.5, mode="structured")
    pruned = apply_plan(dense, plan, digits.example_inputs)
    assert pruned.stages[0].conv1.out_channels == 4  # half of 8
    before = digits.evaluate(pruned)
    assert before <= 0.5  # channels gone, BatchNorm statistics stale

    result = finetune_(pruned, digits, FinetuneSettings(steps=60, lr=0.01, eval_every=20))
    after = digits.evaluate(pruned)
    assert after >= 0.9 and after - before >= 0.4
    assert result.steps_done == 60 and not result.stopped_early
    assert [s for s, _ in result.history] == [20, 40, 60]
    assert result.history[-1][1] == pytest.approx(after)
    assert result.history[0][1] > before  # intermediate metrics show the recovery
    assert math.isfinite(result.final_loss) and result.seconds > 0
    assert not pruned.training  # ends in eval mode


def test_distillation_runs_and_changes_the_result(digits, dense):
    plan = PruningPlan.uniform(0.5, mode="structured")
    settings = FinetuneSettings(steps=20, lr=0.01)
    plain, distilled, default_teacher = (
        apply_plan(dense, plan, digits.example_inputs) for _ in range(3)
    )
    r_plain = finetune_(plain, digits, settings)
    r_dist = finetune_(distilled, digits, settings.replace(distill_weight=0.7), teacher=dense)
    assert not same_weights(plain, distilled)
    assert r_dist.final_loss != r_plain.final_loss
    assert digits.evaluate(distilled) >= 0.5
    # Without an explicit teacher, the task's unpruned model is the teacher: same result.
    finetune_(default_teacher, digits, settings.replace(distill_weight=0.7))
    assert same_weights(default_teacher, distilled)


def test_nan_guard_on_exploding_learning_rate(digits, dense):
    pruned = apply_plan(dense, PruningPlan.uniform(0.5), digits.example_inputs)
    settings = FinetuneSettings(steps=50, lr=1e6, schedule="constant")
    with pytest.raises(NonFiniteLossError) as info:
        finetune_(pruned, digits, settings)
    reason = info.value.reason
    assert reason.startswith("loss became nan at step ") or reason.startswith(
        "loss became inf at step "
    )
    assert "(lr=1e+06, peak lr=1e+06): lower the learning rate" in reason
    step = int(reason.split("at step ")[1].split()[0])
    assert 2 <= step <= 50


def test_unstructured_masks_stay_zero_through_finetuning(digits, dense):
    plan = PruningPlan.uniform(0.6, mode="unstructured")
    pruned = apply_plan(dense, plan, digits.example_inputs)
    conv = pruned.stages[1].conv1
    zeros = conv.weight == 0
    assert zeros.float().mean().item() == pytest.approx(0.6, abs=0.01)
    finetune_(pruned, digits, FinetuneSettings(steps=10, lr=0.05))
    assert torch.equal(conv.weight == 0, zeros)  # the same weights are zero, no others
    assert not torch.equal(
        conv.weight, apply_plan(dense, plan, digits.example_inputs).stages[1].conv1.weight
    )  # ... while the rest did train


# ----------------------------------------------------------------------------- toy task


def test_torch_prune_masks_survive_optimizer_steps():
    task = toy_task()
    model = task.build_model()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    mask = model[0].weight_mask.clone()
    orig_before = model[0].weight_orig.detach().clone()
    finetune_(model, task, FinetuneSettings(steps=30, lr=0.1))
    assert torch_prune.is_pruned(model)  # the hook is still there
    assert torch.equal(model[0].weight_mask, mask)
    assert torch.equal(model[0].weight == 0, mask == 0)
    assert not torch.equal(model[0].weight_orig, orig_before)  # underlying weights did move


def test_same_seed_same_weights_other_seed_other_weights():
    task = toy_task()
    runs = []
    for seed in (0, 0, 1):
        model = task.build_model()
        torch.manual_seed(123)  # finetune_ must not depend on the global RNG state
        torch.randn(7)
        finetune_(model, task, FinetuneSettings(steps=25, lr=0.05, seed=seed))
        runs.append(model)
    assert same_weights(runs[0], runs[1])
    assert not same_weights(runs[0], runs[2])


def test_identical_weights_on_digits_with_the_default_settings(digits, dense):
    plan = PruningPlan.uniform(0.5)
    a, b = (apply_plan(dense, plan, digits.example_inputs) for _ in range(2))
    settings = digits.finetune.replace(steps=8, eval_every=4)
    ra, rb = finetune_(a, digits, settings), finetune_(b, digits, settings)
    assert same_weights(a, b)
    assert ra.final_loss == rb.final_loss and ra.history == rb.history


def test_on_eval_is_called_and_can_stop_early():
    task = toy_task(build_model=lambda: torch.nn.Linear(6, 3).eval())
    calls = []

    def on_eval(step: int, metric: float) -> bool:
        calls.append((step, metric))
        return step >= 20

    model = task.build_model()
    result = finetune_(model, task, FinetuneSettings(steps=100, eval_every=10), on_eval=on_eval)
    assert [s for s, _ in calls] == [10, 20]
    assert result.stopped_early and result.steps_done == 20
    assert result.history == calls
    assert all(0 <= m <= 1 for _, m in calls)
    assert not model.training

    # eval_every=0: no evaluation, no callback.
    result = finetune_(model, task, FinetuneSettings(steps=5), on_eval=on_eval)
    assert result.history == [] and len(calls) == 2 and result.steps_done == 5


def test_data_is_cycled_and_the_task_defaults_are_used():
    task = toy_task()  # 12 batches per epoch, default budget 40 steps
    model = task.build_model()
    result = finetune_(model, task)
    assert result.steps_done == 40
    assert finetune_(task.build_model(), task, task.finetune.replace(steps=0)).steps_done == 0


def test_learning_rate_schedules(monkeypatch):
    lrs: list[float] = []
    sgd_step = torch.optim.SGD.step

    def step(self, *args, **kw):  # records the lr of every optimizer step
        lrs.append(self.param_groups[0]["lr"])
        return sgd_step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    task = toy_task()
    seen = {}
    for schedule in ("cosine", "constant"):
        lrs.clear()
        settings = FinetuneSettings(steps=10, lr=0.1, schedule=schedule, warmup_steps=2)
        finetune_(task.build_model(), task, settings)
        seen[schedule] = list(lrs)
    assert seen["constant"] == pytest.approx([0.1 / 3, 0.2 / 3] + [0.1] * 8)
    cosine = seen["cosine"]
    assert cosine[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert cosine[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))


def test_adamw_and_batch_size_override():
    task = toy_task()
    model = task.build_model()
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    settings = FinetuneSettings(steps=6, lr=0.01, optimizer="adamw", batch_size=64)
    result = finetune_(model, task, settings)
    assert result.steps_done == 6 and sizes == [64, 64, 64, 64, 64, 64]

    listed = toy_task(train_data=list(task.train_data))
    with pytest.raises(UsageError, match="needs the task's train_data to be a torch DataLoader"):
        finetune_(listed.build_model(), listed, settings)


def test_finetune_fn_hook_replaces_the_loop():
    calls = []

    def my_finetune(model, task, settings, *, teacher=None, on_eval=None):
        calls.append(settings.steps)
        return FinetuneResult(steps_done=3, final_loss=0.5, history=[(3, 0.9)])

    task = toy_task(finetune_fn=my_finetune)
    result = finetune_(task.build_model(), task, FinetuneSettings(steps=7))
    assert calls == [7] and result.steps_done == 3 and result.history == [(3, 0.9)]

    bad = toy_task(finetune_fn=lambda *a, **k: 42)
    with pytest.raises(TaskError, match="finetune_fn returned int, expected a FinetuneResult"):
        finetune_(bad.build_model(), bad)


def test_loss_must_be_a_scalar():
    task = toy_task(
        loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
    )
    with pytest.raises(TaskError, match=r"loss_fn must return a scalar tensor, got Tensor\(16,\)"):
        finetune_(task.build_model(), task)


def test_settings_are_validated():
    with pytest.raises(UsageError, match="optimizer must be one of"):
        FinetuneSettings(optimizer="lion")
    with pytest.raises(
        UsageError,
        match=r"lr must be a number > 0, got 0;.*distill_weight must be in \[0, 1\], got 2",
    ):
        FinetuneSettings(lr=0, distill_weight=2)
    with pytest.raises(UsageError, match="schedule must be one of"):
        FinetuneSettings().replace(schedule="step")
    with pytest.raises(UsageError, match="steps must be an int >= 0, got '10'"):
        FinetuneSettings(steps="10")
    with pytest.raises(UsageError, match="unknown fine-tuning setting.s. epochs; known: steps"):
        FinetuneSettings().replace(epochs=3)
    assert FinetuneSettings().replace(steps=5).steps == 5


def test_distillation_loss_is_zero_for_equal_logits():
    logits = torch.randn(4, 10)
    assert distillation_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, -logits, 4.0).item() > 0
