"""GPT-2's ``Conv1D`` (a linear layer with its weight stored transposed) as ``nn.Linear``.

Torch-Pruning and its importance scorers know ``nn.Linear`` but not ``transformers``'
``Conv1D``, so GPT-2-family models are converted once, explicitly, before they are inspected
or pruned. The converted model computes the same outputs; its ``state_dict`` stores the weights
as ``nn.Linear`` does (out x in).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv1d_to_linear_", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (checked without importing transformers)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def conv1d_to_linear_(model: nn.Module) -> nn.Module:
    """Replace every ``Conv1D`` of ``model`` by an ``nn.Linear`` computing the same; in place.

    Example:
        >>> import transformers
        >>> config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)
        >>> model = conv1d_to_linear_(transformers.GPT2Model(config))
        >>> model.h[0].attn.c_attn
        Linear(in_features=32, out_features=96, bias=True)
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not is_conv1d(child):
                continue
            weight = child.weight  # in x out
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=child.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(parent, name, linear)
    return model
