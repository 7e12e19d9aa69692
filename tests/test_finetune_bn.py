"""BatchNorm recalibration (EagleEye's adaptive BN) before evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.errors import UsageError
from autoprune.finetune import FinetuneSettings, finetune_, recalibrate_bn_
from autoprune.task import Task, load_task

SMALL_DIGITS = {"widths": (8, 16, 32, 64), "epochs": 5}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Task:
    return load_task("digits", **SMALL_DIGITS, cache_dir=tmp_path_factory.mktemp("cache"))


def _norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _collapse_(model: nn.Module) -> None:
    """Running statistics far from the activations (as after pruning a model hard)."""
    for m in _norms(model):
        m.running_mean.add_(3.0)
        m.running_var.mul_(50.0)


def test_recalibration_collapsed_model_recovers(digits):
    dense = digits.build_model()
    before = digits.evaluate(dense)
    _collapse_(dense)
    collapsed = digits.evaluate(dense)
    weights = {k: v.clone() for k, v in dense.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    used = recalibrate_bn_(dense, digits.calibration_batches(8))
    recovered = digits.evaluate(dense)
    assert before > 0.95 and collapsed < 0.5
    assert used == 8 and recovered > before - 0.03
    # Statistics only: weights unchanged, momentum and eval mode restored, a cumulative
    # average over exactly the batches given
    state = dense.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert all(m.momentum == 0.1 and int(m.num_batches_tracked) == 8 for m in _norms(dense))
    assert not dense.training


def test_recalibration_sets_the_statistics_of_the_batches(digits):
    model = digits.build_model()
    batches = digits.calibration_batches(2)
    first = _norms(model)[0]
    recalibrate_bn_(model, batches)
    # cumulative average of the per-batch means of the first BatchNorm's input
    inputs = [model.stem[0](x) for x, _ in batches]
    expected = torch.stack([i.mean(dim=(0, 2, 3)) for i in inputs]).mean(0)
    torch.testing.assert_close(first.running_mean, expected.detach(), rtol=1e-4, atol=1e-5)


def test_no_batchnorm_or_no_batches_changes_nothing(digits):
    linear = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert recalibrate_bn_(linear, [(torch.randn(2, 4), None)]) == 0
    model = digits.build_model()
    means = [m.running_mean.clone() for m in _norms(model)]
    assert recalibrate_bn_(model, []) == 0
    assert all(torch.equal(a, m.running_mean) for a, m in zip(means, _norms(model)))


def test_finetune_recalibrates_before_evaluations(digits):
    settings = digits.finetune.replace(steps=0, bn_recalibration=3)
    model = digits.build_model()
    _collapse_(model)
    finetune_(model, digits, settings)  # no step: recalibration alone
    assert all(int(m.num_batches_tracked) == 3 for m in _norms(model))
    assert digits.evaluate(model) > 0.95
    # With steps, the intermediate evaluations see recalibrated statistics too
    model = digits.build_model()
    _collapse_(model)
    seen = []
    result = finetune_(model, digits, settings.replace(steps=4, eval_every=2, lr=1e-6),
                       on_eval=lambda step, value: seen.append(value))
    assert result.steps_done == 4 and min(seen) > 0.95
    assert all(int(m.num_batches_tracked) == 3 for m in _norms(model))  # reset at the end
    # Off: the statistics only move with momentum during training
    model = digits.build_model()
    finetune_(model, digits, settings.replace(steps=4, bn_recalibration=0))
    assert all(int(m.num_batches_tracked) > 4 for m in _norms(model))


def test_setting_is_validated():
    with pytest.raises(UsageError, match="bn_recalibration must be an int >= 0, got -1"):
        FinetuneSettings(bn_recalibration=-1)
