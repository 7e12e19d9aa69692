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


def _low_rank_bert():
    """A tiny BERT whose token embeddings span 8 of 48 dimensions: its hidden states are
    correlated, as a pretrained model's are, so a layer's inputs can predict drift (in a
    random BERT with full-rank embeddings they cannot)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=3,
                                     num_attention_heads=6, intermediate_size=96)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        e = model.embeddings
        e.word_embeddings.weight.copy_(torch.randn(128, 8) @ torch.randn(8, 48) / 8 ** 0.5)
        e.position_embeddings.weight.zero_()
        e.token_type_embeddings.weight.zero_()
    return model


def _norm_input_errors(model, dense, names, batches):
    """Per LayerNorm: squared error of its input against the dense model's, relative."""
    def grab(m, found):
        mods = dict(m.named_modules())
        return [mods[n].register_forward_pre_hook(
            lambda _m, args, n=n: found.setdefault(n, []).append(args[0])) for n in names]

    got, want = {}, {}
    handles = grab(model, got) + grab(dense, want)
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs), dense(inputs)
    for h in handles:
        h.remove()
    return {n: sum((g - w).square().sum().item() for g, w in zip(got[n], want[n]))
            / sum(w.square().sum().item() for w in want[n]) for n in names}


def test_layers_that_feed_a_residual_norm_absorb_the_residual_drift(monkeypatch):
    import autoprune.recover._reconstruct as reconstruct_module

    dense = _low_rank_bert()
    batches = _batches(lambda b, g: torch.randint(0, 128, (b, 12), generator=g), n=8)
    held = _batches(lambda b, g: torch.randint(0, 128, (b, 12), generator=g), n=4, seed=5)
    pruned = copy.deepcopy(dense)
    report = prune_model_(pruned, PruningPlan.uniform(0.5, criterion="l2"), (batches[0][0],))
    plain = copy.deepcopy(pruned)

    result = reconstruct_(pruned, dense, report.kept_in, report.kept_out, batches)
    # both projections of every layer add to the residual stream right before a LayerNorm
    assert len(result.fits) == 6 and all(f.residual for f in result.fits)
    monkeypatch.setattr(reconstruct_module, "_is_norm", lambda m: False)
    result = reconstruct_(plain, dense, report.kept_in, report.kept_out, batches)
    assert not any(f.residual for f in result.fits)

    # the norms' inputs (residual stream plus the layer's output) match the dense model better
    norms = [f.name.replace("dense", "LayerNorm") for f in result.fits]
    residual, local = (_norm_input_errors(m, dense, norms, held) for m in (pruned, plain))
    assert residual[norms[0]] == pytest.approx(local[norms[0]], rel=1e-3)  # no drift yet
    for name in norms[1:]:
        assert residual[name] < 0.9 * local[name], (name, residual[name], local[name])
    assert sum(residual.values()) < 0.8 * sum(local.values())


class _Squashed(torch.nn.Module):
    """A layer whose output passes a nonlinearity before the norm: no residual fit."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.tanh(self.b(torch.relu(self.a(x)))) + x)


def test_a_layer_whose_output_is_not_simply_added_before_the_norm_keeps_its_own_target():
    torch.manual_seed(0)
    dense = _Squashed().eval()
    batches = _batches(lambda b, g: torch.randn(b, 8, generator=g), n=4)
    pruned = copy.deepcopy(dense)
    report = prune_model_(pruned, PruningPlan.uniform(0.5, criterion="l2"), (batches[0][0],))
    assert report.kept_in == {"b": report.kept_in["b"]} and len(report.kept_in["b"]) == 8
    result = reconstruct_(pruned, dense, report.kept_in, report.kept_out, batches)
    assert [(f.name, f.residual) for f in result.fits] == [("b", False)]
    assert result.fits[0].error_after < result.fits[0].error_before
