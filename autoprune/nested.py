"""Tensors inside the nested outputs models return (tuples, lists, dicts, ModelOutputs)."""

from __future__ import annotations

import torch

__all__ = ["tensors"]


def tensors(obj: object) -> list[torch.Tensor]:
    """The tensors in a nest of tuples, lists and dicts (e.g. a `transformers` ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors(o)]
    return []
