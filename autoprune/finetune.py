"""Brief fine-tuning of a pruned model, optionally distilled from the unpruned teacher.

Every search trial fine-tunes its pruned model for a small step budget. Unstructured masks
(``torch.nn.utils.prune`` forward pre-hooks over ``weight_orig``) stay in place throughout, so
pruned weights remain zero in the effective weight whatever the optimizer does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoprune.errors import NonFiniteLossError, TaskError, UsageError
from autoprune.finetune_settings import FinetuneSettings
from autoprune.recover import TeacherCache, capture_blocks, hidden_loss, main_blocks
from autoprune.task._contract import Task, _to_device, call_model, iterate_seeded

__all__ = ["FinetuneSettings", "FinetuneResult", "finetune_", "distillation_loss",
           "recalibrate_bn_"]

@dataclass
class FinetuneResult:
    """What happened during fine-tuning."""

    steps_done: int  # optimizer steps actually taken
    final_loss: float  # training loss of the last step (nan if no step was taken)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, val metric)
    stopped_early: bool = False  # on_eval returned True
    seconds: float = 0.0  # wall-clock time, evaluations included


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's soft-target loss: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``."""
    t = temperature
    return (
        nn.functional.kl_div(
            nn.functional.log_softmax(student / t, dim=-1),
            nn.functional.log_softmax(teacher / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


def recalibrate_bn_(model: nn.Module, batches: Iterable[tuple[Any, Any]]) -> int:
    """Re-estimate the BatchNorm running statistics of ``model`` from ``batches`` of
    ``(inputs, targets)`` in place; return the number of batches used.

    EagleEye (Li et al., ECCV 2020): after pruning (or brief fine-tuning, whose momentum
    updates leave the statistics of the unpruned model mostly in place) the running means and
    variances no longer match the activations, and a model evaluated with them can score at
    chance. The statistics are reset and re-estimated as the cumulative average over the
    batches in train mode, without gradients; weights do not change.
    The model's mode is restored. Without BatchNorm layers or batches, nothing changes.

    Example:
        >>> recalibrate_bn_(pruned, task.calibration_batches(8))  # doctest: +SKIP
        8
    """
    batches = list(batches)
    norms = _batch_norms(model)
    if not norms or not batches:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    device = next(iter(model.parameters())).device
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    used = 0
    model.train()
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                call_model(model, _to_device(inputs, device))
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _recalibration_batches(model: nn.Module, task: Task, s: FinetuneSettings) -> list:
    """The batches BatchNorm statistics are re-estimated on ([] if off or nothing to do)."""
    if not s.bn_recalibration or not _batch_norms(model):
        return []
    return task.calibration_batches(s.bn_recalibration, s.seed)


def finetune_(
    model: nn.Module,
    task: Task,
    settings: FinetuneSettings | None = None,
    *,
    teacher: nn.Module | TeacherCache | None = None,
    on_eval: Callable[[int, float], bool | None] | None = None,
    hidden_distill: float = 0.0,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``task.train_data``; return what happened.

    Args:
        model: the (pruned) model; unstructured masks are kept, the model ends in eval mode.
        task: gives the data, the loss and the metric. If it has a ``finetune_fn``, that is
            called instead with the same arguments.
        settings: the budget and optimizer; ``task.finetune`` if None.
        teacher: the unpruned model to distill from (output distillation when
            ``settings.distill_weight > 0``, hidden states when ``hidden_distill > 0``), or a
            :class:`~autoprune.recover.TeacherCache` of its outputs; ``task.build_model()``
            if None.
        on_eval: called as ``on_eval(step, metric)`` every ``settings.eval_every`` steps with
            the task metric on the validation data; returning True stops fine-tuning early
            (the search uses it to prune hopeless trials).
        hidden_distill: weight of the hidden-state loss (each main block's output against the
            teacher's, :mod:`autoprune.recover`) added to the loss; 0 = off. Not passed to a
            task's own ``finetune_fn``.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the message gives the step and
            the learning rate.

    Example:
        >>> result = finetune_(model, task, task.finetune.replace(steps=50))  # doctest: +SKIP
        >>> task.evaluate(model)  # doctest: +SKIP
    """
    if not isinstance(task, Task):
        raise TypeError(f"finetune_ expects an autoprune.task.Task, got {type(task).__name__}")
    settings = task.finetune if settings is None else settings
    start = time.perf_counter()
    if task.finetune_fn is not None:
        if getattr(task.finetune_fn, "takes_recovery", False):  # autoprune's own wrappers
            result = task.finetune_fn(model, task, settings, teacher=teacher, on_eval=on_eval,
                                      hidden_distill=hidden_distill)
        else:
            if hidden_distill > 0:
                raise TaskError(
                    f"task {task.name!r} fine-tunes with its own finetune_fn, which cannot "
                    f"apply hidden-state distillation (hidden_distill={hidden_distill:g}); "
                    "set the plan's recovery.hidden_distill to 0 or drop finetune_fn"
                )
            dense = teacher.teacher if isinstance(teacher, TeacherCache) else teacher
            result = task.finetune_fn(model, task, settings, teacher=dense, on_eval=on_eval)
        if result is None:
            result = FinetuneResult(settings.steps, math.nan)
        if not isinstance(result, FinetuneResult):
            raise TaskError(
                f"task {task.name!r}: finetune_fn returned {type(result).__name__}, "
                "expected a FinetuneResult or None"
            )
        result.seconds = result.seconds or time.perf_counter() - start
        return result

    # Seeded, without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return _finetune_loop(model, task, settings, teacher, on_eval, hidden_distill, start)


def _finetune_loop(
    model: nn.Module,
    task: Task,
    settings: FinetuneSettings,
    teacher: nn.Module | TeacherCache | None,
    on_eval: Callable[[int, float], bool | None] | None,
    hidden_distill: float,
    start: float,
) -> FinetuneResult:
    result = FinetuneResult(steps_done=0, final_loss=math.nan)
    calibration = _recalibration_batches(model, task, settings)
    if settings.steps == 0:
        recalibrate_bn_(model, calibration)
        model.eval()
        return result

    blocks = main_blocks(model) if hidden_distill > 0 else []
    cache = None
    if settings.distill_weight > 0 or blocks:
        if isinstance(teacher, TeacherCache):
            cache = teacher
        else:  # a teacher without a cache: max_bytes=0 keeps nothing
            dense = teacher
            cache = TeacherCache(lambda: dense if dense is not None else task.build_model(), 0)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TaskError(f"task {task.name!r}: the model has no trainable parameters")
    optimizer = _make_optimizer(params, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(settings))
    data = _training_data(task, settings)
    device = next(iter(params)).device

    model.train()
    batches = iterate_seeded(data, settings.seed)
    epoch = 0
    try:
        while result.steps_done < settings.steps:
            try:
                inputs, targets = next(batches)
            except StopIteration:
                epoch += 1
                batches = iterate_seeded(data, settings.seed + epoch)
                try:
                    inputs, targets = next(batches)
                except StopIteration:
                    raise TaskError(f"task {task.name!r}: train_data yielded no batches") from None
            step = result.steps_done + 1
            inputs, targets = _to_device(inputs, device), _to_device(targets, device)
            with capture_blocks(model, blocks) as student_blocks:
                outputs = call_model(model, inputs)
            loss = task.loss_fn(outputs, targets)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else ""
                raise TaskError(
                    f"task {task.name!r}: loss_fn must return a scalar tensor, got "
                    f"{type(loss).__name__}{shape}"
                )
            if cache is not None:
                teacher_out, teacher_blocks = cache.outputs(inputs, blocks)
                w = settings.distill_weight
                if w > 0:
                    loss = (1 - w) * loss + w * distillation_loss(
                        outputs, teacher_out, settings.temperature
                    )
                hidden = hidden_loss(student_blocks, teacher_blocks)
                if hidden is not None:
                    loss = loss + hidden_distill * hidden
            if not torch.isfinite(loss).all():
                value = loss.detach().float().flatten()[0].item()
                raise NonFiniteLossError(
                    f"loss became {value} at step {step} "
                    f"(lr={optimizer.param_groups[0]['lr']:g}, peak lr={settings.lr:g}): "
                    "lower the learning rate (FinetuneSettings.lr) or check the task's loss"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            result.steps_done = step
            result.final_loss = loss.item()
            if settings.eval_every and step % settings.eval_every == 0:
                recalibrate_bn_(model, calibration)
                metric = task.evaluate(model)  # restores train mode
                result.history.append((step, metric))
                if on_eval is not None and on_eval(step, metric):
                    result.stopped_early = True
                    break
        else:
            recalibrate_bn_(model, calibration)
    finally:
        model.eval()
        result.seconds = time.perf_counter() - start
    return result


def _make_optimizer(params: list[nn.Parameter], s: FinetuneSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=s.lr,
            momentum=s.momentum,
            nesterov=s.momentum > 0,
            weight_decay=s.weight_decay,
        )
    return torch.optim.AdamW(
        params, lr=s.lr, betas=(s.momentum, 0.999), weight_decay=s.weight_decay
    )


def _lr_factor(s: FinetuneSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        if s.schedule == "constant":
            return 1.0
        span = max(1, s.steps - s.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - s.warmup_steps) / span)))

    return factor


def _training_data(task: Task, s: FinetuneSettings) -> Any:
    if s.batch_size is None:
        return task.train_data
    from torch.utils.data import DataLoader

    data = task.train_data
    if not isinstance(data, DataLoader):
        raise UsageError(
            f"FinetuneSettings.batch_size={s.batch_size} needs the task's train_data to be a "
            f"torch DataLoader to re-batch it, but task {task.name!r} has "
            f"{type(data).__name__}; leave batch_size=None"
        )
    if data.batch_size == s.batch_size:
        return data
    return DataLoader(
        data.dataset,
        batch_size=s.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(s.seed),
        collate_fn=data.collate_fn,
        drop_last=data.drop_last,
    )
