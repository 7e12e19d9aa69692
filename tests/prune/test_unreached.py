"""`autoprune layers` names the op or module that keeps a layer out of the dependency graph."""

import torch
from torch import nn

from autoprune.prune import inspect_model


class Detours(nn.Module):
    """One layer for each way of escaping Torch-Pruning's autograd-based graph."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.gate = nn.Linear(8, 8)  # its output only steers an argmax
        self.frozen = nn.Linear(8, 8)  # called under no_grad
        self.tied = nn.Linear(8, 8)  # its weight used through F.linear, the module never called
        self.spare = nn.Linear(8, 8)  # never used
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        index = self.gate(h).argmax(-1, keepdim=True)
        with torch.no_grad():
            frozen = self.frozen(h)
        tied = nn.functional.linear(h, self.tied.weight)
        return self.head(h + tied + frozen) + index


def test_each_unreached_layer_names_what_stopped_it():
    torch.manual_seed(0)
    model = Detours().eval()
    info = inspect_model(model, (torch.randn(1, 4),))
    reasons = {u.name: u.reason for u in info.unprunable}
    assert [g.name for g in info.groups] == ["body"]
    assert reasons["head"].startswith("model output layer")
    assert reasons["gate"] == (
        "not reached by the dependency graph: its output reaches the model's outputs only "
        "through Tensor.argmax, which has no gradient (Torch-Pruning follows autograd)")
    assert reasons["frozen"].startswith(
        "not reached by the dependency graph: its output has no gradient (computed under "
        "torch.no_grad()")
    assert reasons["tied"] == (
        "not reached by the dependency graph: never called as a module: its weight is used "
        "directly by torch.nn.functional.linear; call the module instead")
    assert reasons["spare"] == ("not reached by the dependency graph: never called in forward "
                                "on the example inputs (unused, or skipped by a branch)")


def test_residual_writers_of_a_headless_model_are_output_layers():
    """A residual width that is the model's output width (as in a headless encoder)."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.a(x)
            return torch.layer_norm(x + self.c(torch.relu(self.b(x))), (8,))

    info = inspect_model(Residual().eval(), (torch.randn(2, 8),))
    assert [g.name for g in info.groups] == ["b"]
    assert {u.name: u.reason.split(":")[0] for u in info.unprunable} == {
        "a": "model output layer", "c": "model output layer"}


def test_a_layer_tied_to_an_output_layer_names_it():
    # A depthwise conv ties its inputs to its outputs, which are the model's outputs.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8)).eval()
    info = inspect_model(model, (torch.randn(1, 3, 8, 8),))
    assert info.groups == []
    assert {u.name: u.reason for u in info.unprunable}["0"] == (
        "its output channels are tied to those of 2, a model output layer: removing them would "
        "change the model's outputs")


def test_layers_inside_a_module_pruned_as_one_unit_are_not_listed():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 32)
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.head((self.mha(h, h, h, need_weights=False)[0] + h).mean(1))

    info = inspect_model(WithMHA().eval(), (torch.randn(1, 5, 8),))
    assert "mha" in info.group("inp").coupled  # Torch-Pruning prunes it whole, out_proj included
    assert [u.name for u in info.unprunable] == ["head"]
