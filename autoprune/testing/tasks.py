"""A synthetic task for tests and quick demos: seconds to build, no files, deterministic.

Ten classes of 16x16 images, each a fixed random template plus noise; a tiny residual CNN is
trained on it in memory (cached per process). Load it as
``load_task("autoprune.testing.tasks:synthetic_task")``.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprune.finetune_settings import FinetuneSettings
from autoprune.task._contract import Task, accuracy
from autoprune.testing.models import create_test_model

__all__ = ["synthetic_task", "synthetic_data"]


def synthetic_data(n: int, seed: int, size: int = 16, noise: float = 1.5):
    """``n`` noisy images of 10 class templates (the templates are the same for every seed)."""
    templates = torch.randn(10, 1, size, size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + noise * torch.randn(n, 1, size, size, generator=g)
    return x, y


@functools.lru_cache(maxsize=4)
def _trained_state(model_name: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = create_test_model(model_name, image_size=16)
    x, y = synthetic_data(1024, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.clone() for k, v in model.eval().state_dict().items()}


def synthetic_task(model: str = "resnet_tiny", train_steps: int = 60,
                   finetune_steps: int = 12) -> Task:
    """The synthetic task; ``model`` is a registered test model taking 1x16x16 inputs."""
    state = _trained_state(model, train_steps)

    def build_model() -> torch.nn.Module:
        fresh = create_test_model(model, image_size=16)
        fresh.load_state_dict(state)
        return fresh.eval()

    xt, yt = synthetic_data(512, seed=2)
    xv, yv = synthetic_data(256, seed=3)
    return Task(
        name=f"synthetic-{model}",
        build_model=build_model,
        example_inputs=(xv[:1],),
        train_data=DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0)),
        val_data=DataLoader(TensorDataset(xv, yv), batch_size=256),
        metric=accuracy(),
        finetune=FinetuneSettings(steps=finetune_steps, lr=0.01),
        description="10 noisy class templates, 16x16; a tiny CNN trained in memory",
    )
