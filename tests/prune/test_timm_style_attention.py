"""timm-style attention (fused ``qkv``, ``proj``, output reshaped to the input width): its
heads and the width around it are left whole, with the reason, and every plan still runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.latency import export_onnx
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan, count_kept, inspect_model

DIM, HEADS, FFN = 32, 4, 64


class Attention(nn.Module):
    """timm's layout: one fused qkv projection, proj, ``reshape(B, N, C)`` to the input width."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), Attention(DIM, HEADS)
        self.norm2, self.fc1 = nn.LayerNorm(DIM), nn.Linear(DIM, FFN)
        self.fc2 = nn.Linear(FFN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.blocks = nn.Linear(8, DIM), nn.Sequential(Block(), Block())
        self.head = nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def _net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 6, 8),)


def test_heads_and_width_left_whole_and_layers_says_why():
    model, inputs = _net()
    info = inspect_model(model, inputs)
    assert [g.name for g in info.groups] == ["blocks.0.fc1", "blocks.1.fc1"]
    reasons = {u.name: u.reason for u in info.unprunable}
    assert "reshapes its heads' output to its input width" in reasons["blocks.0.attn"]
    assert "heads left whole" in reasons["blocks.1.attn"]
    for name in ("embed", "blocks.0.fc2", "blocks.1.fc2"):
        assert "whose forward reshapes its output to that width" in reasons[name]


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_every_plan_runs_and_matches_onnx_runtime(sparsity):
    model, inputs = _net()
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), inputs)
    for block in pruned.blocks:
        assert (block.attn.num_heads, block.attn.qkv.out_features) == (HEADS, 3 * DIM)
        assert block.fc1.out_features == count_kept(FFN, sparsity)
    assert pruned(*inputs).shape == (1, 5)
    result = export_onnx(pruned, inputs)
    assert result.ok and result.max_abs_diff < 1e-4
