"""Plug your own model and data into autoprune as a task.

This file is a complete task file: ``make_task()`` returns an :class:`autoprune.task.Task`
for a small MLP classifying scikit-learn's bundled breast-cancer measurements (real data, no
download). Search it from the command line with

    autoprune search --task examples/custom_task.py:make_task --budget "accuracy>=0.9" \\
        --trials 10 --output runs/custom

or run this file (``python examples/custom_task.py``): it loads itself as a task the way the
CLI does, evaluates the model, prunes 90 % of its hidden units and fine-tunes it briefly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune.finetune import FinetuneSettings
from autoprune.task import Task, accuracy


class TabularMLP(nn.Module):
    """Your model: any ``nn.Module`` works."""

    def __init__(self, features: int = 30, hidden: int = 128, classes: int = 2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Your data: here 569 tumours, 30 measurements each, standardized, split 75/25."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=seed
    )
    mean, std = x_train.mean(0), x_train.std(0)
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_val), as_y(y_val)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> None:
    """Stands in for your own training; normally you load a checkpoint instead."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def make_task(hidden: int = 128, seed: int = 0) -> Task:
    """The task factory autoprune calls; keyword options become ``load_task(..., hidden=64)``."""
    x_train, y_train, x_val, y_val = load_data(seed)

    torch.manual_seed(seed)
    trained = TabularMLP(hidden=hidden)
    train(trained, x_train, y_train)  # or: trained.load_state_dict(torch.load("model.pt"))
    state = trained.state_dict()

    def build_model() -> nn.Module:
        # A fresh copy of the trained model for every trial: trials prune it in place.
        model = TabularMLP(hidden=hidden)
        model.load_state_dict(state)
        return model.eval()

    return Task(
        name="breast_cancer_mlp",
        build_model=build_model,
        example_inputs=(x_val[:1],),  # batch 1, what ONNX export and latency use
        train_data=DataLoader(
            TensorDataset(x_train, y_train),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),  # fine-tuning re-seeds it
        ),
        val_data=DataLoader(TensorDataset(x_val, y_val), batch_size=256),
        metric=accuracy(),  # or Metric("f1", "maximize", my_f1) with my_f1(model, val_data)
        loss_fn=nn.functional.cross_entropy,
        finetune=FinetuneSettings(steps=60, lr=1e-3, optimizer="adamw", eval_every=20),
        description="breast-cancer measurements, 3-layer MLP",
    )


def main() -> int:
    from autoprune.finetune import finetune_
    from autoprune.plan import PruningPlan
    from autoprune.prune import apply_plan
    from autoprune.task import load_task

    task = load_task(f"{__file__}:make_task")  # exactly what --task does
    model = task.build_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"task {task.name}: {task.description}")
    print(f"dense:  {task.metric.name} {task.evaluate(model):.4f}, {params} parameters")

    pruned = apply_plan(model, PruningPlan.uniform(0.9, mode="structured"), task.example_inputs)
    params = sum(p.numel() for p in pruned.parameters())
    print(f"pruned: {task.metric.name} {task.evaluate(pruned):.4f}, {params} parameters")

    result = finetune_(
        pruned, task, on_eval=lambda step, value: print(f"  step {step}: {value:.4f}")
    )
    print(
        f"fine-tuned {result.steps_done} steps in {result.seconds:.1f} s: "
        f"{task.metric.name} {task.evaluate(pruned):.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
