"""Each criterion removes the channels that its definition, computed here independently of
Torch-Pruning and of autoprune, scores lowest: a criterion that fell back to another, or
scored the wrong layers, removes other channels."""

import pytest
import torch
from torch import nn

from autoprune.plan import PruningPlan
from autoprune.prune import prune_model_

WIDTH, REMOVED = 8, 4  # hidden channels of the tiny model, and how many 50 % removes


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, WIDTH, bias=False)
        self.fc2 = nn.Linear(WIDTH, 3, bias=False)

    def hidden(self, x):
        return torch.relu(self.fc1(x))

    def forward(self, x):
        return self.fc2(self.hidden(x))


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, WIDTH, 1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTH)
        self.conv2 = nn.Conv2d(WIDTH, 3, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _mlp():
    torch.manual_seed(5)  # a seed where the definitions choose five different sets
    return _MLP().eval()


def _batches(n=8, batch=64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 5, generator=g), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n)]


def _removed(model, criterion, batches):
    """The hidden channels ``criterion`` removes at 50 % (matched by fc1's surviving rows)."""
    dense_rows = model.fc1.weight.detach().clone()
    prune_model_(model, PruningPlan.uniform(0.5, criterion=criterion), (batches[0][0][:1],),
                 calibration=batches, loss_fn=nn.functional.cross_entropy)
    kept = {int((dense_rows - row).abs().sum(1).argmin()) for row in model.fc1.weight.detach()}
    assert len(kept) == WIDTH - REMOVED
    return set(range(WIDTH)) - kept


def _lowest(scores):
    return set(torch.argsort(scores)[:REMOVED].tolist())


# Channel j's weights: fc1's row j (it writes channel j) and fc2's column j (it reads it).
def _rows(m):
    return [m.fc1.weight.detach(), m.fc2.weight.detach().T]


def _magnitude(m, p):
    return sum(w.abs().pow(p).sum(1) for w in _rows(m))


def _taylor(m, batches):
    m.zero_grad()
    for x, y in batches:
        nn.functional.cross_entropy(m(x), y).backward()
    grads = [m.fc1.weight.grad, m.fc2.weight.grad.T]
    return sum((w * g).abs().sum(1) for w, g in zip(_rows(m), grads))


def _fpgm(m):
    # distance of each channel's weights to all others' (Torch-Pruning's variant compares the
    # squared magnitudes |w|^2 of the filters)
    return sum(torch.cdist(w.square(), w.square()).sum(0) for w in _rows(m))


def _lamp(m):
    # LAMP's score (Lee et al. 2021): a channel's squared norm over the sum of those not
    # smaller, over the group's channels; it orders them like l2, a plan's ratio per group
    # never compares it across layers
    s = _magnitude(m, 2)
    order = torch.argsort(s)
    score = torch.empty_like(s)
    score[order] = s[order] / s[order].flip(0).cumsum(0).flip(0)
    return score


def _activation(m, batches):
    # E[x_j^2] at fc2's input times ||fc2[:, j]||^2
    with torch.no_grad():
        h = torch.cat([m.hidden(x) for x, _ in batches])
    return h.square().mean(0) * m.fc2.weight.detach().square().sum(0)


def _fisher(m, batches):
    # the expected squared gradient of a mask on channel j of sum(outputs * noise), per
    # sample: sum over samples of x_j^2 * ||fc2[:, j]||^2 (its expectation over the noise)
    with torch.no_grad():
        h = torch.cat([m.hidden(x) for x, _ in batches])
    return h.square().sum(0) * m.fc2.weight.detach().square().sum(0)


EXPECTED = {
    "l1": lambda m, b: _magnitude(m, 1),
    "l2": lambda m, b: _magnitude(m, 2),
    "taylor": _taylor,
    "fpgm": lambda m, b: _fpgm(m),
    "lamp": lambda m, b: _lamp(m),
    "activation": _activation,
    "fisher": _fisher,
}


@pytest.mark.parametrize("criterion", sorted(EXPECTED))
def test_each_criterion_removes_what_its_definition_scores_lowest(criterion):
    batches = _batches()
    expected = _lowest(EXPECTED[criterion](_mlp(), batches))
    assert _removed(_mlp(), criterion, batches) == expected


def test_the_definitions_disagree_so_a_fallback_would_be_caught():
    batches = _batches()
    chosen = {name: frozenset(_lowest(fn(_mlp(), batches))) for name, fn in EXPECTED.items()}
    # activation and fisher agree on an MLP (both weigh E[x_j^2] by ||fc2[:, j]||^2), and
    # lamp orders a group like l2
    assert chosen["activation"] == chosen["fisher"] and chosen["lamp"] == chosen["l2"]
    assert len(set(chosen.values())) == 5, chosen


def test_bn_scale_removes_the_smallest_batchnorm_scales():
    torch.manual_seed(0)
    model = _ConvBN().eval()
    gamma = torch.tensor([0.9, -0.05, 0.3, 2.0, -0.2, 0.01, 1.1, 0.6])
    model.bn.weight.data.copy_(gamma)
    x = torch.randn(4, 2, 3, 3)
    dense_rows = model.conv1.weight.detach().flatten(1).clone()
    prune_model_(model, PruningPlan.uniform(0.5, criterion="bn_scale"), (x[:1],))
    kept = {int((dense_rows - r).abs().sum(1).argmin()) for r in model.conv1.weight.flatten(1)}
    assert set(range(WIDTH)) - kept == _lowest(gamma.abs()) == {1, 2, 4, 5}
