"""Layer-wise reconstruction: each refit layer, and each block, ends closer to the dense model."""

import copy

import pytest
import torch

from autoprune.fingerprint import architecture_signature
from autoprune.plan import LayerRule, PruningPlan
from autoprune.prune import prune_model_
from autoprune.recover import capture_blocks, main_blocks, reconstruct_
from autoprune.testing import create_test_model


def _batches(make, n=6, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(make(batch, g), None) for _ in range(n)]


def _block_errors(model, dense, blocks, batches):
    """Per block: squared error of its output against the dense block's, relative."""
    errors = dict.fromkeys(blocks, 0.0)
    norms = dict.fromkeys(blocks, 0.0)
    with torch.no_grad():
        for inputs, _ in batches:
            with capture_blocks(model, blocks) as got, capture_blocks(dense, blocks) as want:
                model(inputs), dense(inputs)
            for b in blocks:
                errors[b] += (got[b] - want[b]).square().sum().item()
                norms[b] += want[b].square().sum().item()
    return {b: errors[b] / norms[b] for b in blocks}


def test_reconstruction_lowers_every_refit_layer_and_the_output_error_of_a_tiny_cnn():
    torch.manual_seed(0)
    dense = create_test_model("resnet_tiny").eval()
    inputs = dense.example_inputs()
    batches = _batches(lambda b, g: torch.randn(b, *inputs[0].shape[1:], generator=g))
    pruned = copy.deepcopy(dense)
    report = prune_model_(pruned, PruningPlan.uniform(0.5, criterion="l2"), inputs)
    before = copy.deepcopy(pruned)
    result = reconstruct_(pruned, dense, report.kept_in, report.kept_out, batches)

    # every layer whose inputs were pruned was refit, and is closer to the dense layer
    assert {f.name for f in result.fits} == set(report.kept_in)
    assert result.samples == 96 and not result.skipped
    for fit in result.fits:
        assert fit.error_after < 0.7 * fit.error_before, fit
    assert sum(f.error_after for f in result.fits) < 0.6 * sum(f.error_before for f in result.fits)
    # the model's outputs too, on samples it was not fitted on
    test = torch.randn(64, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = dense(test)
        err_before = (before(test) - want).square().mean().item()
        err_after = (pruned(test) - want).square().mean().item()
    assert err_after < 0.5 * err_before
    # folded into ordinary weights: same architecture as the pruned model, nothing attached
    assert architecture_signature(pruned) == architecture_signature(before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pruned.modules())


def test_reconstruction_lowers_each_block_output_error_of_a_tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=3,
                                     num_attention_heads=6, intermediate_size=96)
    torch.manual_seed(0)
    dense = transformers.BertModel(config).eval()
    batches = _batches(lambda b, g: torch.randint(0, 128, (b, 12), generator=g), n=8)
    pruned = copy.deepcopy(dense)
    report = prune_model_(pruned, PruningPlan.uniform(0.5, criterion="l2"), (batches[0][0],))
    blocks = main_blocks(dense)
    assert blocks == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    held = _batches(lambda b, g: torch.randint(0, 128, (b, 12), generator=g), n=4, seed=5)
    before = _block_errors(pruned, dense, blocks, held)
    result = reconstruct_(pruned, dense, report.kept_in, report.kept_out, batches)
    after = _block_errors(pruned, dense, blocks, held)
    # the attention output and FFN down projections of every layer were refit
    assert sorted(f.name for f in result.fits) == sorted(
        f"encoder.layer.{i}.{p}.dense" for i in range(3) for p in ("attention.output", "output"))
    for b in blocks:
        assert after[b] < 0.8 * before[b], (b, before[b], after[b])


def test_a_refit_never_makes_a_layer_worse_on_held_back_samples_and_masked_layers_are_skipped():
    torch.manual_seed(0)
    dense = create_test_model("resnet_tiny").eval()
    inputs = dense.example_inputs()
    batches = _batches(lambda b, g: torch.randn(b, *inputs[0].shape[1:], generator=g), n=2,
                       batch=4)  # 8 samples: 2 held back, the fit is poor
    plan = PruningPlan(default=LayerRule("structured", 0.5, "l1"),
                       rules={"stages.1.conv1": LayerRule("unstructured", 0.5, "l1")})
    pruned = copy.deepcopy(dense)
    report = prune_model_(pruned, plan, inputs)
    result = reconstruct_(pruned, dense, report.kept_in, report.kept_out, batches)
    assert result.skipped == {
        "stages.1.conv1": "its weights are masked (unstructured) or parametrized"}
    for fit in result.fits:
        assert fit.error_after <= fit.error_before
        assert fit.choice == "keep" or fit.error_after < fit.error_before
