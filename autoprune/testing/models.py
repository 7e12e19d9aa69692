"""Tiny registered models for tests, examples and benchmarks.

Each model has ``example_inputs()`` returning the tuple of tensors it is called with, so
pruning, export and latency code never has to guess input shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ResNetCNN",
    "MobileNetCNN",
    "ResNeXtCNN",
    "DenseNetCNN",
    "TransformerEncoder",
    "SelfAttention",
    "register_test_model",
    "create_test_model",
    "list_test_models",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_test_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model factory under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def create_test_model(name: str, **kwargs) -> nn.Module:
    """Build a registered test model by name, e.g. ``create_test_model("resnet_tiny")``."""
    if name not in _MODELS:
        raise KeyError(f"unknown test model {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)


def list_test_models() -> list[str]:
    return sorted(_MODELS)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Residual CNN for small images (one block per stage, stride 2 between stages).

    Example:
        >>> model = ResNetCNN(widths=(8, 16, 32))
        >>> model(*model.example_inputs()).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks_per_stage: int = 1,
        image_size: int = 32,
    ):
        super().__init__()
        self.in_channels = in_channels  # input channels, for example_inputs()
        self.image_size = image_size  # input height and width, for example_inputs()
        self.stem = _conv_bn(in_channels, widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stages.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        shape = (batch, self.in_channels, self.image_size, self.image_size)
        return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, max(channels // reduction, 4), 1)
        self.fc2 = nn.Conv2d(max(channels // reduction, 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.fc2(s))


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.use_residual else out


class MobileNetCNN(nn.Module):
    """MobileNet-style CNN with depthwise convolutions and squeeze-excitation.

    Example:
        >>> model = MobileNetCNN()
        >>> model(*model.example_inputs()).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 24, 32),
        image_size: int = 32,
        expand: int = 4,
    ):
        super().__init__()
        self.in_channels = in_channels  # input channels, for example_inputs()
        self.image_size = image_size  # input height and width, for example_inputs()
        self.stem = _conv_bn(in_channels, widths[0], 3, 1)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(InvertedResidual(cin, w, 2 if i > 0 else 1, expand))
            blocks.append(InvertedResidual(w, w, 1, expand))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, cin * 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        shape = (batch, self.in_channels, self.image_size, self.image_size)
        return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck: 1x1 reduce, grouped 3x3, 1x1 expand, squeeze-excite, shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, width: int, groups: int):
        super().__init__()
        self.reduce = _conv_bn(cin, width, 1)
        self.grouped = _conv_bn(width, width, 3, stride, groups=groups)
        self.expand = nn.Sequential(nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.se = SqueezeExcite(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.expand(self.grouped(self.reduce(x))))
        return torch.relu(out + self.shortcut(x))


class ResNeXtCNN(nn.Module):
    """ResNeXt-style CNN: bottleneck blocks with grouped 3x3 convolutions and squeeze-excite.

    Example:
        >>> model = ResNeXtCNN()
        >>> model(*model.example_inputs()).shape
        torch.Size([1, 10])
        >>> model.stages[0].grouped[0].groups
        4
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64),
        groups: int = 4,
        bottleneck: float = 0.5,
        image_size: int = 32,
    ):
        super().__init__()
        self.in_channels = in_channels  # input channels, for example_inputs()
        self.image_size = image_size  # input height and width, for example_inputs()
        self.stem = _conv_bn(in_channels, widths[0] // 2)
        blocks, cin = [], widths[0] // 2
        for i, w in enumerate(widths):
            blocks.append(ResNeXtBlock(cin, w, 2 if i > 0 else 1, int(w * bottleneck), groups))
            cin = w
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        shape = (batch, self.in_channels, self.image_size, self.image_size)
        return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.conv = _conv_bn(cin, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], dim=1)


class DenseNetCNN(nn.Module):
    """DenseNet-style CNN: each layer concatenates its output to its input.

    Example:
        >>> model = DenseNetCNN()
        >>> model(*model.example_inputs()).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stem: int = 16,
        growth: int = 16,
        layers_per_block: int = 3,
        blocks: int = 2,
        image_size: int = 32,
    ):
        super().__init__()
        self.in_channels = in_channels  # input channels, for example_inputs()
        self.image_size = image_size  # input height and width, for example_inputs()
        self.stem = _conv_bn(in_channels, stem)
        feats, c = [], stem
        for b in range(blocks):
            for _ in range(layers_per_block):
                feats.append(DenseLayer(c, growth))
                c += growth
            if b < blocks - 1:
                feats.append(_conv_bn(c, c // 2, 1))  # transition: halve channels ...
                feats.append(nn.AvgPool2d(2))  # ... and resolution
                c //= 2
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.stem(x)))
        return self.fc(torch.flatten(x, 1))

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        shape = (batch, self.in_channels, self.image_size, self.image_size)
        return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    ``num_heads`` is a Python int used in ``forward``; structured pruning of heads updates it
    (see ``autoprune.prune``), as it must for Hugging Face-style attention modules.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads  # current number of heads (updated by head pruning)
        self.head_dim = dim // num_heads  # per-head width (never pruned)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(p: torch.Tensor) -> torch.Tensor:
            return p.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
        ctx = (attn @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TransformerEncoder(nn.Module):
    """Small pre-norm transformer encoder over a sequence of feature vectors.

    Example:
        >>> model = TransformerEncoder()
        >>> model(*model.example_inputs()).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 16,
        dim: int = 64,
        num_heads: int = 4,
        depth: int = 2,
        seq_len: int = 16,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.in_features = in_features  # features per token, for example_inputs()
        self.seq_len = seq_len  # tokens per sequence, for example_inputs()
        self.embed = nn.Linear(in_features, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.layers = nn.Sequential(
            *[EncoderLayer(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(1))

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, self.seq_len, self.in_features, generator=g),)


@register_test_model
def resnet_tiny(**kw) -> nn.Module:
    return ResNetCNN(**{"widths": (8, 16, 32), **kw})


@register_test_model
def resnet_1m(**kw) -> nn.Module:
    """The ~1.1 M-parameter residual CNN used by the digits task and the benchmarks."""
    return ResNetCNN(**{"widths": (32, 64, 128, 224), **kw})


@register_test_model
def mobilenet_tiny(**kw) -> nn.Module:
    return MobileNetCNN(**kw)


@register_test_model
def resnext_tiny(**kw) -> nn.Module:
    return ResNeXtCNN(**kw)


@register_test_model
def resnext_1m(**kw) -> nn.Module:
    """A ~1.1 M-parameter ResNeXt-style CNN (grouped 3x3 convolutions, 8 groups), benchmarks."""
    return ResNeXtCNN(**{"widths": (64, 128, 256, 576), "groups": 8, "bottleneck": 0.75, **kw})


@register_test_model
def densenet_tiny(**kw) -> nn.Module:
    return DenseNetCNN(**kw)


@register_test_model
def transformer_tiny(**kw) -> nn.Module:
    return TransformerEncoder(**kw)
