"""--device: resolved before anything runs; trials reconstruct, fine-tune and evaluate there."""

from __future__ import annotations

import pytest
import torch

import autoprune.finetune as finetune_module
from autoprune.cli import main
from autoprune.device import resolve_device
from autoprune.errors import UsageError
from autoprune.plan import PruningPlan, Recovery
from autoprune.recover import TeacherCache
from autoprune.task import load_task
from autoprune.trial import TrialSettings, run_trial


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_devices_resolve_against_what_torch_sees(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(UsageError, match=r"--device cuda:1: torch sees no GPU on this machine"):
        resolve_device("cuda:1")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UsageError, match=r"--device cuda:2: torch sees 2 GPU\(s\), cuda:0 to "
                                         r"cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(UsageError, match=r"--device 'gpu' is not a device; use auto, cpu, cuda "
                                         r"or cuda:N"):
        resolve_device("gpu")


@pytest.mark.parametrize("command", ["search", "apply"])
def test_asking_for_a_missing_gpu_exits_2_before_any_work(command, monkeypatch, tmp_path, capsys):
    _gpus(monkeypatch, 0)
    out = tmp_path / "out"
    args = (["search", "--task", "digits", "--trials", "1"] if command == "search" else
            ["apply", str(tmp_path / "missing-plan.json"), "--task", "digits"])
    plan = PruningPlan.uniform(0.5)
    if command == "apply":
        plan.save(tmp_path / "missing-plan.json")
    assert main([*args, "--output", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert f"autoprune {command}: error: --device cuda: torch sees no GPU" in err
    assert not out.exists()  # no run directory, no trial, no model


def test_a_trial_fine_tunes_evaluates_and_distils_on_the_chosen_device(monkeypatch):
    task = load_task("autoprune.testing.tasks:synthetic_task", finetune_steps=3)
    seen = []
    real = finetune_module.call_model

    def call_model(model, inputs):
        first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        seen.append((next(model.parameters()).device.type, first.device.type))
        return real(model, inputs)

    monkeypatch.setattr(finetune_module, "call_model", call_model)
    cache = TeacherCache(task.build_model, device="cpu")
    plan = PruningPlan.uniform(0.5, recovery=Recovery(hidden_distill=1.0))  # the teacher runs
    result = run_trial(task, plan, TrialSettings(targets=[], teacher_cache=cache, device="cpu"))
    assert result.status == "complete", result.reason
    assert seen and set(seen) == {("cpu", "cpu")}
    assert next(cache.teacher.parameters()).device == torch.device("cpu")
    assert cache.forwards == 3  # the teacher ran once per fine-tuning batch
