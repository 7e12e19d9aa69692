"""T5 encoder and Swin: what is pruned, what is left whole (and why), models that still run.

Tiny random-init T5EncoderModel (2 layers, d_model 64, 8 heads of 8, FFN 96) and SwinModel
(32x32 images, patch 2, embed 16, 2 stages of 2 blocks with 2 and 4 heads, window 4) built from
configs (no download).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from autoprune.latency import export_onnx  # noqa: E402
from autoprune.plan import LayerRule, PruningPlan  # noqa: E402
from autoprune.prune import apply_plan, count_kept, inspect_model  # noqa: E402

T5_HEADS, T5_HEAD_DIM, T5_FFN = 8, 8, 96
SWIN_HEADS, SWIN_HEAD_DIM = [2, 2, 4, 4], 8  # per block; head_dim = embed 16 / 2 heads


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=128, d_model=64, d_kv=T5_HEAD_DIM, d_ff=T5_FFN,
                                   num_layers=2, num_heads=T5_HEADS)
    return transformers.T5EncoderModel(config).eval(), (torch.randint(0, 128, (1, 8)),)


def _swin():
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2],
                                     num_heads=[2, 4], window_size=4)
    return transformers.SwinModel(config).eval(), (torch.randn(1, 3, 32, 32),)


def _swin_attention(model):
    return [block.attention for stage in model.encoder.layers for block in stage.blocks]


def test_t5_heads_are_left_whole_and_layers_says_why():
    model, inputs = _t5()
    info = inspect_model(model, inputs)
    assert [(g.name.rsplit(".", 1)[1], g.channels) for g in info.groups] == [("wi", T5_FFN)] * 2
    whole = {u.name: u.reason for u in info.unprunable if "heads left whole" in u.reason}
    assert sorted(whole) == [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    assert all("relative position bias" in r for r in whole.values())
    assert "heads left whole" in info.table()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_t5_encoder_prunes_its_ffn_and_runs_like_onnx_runtime(sparsity):
    model, inputs = _t5()
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), inputs)
    for block in pruned.encoder.block:
        attn = block.layer[0].SelfAttention
        assert (attn.n_heads, attn.inner_dim, attn.q.out_features) == (T5_HEADS, 64, 64)
        assert block.layer[1].DenseReluDense.wi.out_features == count_kept(T5_FFN, sparsity)
    out = pruned(*inputs).last_hidden_state
    assert out.shape == model(*inputs).last_hidden_state.shape == (1, 8, 64)
    result = export_onnx(pruned, inputs)
    assert result.ok and result.max_abs_diff < 1e-4


def test_swin_window_attention_is_a_head_group_and_patch_merging_says_why():
    model, inputs = _swin()
    info = inspect_model(model, inputs)
    heads = [g for g in info.groups if g.num_heads]
    assert [(g.num_heads, g.channels) for g in heads] == [
        (h, h * SWIN_HEAD_DIM) for h in SWIN_HEADS]
    assert all(g.name.endswith("attention.q_proj") for g in heads)
    merging = [u for u in info.unprunable if "downsample.norm" in u.reason]
    assert "embeddings.patch_embeddings.projection" in [u.name for u in merging]
    assert all("patch merging" in u.reason for u in merging)
    assert info.hidden == []  # the stage-1 width: left whole, listed above


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_swin_pruned_heads_carry_their_bias_table_columns(sparsity):
    model, inputs = _swin()
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), inputs)
    for attn, heads in zip(_swin_attention(pruned), SWIN_HEADS):
        kept = count_kept(heads, sparsity)
        assert attn.num_attention_heads == kept
        assert attn.relative_position_bias.relative_position_bias_table.shape[1] == kept
        assert [p.out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj)] == [
            kept * SWIN_HEAD_DIM] * 3
        assert attn.o_proj.in_features == kept * SWIN_HEAD_DIM
    out = pruned(*inputs).last_hidden_state
    assert out.shape == model(*inputs).last_hidden_state.shape
    result = export_onnx(pruned, inputs)
    assert result.ok and result.max_abs_diff < 1e-4


def test_swin_the_zeroed_head_is_removed_and_the_others_keep_their_bias():
    """Head 1 zeroed in every block is the one removed; the output does not change, so the
    remaining heads kept their own bias-table columns."""
    model, inputs = _swin()
    cut = slice(SWIN_HEAD_DIM, 2 * SWIN_HEAD_DIM)
    with torch.no_grad():
        for attn in _swin_attention(model):
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[cut] = 0
                proj.bias[cut] = 0
            attn.o_proj.weight[:, cut] = 0
            table = attn.relative_position_bias.relative_position_bias_table
            table.copy_(torch.randn_like(table))
    info = inspect_model(model, inputs)
    plan = PruningPlan(rules={g.name: LayerRule("structured", 1 / g.num_heads, "l2")
                              for g in info.groups if g.num_heads})
    pruned = apply_plan(model, plan, inputs)
    assert [a.num_attention_heads for a in _swin_attention(pruned)] == [1, 1, 3, 3]
    torch.testing.assert_close(pruned(*inputs).last_hidden_state,
                               model(*inputs).last_hidden_state, atol=1e-5, rtol=1e-4)
