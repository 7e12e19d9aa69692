"""Decoder LLMs: grouped-query and fused attention pruned by whole key/value groups.

Tiny random-init Llama, Qwen2, Mistral, Phi-3 and GPT-2 causal LMs built from configs (no
download): 2 layers, hidden 64, 8 query heads of 8, FFN 96; the key/value heads differ per
family.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch_pruning as tp  # noqa: E402

from autoprune.criteria import list_criteria  # noqa: E402
from autoprune.errors import AnalysisError, UsageError  # noqa: E402
from autoprune.latency import export_onnx  # noqa: E402
from autoprune.plan import LayerRule, PruningPlan  # noqa: E402
from autoprune.prune import (  # noqa: E402
    apply_plan,
    conv1d_to_linear_,
    count_kept,
    inspect_model,
)
from autoprune.prune._bounded import bounded_analysis, group_size_limit  # noqa: E402
from autoprune.prune._diagnose import tensors  # noqa: E402
from autoprune.prune._groups import build_groups  # noqa: E402

HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 8, 8, 96, 2, 128
HIDDEN = HEADS * HEAD_DIM

# family: (config class, model class, key/value heads, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", 2, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 2, {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", 4, {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", 4,
             {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}),
}


def _model(family: str, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS):
    config_cls, model_cls, kv_heads, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=FFN,
        use_cache=False, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    return model, (torch.randint(0, VOCAB, (1, 8)),)


def _attention(model):
    return [layer.self_attn for layer in model.model.layers]


def _widths(attn) -> tuple[int, int, int, int]:
    """Output widths of queries, keys and values, and the output projection's input width."""
    if hasattr(attn, "qkv_proj"):
        kv = attn.num_key_value_heads * attn.head_dim
        return attn.qkv_proj.out_features - 2 * kv, kv, kv, attn.o_proj.in_features
    return (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features,
            attn.o_proj.in_features)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_kv_group_unit_and_one_ffn_group_per_layer(family):
    model, inputs = _model(family)
    kv_heads = FAMILIES[family][2]
    start = time.perf_counter()
    info = inspect_model(model, inputs)
    assert time.perf_counter() - start < 10  # it used never to finish
    heads = [g for g in info.groups if g.num_heads]
    ffn = [g for g in info.groups if not g.num_heads]
    assert [(g.num_heads, g.heads_per_unit, g.channels) for g in heads] == [
        (kv_heads, HEADS // kv_heads, HIDDEN)] * LAYERS
    fused = family == "phi3"
    assert [g.name.rsplit(".", 1)[1] for g in heads] == ["qkv_proj" if fused else "q_proj"] * 2
    assert [(g.channels, g.channel_groups) for g in ffn] == [
        (2 * FFN, 2) if fused else (FFN, 1)] * LAYERS
    # The residual width runs into lm_head: listed as hidden, pruned only when named.
    assert [g.channels for g in info.hidden] == [HIDDEN]
    # Every weight matrix has a hidden-width side (the attention units' projections included);
    # only the RMSNorm weights, unwrapped parameters, are not counted.
    assert 0.98 * info.total_params < info.hidden[0].params <= info.total_params
    assert info.hidden[0].flops_share == pytest.approx(1.0)
    assert [u.name for u in info.unprunable] == ["lm_head"]
    assert f"{kv_heads} kv groups of {HEADS // kv_heads} heads" in info.table()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whole_kv_groups_removed_generation_runs_onnx_runtime_agrees(family, sparsity):
    model, inputs = _model(family)
    kv_heads = FAMILIES[family][2]
    group_size = HEADS // kv_heads
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), inputs)
    kept = count_kept(kv_heads, sparsity)
    for attn in _attention(pruned):
        assert attn.num_key_value_groups == group_size and attn.head_dim == HEAD_DIM
        q = kept * group_size * HEAD_DIM
        assert _widths(attn) == (q, kept * HEAD_DIM, kept * HEAD_DIM, q)
    for layer in pruned.model.layers:
        mlp = layer.mlp
        if family == "phi3":  # gate and up lose the same channels
            assert mlp.gate_up_proj.out_features == 2 * mlp.down_proj.in_features
        assert mlp.down_proj.in_features == count_kept(FFN, sparsity)
    logits = pruned(*inputs).logits
    assert logits.shape == model(*inputs).logits.shape == (1, 8, VOCAB)
    generated = pruned.generate(inputs[0], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 16)
    mask = torch.ones_like(inputs[0])
    result = export_onnx(pruned, (inputs[0], mask))
    assert result.ok and result.max_abs_diff < 1e-4


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_the_kv_group_removed_is_the_zeroed_one(family):
    """Key/value group 1 zeroed (its keys, values, the queries sharing them and their
    output-projection inputs) is the one removed, and the output does not change."""
    model, inputs = _model(family)
    kv_heads = FAMILIES[family][2]
    group_size = HEADS // kv_heads
    width = group_size * HEAD_DIM  # query channels per key/value group
    with torch.no_grad():
        for attn in _attention(model):
            q_cut, kv_cut = slice(width, 2 * width), slice(HEAD_DIM, 2 * HEAD_DIM)
            if family == "phi3":
                w = attn.qkv_proj.weight
                w[q_cut] = 0
                w[HIDDEN:][kv_cut] = 0
                w[HIDDEN + kv_heads * HEAD_DIM:][kv_cut] = 0
            else:
                attn.q_proj.weight[q_cut] = 0
                attn.k_proj.weight[kv_cut] = 0
                attn.v_proj.weight[kv_cut] = 0
            attn.o_proj.weight[:, q_cut] = 0
    info = inspect_model(model, inputs)
    sparsity = 1 / kv_heads
    plan = PruningPlan(rules={g.name: LayerRule("structured", sparsity, "l2")
                              for g in info.groups if g.num_heads})
    pruned = apply_plan(model, plan, inputs)
    assert [_widths(a)[1] for a in _attention(pruned)] == [(kv_heads - 1) * HEAD_DIM] * LAYERS
    torch.testing.assert_close(pruned(*inputs).logits, model(*inputs).logits,
                               atol=1e-5, rtol=1e-4)


def _raw_graph(layers: int):
    """Torch-Pruning's own graph of a tiny Llama, rotary embeddings traced op by op."""
    model, inputs = _model("llama", layers=layers, hidden=32, heads=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs,
                                                   output_transform=tensors)
    return model, dg


def test_analysis_that_cannot_finish_stops_and_names_the_module():
    model, dg = _raw_graph(1)
    names = {m: n for n, m in model.named_modules()}
    start = time.perf_counter()
    with pytest.raises(AnalysisError) as err, bounded_analysis(dg, names):
        list(dg.get_all_groups(ignored_layers=[model.lm_head]))
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "did not finish" in message and "model.layers.0.self_attn." in message
    assert f"past {group_size_limit(dg)} entries" in message


def test_the_analysis_bound_is_linear_in_model_size():
    one, two = group_size_limit(_raw_graph(1)[1]), group_size_limit(_raw_graph(2)[1])
    assert 1.5 < two / one < 2.1


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                     n_head=HEADS, n_inner=FFN, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval(), (torch.randint(0, VOCAB, (1, 8)),)


class _Serving(torch.nn.Module):
    """The past_key_values-free forward exported for serving: ids and mask in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_gpt2_conv1d_is_refused_with_the_fix_and_converts_exactly():
    model, inputs = _gpt2()
    with pytest.raises(UsageError, match=r"conv1d_to_linear_\(model\)"):
        inspect_model(model, inputs)
    dense = model(*inputs).logits
    conv1d_to_linear_(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    torch.testing.assert_close(model(*inputs).logits, dense, atol=1e-6, rtol=1e-5)
    info = inspect_model(model, inputs)
    heads = [g for g in info.groups if g.num_heads]
    assert [(g.name, g.num_heads, g.channels) for g in heads] == [
        (f"transformer.h.{i}.attn.c_attn", HEADS, HIDDEN) for i in range(LAYERS)]
    assert [g.channels for g in info.groups if not g.num_heads] == [FFN] * LAYERS


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_gpt2_fused_c_attn_loses_whole_heads_in_each_third(sparsity):
    model, inputs = _gpt2()
    conv1d_to_linear_(model)
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), inputs)
    kept = count_kept(HEADS, sparsity)
    for block in pruned.transformer.h:
        attn = block.attn
        assert (attn.num_heads, attn.split_size) == (kept, kept * HEAD_DIM)
        assert (attn.c_attn.out_features, attn.c_proj.in_features) == (
            3 * kept * HEAD_DIM, kept * HEAD_DIM)
        assert block.mlp.c_fc.out_features == count_kept(FFN, sparsity)
    assert pruned(*inputs).logits.shape == (1, 8, VOCAB)
    generated = pruned.generate(inputs[0], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 16)
    result = export_onnx(_Serving(pruned), (inputs[0], torch.ones_like(inputs[0])))
    assert result.ok and result.max_abs_diff < 1e-4


def test_gpt2_the_zeroed_head_is_removed_from_all_three_thirds():
    model, inputs = _gpt2()
    conv1d_to_linear_(model)
    with torch.no_grad():
        for block in model.transformer.h:
            for third in range(3):
                cut = slice(third * HIDDEN + 2 * HEAD_DIM, third * HIDDEN + 3 * HEAD_DIM)
                block.attn.c_attn.weight[cut] = 0
                block.attn.c_attn.bias[cut] = 0
            block.attn.c_proj.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] = 0
    plan = PruningPlan(rules={f"transformer.h.{i}.attn.c_attn": LayerRule("structured", 1 / 8)
                              for i in range(LAYERS)})
    pruned = apply_plan(model, plan, inputs)
    assert [b.attn.num_heads for b in pruned.transformer.h] == [HEADS - 1] * LAYERS
    torch.testing.assert_close(pruned(*inputs).logits, model(*inputs).logits,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("criterion", list_criteria())
def test_every_criterion_scores_kv_groups(criterion):
    model, inputs = _model("llama")
    targets = torch.randint(0, VOCAB, (1, 8))

    def loss(out, t):
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), t.flatten())

    pruned = apply_plan(model, PruningPlan(default=LayerRule("structured", 0.5, criterion)),
                        inputs, calibration=[(inputs, targets)], loss_fn=loss)
    assert [_widths(a) for a in _attention(pruned)] == [(32, 8, 8, 32)] * LAYERS


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_a_kv_group_removal_is_rebuilt_from_its_root_through_the_graph(family):
    """What apply does: the dependency graph rebuilds the removal from the group's root and
    chosen query channels (key/value group 0), and pruning it leaves a working model."""
    model, inputs = _model(family)
    kv_heads = FAMILIES[family][2]
    width = HEADS // kv_heads * HEAD_DIM
    dg, info = build_groups(model, inputs)
    root = next(g for g in info.groups if g.num_heads).tp_group[0].dep
    dg.get_pruning_group(root.target.module, root.handler, list(range(width))).prune()
    first, second = _attention(model)
    assert _widths(first) == (HIDDEN - width, (kv_heads - 1) * HEAD_DIM,
                              (kv_heads - 1) * HEAD_DIM, HIDDEN - width)
    assert _widths(second) == (HIDDEN, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM, HIDDEN)
    assert model(*inputs).logits.shape == (1, 8, VOCAB)
