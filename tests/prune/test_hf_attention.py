"""Hugging Face attention: whole heads removed, head attributes updated, ONNX Runtime agrees.

Tiny random-init BertModel, RobertaModel, DistilBertModel and ViTModel built from configs (no
download):
2 layers, hidden 48, 6 heads of 8, FFN 96.
"""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from autoprune.latency import export_onnx  # noqa: E402
from autoprune.plan import LayerRule, PruningPlan  # noqa: E402
from autoprune.prune import apply_plan, count_kept, inspect_model  # noqa: E402

HEADS, HEAD_DIM, FFN, LAYERS = 6, 8, 96, 2
HIDDEN = HEADS * HEAD_DIM


def _bert(cls=None, **kw):
    config = transformers.BertConfig(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=FFN, **kw)
    return (cls or transformers.BertModel)(config), (torch.randint(0, 128, (1, 8)),)


def _roberta():
    config = transformers.RobertaConfig(vocab_size=128, hidden_size=HIDDEN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        intermediate_size=FFN)
    return transformers.RobertaModel(config), (torch.randint(3, 128, (1, 8)),)


def _distilbert():
    config = transformers.DistilBertConfig(vocab_size=128, dim=HIDDEN, n_layers=LAYERS,
                                           n_heads=HEADS, hidden_dim=FFN)
    return transformers.DistilBertModel(config), (torch.randint(0, 128, (1, 8)),)


def _vit():
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=HIDDEN,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    intermediate_size=FFN)
    return transformers.ViTModel(config), (torch.randn(1, 3, 16, 16),)


# family: (builder, attention module class, its head-count attribute, q/k/v names, FFN-in name)
FAMILIES = {
    "bert": (_bert, "BertSelfAttention", "num_attention_heads", ("query", "key", "value"),
             "intermediate.dense"),
    "roberta": (_roberta, "RobertaSelfAttention", "num_attention_heads",
                ("query", "key", "value"), "intermediate.dense"),
    "distilbert": (_distilbert, "DistilBertSelfAttention", "n_heads", ("q_lin", "k_lin", "v_lin"),
                   "ffn.lin1"),
    "vit": (_vit, "ViTAttention", "num_attention_heads", ("q_proj", "k_proj", "v_proj"),
            "mlp.fc1"),
}


def _model(family):
    torch.manual_seed(0)
    model, inputs = FAMILIES[family][0]()
    return model.eval(), inputs


def _attention(model, family):
    return [m for m in model.modules() if type(m).__name__ == FAMILIES[family][1]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_head_group_and_one_ffn_group_per_layer(family):
    model, inputs = _model(family)
    info = inspect_model(model, inputs)
    heads = [g for g in info.groups if g.num_heads]
    ffn = [g for g in info.groups if not g.num_heads]
    assert [(g.num_heads, g.channels, len(g.head_owners)) for g in heads] == [
        (HEADS, HIDDEN, 1)] * LAYERS
    assert [g.channels for g in ffn] == [FFN] * LAYERS
    assert all(g.name.endswith(FAMILIES[family][4]) for g in ffn)
    # q, k and v of one layer are one group; the output projection loses inputs only.
    qkv = FAMILIES[family][3]
    assert all(sorted(p.rsplit(".", 1)[1] for p in g.producers) == sorted(qkv) for g in heads)
    # The hidden width is the encoder's output width: listed as such, never pruned.
    assert info.hidden == []
    assert sum("model output layer" in u.reason for u in info.unprunable) >= 2 * LAYERS
    assert f"{HEADS} heads" in info.table()


@pytest.mark.parametrize("sparsity", [0.1, 0.35, 0.6, 0.9])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_structured_plans_keep_whole_heads_and_match_onnx_runtime(family, sparsity):
    model, inputs = _model(family)
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), inputs)
    heads = count_kept(HEADS, sparsity)
    assert heads == {0.1: 5, 0.35: 4, 0.6: 2, 0.9: 1}[sparsity]
    _, _, attr, qkv, ffn_name = FAMILIES[family]
    for attn in _attention(pruned, family):
        assert getattr(attn, attr) == heads and isinstance(getattr(attn, attr), int)
        assert [getattr(attn, n).out_features for n in qkv] == [heads * HEAD_DIM] * 3
        if family in ("bert", "roberta"):
            assert attn.all_head_size == heads * HEAD_DIM
    ffn = [m for n, m in pruned.named_modules() if n.endswith(ffn_name)]
    assert [m.out_features for m in ffn] == [count_kept(FFN, sparsity)] * LAYERS
    dense_out, out = model(*inputs)[0], pruned(*inputs)[0]
    assert out.shape == dense_out.shape  # the hidden width is left alone
    result = export_onnx(pruned, inputs)
    assert result.ok and result.max_abs_diff < 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_heads_removed_are_whole_heads(family):
    """Heads 1 and 4 zeroed in every layer are the ones removed, and removing them leaves the
    model's output unchanged: head indices and the updated head counts line up."""
    model, inputs = _model(family)
    info = inspect_model(model, inputs)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group in (g for g in info.groups if g.num_heads):
            for name in group.coupled:
                layer = modules[name]
                if not isinstance(layer, torch.nn.Linear):
                    continue
                for h in (1, 4):
                    cut = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                    if name in group.producers:
                        layer.weight[cut] = 0
                        layer.bias[cut] = 0
                    else:
                        layer.weight[:, cut] = 0
    plan = PruningPlan(rules={g.name: LayerRule("structured", 0.35)
                              for g in info.groups if g.num_heads})
    pruned = apply_plan(model, plan, inputs)
    assert {getattr(a, FAMILIES[family][2]) for a in _attention(pruned, family)} == {4}
    torch.testing.assert_close(pruned(*inputs)[0], model(*inputs)[0], atol=1e-5, rtol=1e-4)


def test_hidden_width_of_a_classifier_is_pruned_only_by_a_rule_naming_it():
    torch.manual_seed(0)
    model, inputs = _bert(transformers.BertForSequenceClassification, num_labels=3)
    model.eval()
    info = inspect_model(model, inputs)
    assert [g.name for g in info.hidden] == ["bert.encoder.layer.1.output.dense"]
    assert "hidden width, pruned only by a rule naming it" in info.table()
    query = "bert.encoder.layer.0.attention.self.query"
    uniform = dict(apply_plan(model, PruningPlan.uniform(0.5), inputs).named_modules())
    assert (uniform[query].in_features, uniform[query].out_features) == (HIDDEN, 3 * HEAD_DIM)
    plan = PruningPlan(rules={"bert.encoder.layer.1.output.dense": LayerRule("structured", 0.25)})
    pruned = apply_plan(model, plan, inputs)
    layers = dict(pruned.named_modules())
    assert (layers[query].in_features, layers[query].out_features) == (36, HIDDEN)
    assert layers["bert.embeddings.word_embeddings"].embedding_dim == 36
    assert pruned(*inputs).logits.shape == (1, 3)
    assert export_onnx(pruned, inputs).ok


def test_import_autoprune_does_not_import_transformers():
    code = ("import sys, autoprune, autoprune.prune, autoprune.testing, autoprune.latency; "
            "print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"
