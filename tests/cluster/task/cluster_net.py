"""The model of the cluster test task, in a module beside the task file (it travels with it)."""

from __future__ import annotations

import torch

from autoprune.testing import create_test_model


def build_net() -> torch.nn.Module:
    """The architecture, untrained."""
    return create_test_model("resnet_tiny", image_size=16)

