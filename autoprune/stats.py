"""Model statistics: parameters, nonzero parameters, MACs/FLOPs and size, before and after."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["ModelStats", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of a model on one example input.

    Example:
        >>> from autoprune.testing import create_test_model
        >>> m = create_test_model("resnet_tiny")
        >>> model_stats(m, m.example_inputs()).params
        19810
    """

    params: int  # parameters (zeroed ones included)
    nonzero_params: int  # parameters that are not exactly zero (unstructured masks applied)
    macs: int  # multiply-accumulates of one forward pass
    size_bytes: int  # bytes of parameters and buffers as stored (dense fp32 for most models)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzero_params / max(self.params, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops}

    def ratio_to(self, other: ModelStats) -> dict[str, float]:
        """``other / self`` for params, nonzero params, MACs and size (e.g. dense / pruned)."""
        return {
            k: getattr(other, k) / max(getattr(self, k), 1)
            for k in ("params", "nonzero_params", "macs", "size_bytes")
        }


def model_stats(model: nn.Module, example_inputs: tuple) -> ModelStats:
    """Count parameters, nonzeros, MACs (Torch-Pruning's counter) and storage size."""
    import torch_pruning as tp

    from autoprune.prune import baked_copy

    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = baked_copy(model)  # count the effective (masked) weights
    tensors = list(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    size = sum(t.numel() * t.element_size() for t in tensors)
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelStats(
        params=sum(t.numel() for t in tensors),
        nonzero_params=sum(int(torch.count_nonzero(t)) for t in tensors),
        macs=int(macs),
        size_bytes=int(size),
    )
