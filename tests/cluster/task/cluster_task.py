"""The task of the cluster tests: the synthetic task, its model built by the module beside this
file, its trained weights read from ``../weights.pt``, a file on the driver's machine only.

``AUTOPRUNE_TEST_CALLS`` (optional): a file each process appends ``pid function file`` to when
it builds the model, so a test on one machine can see which process read the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from cluster_net import build_net  # the module beside this file

from autoprune.testing.tasks import synthetic_task

WEIGHTS = Path(__file__).resolve().parent.parent / "weights.pt"


def _called(name: str) -> None:
    log = os.environ.get("AUTOPRUNE_TEST_CALLS")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {name} {Path(__file__).resolve()}\n")


def make_task():
    task = synthetic_task(train_steps=0, finetune_steps=2)

    def build_architecture() -> torch.nn.Module:
        _called("build_architecture")
        return build_net()

    def build_model() -> torch.nn.Module:
        _called("build_model")
        model = build_net()
        model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
        return model.eval()

    task.build_model, task.build_architecture = build_model, build_architecture
    return task
