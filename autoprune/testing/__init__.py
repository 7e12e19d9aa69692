"""Tiny models and helpers for tests, examples and benchmarks."""

from autoprune.testing.models import (
    DenseNetCNN,
    MobileNetCNN,
    ResNetCNN,
    ResNeXtCNN,
    SelfAttention,
    TransformerEncoder,
    create_test_model,
    list_test_models,
    register_test_model,
)

__all__ = [
    "DenseNetCNN",
    "MobileNetCNN",
    "ResNetCNN",
    "ResNeXtCNN",
    "SelfAttention",
    "TransformerEncoder",
    "create_test_model",
    "list_test_models",
    "register_test_model",
]
