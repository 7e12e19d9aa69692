"""``--device``: where a trial's calibration, reconstruction, fine-tuning and evaluation run.

Latency is not measured here: it is always the exported ONNX model on the latency target.
"""

from __future__ import annotations

import re

import torch

from autoprune.errors import UsageError

__all__ = ["resolve_device"]

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | None = "auto") -> str:
    """The torch device ``spec`` names, checked against this machine: ``auto`` (a GPU when
    torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UsageError: an unknown name, or a GPU torch does not see (the message names it).

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise UsageError(f"--device {spec!r} is not a device; use {CHOICES}")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        raise UsageError(f"--device {spec}: torch sees no GPU on this machine ({why}, torch "
                         f"{torch.__version__}); use --device cpu or --device auto")
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {spec}: torch sees {count} GPU(s), cuda:0 to "
                         f"cuda:{count - 1}")
    return f"cuda:{index}"
