"""Architecture signatures: what a model's shapes are, independent of its weight values.

Plans record the signature of the model they were made for (so applying a plan to another
model fails with a message naming the first layer that differs), and latency results are
cached by the signature of the pruned model (latency does not depend on weight values).
"""

from __future__ import annotations

import hashlib

from torch import nn

__all__ = ["architecture_signature", "signature_digest", "first_difference"]


def architecture_signature(model: nn.Module) -> list[str]:
    """One ``"name:Type:shape,shape"`` entry per module that owns parameters or buffers.

    Example:
        >>> from autoprune.testing import create_test_model
        >>> architecture_signature(create_test_model("resnet_tiny"))[0]
        'stem.0:Conv2d:8x1x3x3'
    """
    entries = []
    for name, module in model.named_modules():
        tensors = [
            t
            for _, t in list(module.named_parameters(recurse=False))
            + list(module.named_buffers(recurse=False))
            if t is not None and t.dim() > 0
        ]
        if not tensors and not _int_attrs(module):
            continue
        shapes = ",".join("x".join(str(d) for d in t.shape) for t in tensors)
        extra = "".join(f";{k}={v}" for k, v in _int_attrs(module))
        entries.append(f"{name or '<root>'}:{type(module).__name__}:{shapes}{extra}")
    return entries


def _int_attrs(module: nn.Module) -> list[tuple[str, int]]:
    # Head counts change the computation without changing any parameter shape.
    return [(k, getattr(module, k)) for k in ("num_heads", "groups")
            if isinstance(getattr(module, k, None), int)]


def signature_digest(model_or_signature: nn.Module | list[str]) -> str:
    """A short stable hash of :func:`architecture_signature`."""
    sig = (
        architecture_signature(model_or_signature)
        if isinstance(model_or_signature, nn.Module)
        else model_or_signature
    )
    return hashlib.sha256("\n".join(sig).encode()).hexdigest()[:16]


def first_difference(expected: list[str], actual: list[str]) -> str | None:
    """Describe the first entry where two signatures differ, or None if they are equal."""
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e != a:
            return f"layer #{i}: plan expects {e!r}, model has {a!r}"
    if len(expected) != len(actual):
        n = min(len(expected), len(actual))
        extra = (expected if len(expected) > n else actual)[n]
        who = "plan expects" if len(expected) > n else "model has"
        return (f"layer #{n}: {who} an extra layer {extra!r} ({len(expected)} vs "
                f"{len(actual)} layers)")
    return None
