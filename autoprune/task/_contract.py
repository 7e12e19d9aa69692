"""The task contract: the user's trained model, data, metric and fine-tuning settings.

A task is what autoprune needs to know about a model to prune it: how to build a fresh copy of
the trained model, what it is called with, the data to fine-tune and evaluate on, the metric to
keep, and the loss. ``autoprune.task._loader`` finds one from a spec.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoprune.errors import TaskError
from autoprune.finetune_settings import FinetuneSettings
from autoprune.metrics import Direction

__all__ = ["Metric", "Task", "accuracy", "call_model", "iterate_seeded", "TASK_EXAMPLE"]


TASK_EXAMPLE = """\
# my_task.py -- run with: autoprune search --task my_task.py:make_task
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprune.task import Task, accuracy


def make_task() -> Task:
    x, y = torch.randn(512, 20), torch.randint(0, 3, (512,))  # your data here

    def build_architecture() -> torch.nn.Module:  # the model, untrained
        return torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
        )

    state = build_architecture().state_dict()  # stands for your trained weights

    def build_model() -> torch.nn.Module:  # a fresh copy of the trained model
        model = build_architecture()
        model.load_state_dict(state)  # yours: torch.load("trained.pt", weights_only=True)
        return model.eval()

    g = torch.Generator().manual_seed(0)
    return Task(
        name="my_task",
        build_model=build_model,
        build_architecture=build_architecture,
        example_inputs=(torch.randn(1, 20),),
        train_data=DataLoader(TensorDataset(x[:400], y[:400]), 32, shuffle=True, generator=g),
        val_data=DataLoader(TensorDataset(x[400:], y[400:]), 128),
        metric=accuracy(),
        loss_fn=torch.nn.functional.cross_entropy,
    )
"""



def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on one batch's inputs: a tensor, or a tuple/list of positional tensors."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def iterate_seeded(data: Iterable, seed: int) -> Iterable:
    """Iterate ``data`` in a reproducible order.

    A ``DataLoader`` built with ``generator=`` advances that generator every epoch; it is
    re-seeded with ``seed`` first, so every fine-tuning run with the same seed sees the same
    batches. Other iterables are iterated as they are.
    """
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    return iter(data)


@dataclass
class Metric:
    """The quantity a task keeps while pruning, computed on the validation data.

    Example:
        >>> Metric("top1", "maximize", lambda model, data: 0.9).name
        'top1'
    """

    name: str  # column name in results, e.g. "accuracy"
    direction: Direction  # "maximize" or "minimize" (taken as a Direction)
    fn: Callable[[nn.Module, Iterable], float]  # (model in eval mode, val batches) -> value
    bounds: tuple[float, float] | None = None  # possible range, e.g. (0, 1) for a fraction

    def __post_init__(self) -> None:
        if self.direction not in tuple(Direction):
            raise TaskError(
                f"Metric {self.name!r}: direction must be 'maximize' or 'minimize', "
                f"got {self.direction!r}"
            )
        self.direction = Direction(self.direction)
        if not callable(self.fn):
            raise TaskError(f"Metric {self.name!r}: fn must be callable (model, data) -> float")


def _accuracy(model: nn.Module, data: Iterable) -> float:
    device = _model_device(model)
    correct = total = 0
    for inputs, targets in data:
        out = call_model(model, _to_device(inputs, device))
        targets = targets.to(device)
        correct += (out.argmax(dim=-1) == targets).sum().item()
        total += targets.numel()
    if total == 0:
        raise TaskError("accuracy: the validation data yielded no samples")
    return correct / total


def accuracy(name: str = "accuracy") -> Metric:
    """Top-1 classification accuracy (fraction in [0, 1]) of logits ``(batch, classes)``."""
    return Metric(name, Direction.MAXIMIZE, _accuracy, bounds=(0.0, 1.0))


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)


@dataclass
class Task:
    """The user's side of the contract: trained model, inputs, data, metric, loss.

    ``train_data`` and ``val_data`` are re-iterables of ``(inputs, targets)`` batches, where
    ``inputs`` is a tensor or a tuple of tensors passed positionally to the model; a
    ``DataLoader`` with a seeded ``generator`` is the usual choice (fine-tuning re-seeds it).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), 4)
        >>> task = Task(
        ...     name="toy",
        ...     build_model=lambda: torch.nn.Linear(4, 2).eval(),
        ...     example_inputs=(torch.randn(1, 4),),
        ...     train_data=data,
        ...     val_data=data,
        ... )
        >>> 0.0 <= task.evaluate(task.build_model()) <= 1.0
        True
    """

    name: str  # short identifier, used in run directories and reports
    build_model: Callable[[], nn.Module]  # returns a fresh copy of the trained model, eval mode
    example_inputs: tuple[torch.Tensor, ...]  # batch-1 inputs, for export, latency and tracing
    train_data: Iterable  # (inputs, targets) batches for fine-tuning and calibration
    val_data: Iterable  # (inputs, targets) batches the metric is computed on
    metric: Metric = field(default_factory=accuracy)  # what pruning must preserve
    loss_fn: Callable[[Any, Any], torch.Tensor] = _cross_entropy  # (outputs, targets) -> loss
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)  # default budget
    finetune_fn: Callable[..., Any] | None = None  # replaces finetune_(); same signature
    evaluate_fn: Callable[[nn.Module], float] | None = None  # replaces metric on val_data
    description: str = ""  # one line shown by `autoprune show`
    # The model's architecture without its trained weights (any initial values). Ray workers
    # build it and load the weights of the driver's build_model(), so weights read from a
    # path on the driver's machine need not exist on the other nodes. None: build_model.
    build_architecture: Callable[[], nn.Module] | None = None
    # (inputs, generator) -> a varied copy of a batch of inputs, e.g. ReplaceTokens: data-aware
    # importance and reconstruction also fit on one copy of each calibration batch
    # (autoprune.augment). None: they fit on the training inputs only.
    augment_fn: Callable[[Any, torch.Generator], Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.example_inputs, torch.Tensor):
            self.example_inputs = (self.example_inputs,)
        elif isinstance(self.example_inputs, list):
            self.example_inputs = tuple(self.example_inputs)
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append(f"name must be a non-empty string, got {self.name!r}")
        if not callable(self.build_model):
            problems.append(
                "build_model must be a function returning a fresh nn.Module, "
                f"got {type(self.build_model).__name__}"
            )
        if not isinstance(self.example_inputs, tuple) or not all(
            isinstance(t, torch.Tensor) for t in self.example_inputs
        ):
            problems.append(
                "example_inputs must be a tensor or a tuple of tensors (batch size 1), "
                f"got {_describe(self.example_inputs)}"
            )
        for name in ("train_data", "val_data"):
            value = getattr(self, name)
            if not isinstance(value, Iterable) or isinstance(value, (str, bytes)):
                problems.append(
                    f"{name} must be a re-iterable of (inputs, targets) batches such as a "
                    f"DataLoader, got {type(value).__name__}"
                )
            elif isinstance(value, Iterator):
                problems.append(
                    f"{name} is a one-shot iterator ({type(value).__name__}); it must be "
                    "re-iterable (a DataLoader or a list of batches), it is read many times"
                )
        if not isinstance(self.metric, Metric):
            problems.append(
                "metric must be an autoprune.task.Metric (e.g. accuracy()), "
                f"got {type(self.metric).__name__}"
            )
        if not callable(self.loss_fn):
            problems.append("loss_fn must be callable (outputs, targets) -> scalar tensor")
        if not isinstance(self.finetune, FinetuneSettings):
            problems.append(
                "finetune must be an autoprune.finetune.FinetuneSettings, "
                f"got {type(self.finetune).__name__}"
            )
        for name in ("finetune_fn", "evaluate_fn", "build_architecture", "augment_fn"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                problems.append(f"{name} must be callable or None")
        if problems:
            raise TaskError(f"invalid Task {self.name!r}: " + "; ".join(problems))

    def evaluate(self, model: nn.Module) -> float:
        """The task metric of ``model`` on the validation data (``evaluate_fn`` if given).

        The model is put in eval mode and gradients are off; its previous mode is restored.
        """
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.evaluate_fn is not None:
                    value = self.evaluate_fn(model)
                    source = "evaluate_fn"
                else:
                    value = self.metric.fn(model, self.val_data)
                    source = f"metric {self.metric.name!r}"
        finally:
            model.train(was_training)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TaskError(
                f"task {self.name!r}: {source} returned {_describe(value)}, expected a float"
            )
        return float(value)

    def calibration_batches(self, n: int, seed: int = 0) -> list[tuple[Any, Any]]:
        """The first ``n`` training batches in a seeded order, e.g. for Taylor importance."""
        if n < 1:
            return []
        batches = list(itertools.islice(iterate_seeded(self.train_data, seed), n))
        if not batches:
            raise TaskError(f"task {self.name!r}: train_data yielded no batches")
        return batches


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4])
        return f"{type(value).__name__} of ({inner}{', ...' if len(value) > 4 else ''})"
    return type(value).__name__
