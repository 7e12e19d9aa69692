"""What the built-in tasks share: training a classifier on in-memory tensors, and a Task over
those tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune.finetune_settings import FinetuneSettings
from autoprune.task._contract import Task, accuracy

__all__ = ["train_classifier_", "tensor_task"]

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x/y train, x/y val


def train_classifier_(
    model: nn.Module,
    data: Tensors,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    seed: int,
    batch_size: int,
    max_lr: float,
    pct_start: float,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, Any]:
    """Train ``model`` in place (cross-entropy, one-cycle LR, seeded batch order); return its
    validation accuracy. ``augment(batch, generator)`` transforms each training batch."""
    x_train, y_train, x_val, y_val = data
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(1, epochs * steps_per_epoch),
        pct_start=pct_start)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(x_train), batch_size):
            idx = order[i : i + batch_size]
            xb = x_train[idx] if augment is None else augment(x_train[idx], g)
            loss = nn.functional.cross_entropy(model(xb), y_train[idx],
                                               label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    return {"val_accuracy": round(acc, 4), "epochs": epochs}


def tensor_task(
    name: str,
    data: Tensors,
    build_model: Callable[[], nn.Module],
    example_inputs: tuple[torch.Tensor, ...],
    *,
    batch_size: int,
    val_batch_size: int,
    seed: int,
    finetune: FinetuneSettings,
    description: str,
    build_architecture: Callable[[], nn.Module] | None = None,
) -> Task:
    """A classification Task over in-memory tensors (shuffled, seeded training batches)."""
    x_train, y_train, x_val, y_val = data
    return Task(
        name=name,
        build_model=build_model,
        build_architecture=build_architecture,
        example_inputs=example_inputs,
        train_data=DataLoader(
            TensorDataset(x_train, y_train),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        ),
        val_data=DataLoader(TensorDataset(x_val, y_val), batch_size=val_batch_size),
        metric=accuracy(),
        loss_fn=nn.functional.cross_entropy,
        finetune=finetune,
        description=description,
    )
