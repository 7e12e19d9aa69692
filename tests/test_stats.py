import torch

from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan
from autoprune.stats import model_stats
from autoprune.testing import create_test_model


def test_stats_before_and_after_pruning():
    torch.manual_seed(0)
    model = create_test_model("resnet_tiny").eval()
    x = model.example_inputs()
    dense = model_stats(model, x)
    bn_biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert dense.params == 19810 and dense.nonzero_params == 19810 - bn_biases  # zero-init
    assert dense.size_bytes >= 4 * dense.params
    assert dense.flops == 2 * dense.macs > 0

    unstructured = model_stats(apply_plan(model, PruningPlan.uniform(0.5, "unstructured"), x), x)
    assert unstructured.params == dense.params and unstructured.macs == dense.macs
    zeroed = dense.nonzero_params - unstructured.nonzero_params
    conv_fc = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert abs(zeroed - conv_fc / 2) <= 8  # half of every conv/linear weight, rounded per layer

    structured = model_stats(apply_plan(model, PruningPlan.uniform(0.5), x), x)
    assert structured.params == 5142 and structured.size_bytes < dense.size_bytes / 3
    assert dense.ratio_to(structured)["macs"] < 0.4
