"""The dense teacher's outputs on training batches, computed once per search and reused by
every trial's distillation."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autoprune.nested import tensors
from autoprune.recover._hidden import capture_blocks
from autoprune.task._contract import _model_device, _to_device, call_model

__all__ = ["TeacherCache"]


def _key(inputs: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors(inputs if isinstance(inputs, (tuple, list)) else (inputs,)):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _size(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(obj))


class TeacherCache:
    """Outputs and block outputs of the dense model, by training batch.

    Trials fine-tune with the same seed, so they see the same batches: after the first trial
    the teacher's forward passes are lookups. Batches are keyed by their content; entries stop
    being added at ``max_bytes`` (the teacher then runs for the rest).

    Example:
        >>> cache = TeacherCache(task.build_model)  # doctest: +SKIP
        >>> outputs, blocks = cache.outputs(inputs, ["encoder.layer.0"])  # doctest: +SKIP
    """

    def __init__(self, build_teacher: Callable[[], nn.Module], max_bytes: int = 2 << 30,
                 device: str = "cpu"):
        self._build = build_teacher  # makes the dense model (once, on first use)
        self.device = device  # where the teacher runs (the trials' --device)
        self._teacher: nn.Module | None = None
        self._entries: dict[tuple[str, tuple[str, ...]], tuple[Any, dict]] = {}
        self._bytes = 0
        self.max_bytes = max_bytes  # memory the cached outputs may take
        self.forwards = 0  # forward passes the teacher ran

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self._build().to(self.device).eval()
        return self._teacher

    def outputs(self, inputs: Any, blocks: list[str]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The teacher's outputs on ``inputs`` and the outputs of ``blocks``."""
        key = (_key(inputs), tuple(blocks))
        if key in self._entries:
            return self._entries[key]
        teacher = self.teacher
        with torch.no_grad(), capture_blocks(teacher, blocks) as found:
            out = call_model(teacher, _to_device(inputs, _model_device(teacher)))
        self.forwards += 1
        entry = (out, dict(found))
        size = _size(out) + _size(list(found.values()))
        if self._bytes + size <= self.max_bytes:
            self._entries[key] = entry
            self._bytes += size
        return entry
