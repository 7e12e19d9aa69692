"""Inspect and prune a Qwen2-0.5B-shaped decoder built from a config: time and peak memory.

24 layers, hidden 896, 14 query heads and 2 key/value heads of 64, FFN 4864, vocabulary 151936
(random weights, nothing downloaded; about 0.49 B parameters). ``inspect_model`` and then
``apply_plan`` with 50 % structured L2 on every group, each timed; peak resident memory of the
process (``ru_maxrss``) after each; then one forward pass of the pruned model. ``--layers``
scales the depth to check that time and memory grow linearly.

Run: ``.venv/bin/python benchmarks/decoder_scale.py [--layers 24]``
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch
import transformers

from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan, inspect_model


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=args.layers, num_attention_heads=14, num_key_value_heads=2,
        tie_word_embeddings=True, use_cache=False)
    start = time.perf_counter()
    model = transformers.Qwen2ForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"built: {params / 1e9:.3f} B parameters, {args.layers} layers "
          f"({time.perf_counter() - start:.1f} s), peak {_peak_gib():.2f} GiB")
    inputs = (torch.randint(0, config.vocab_size, (1, 16)),)
    start = time.perf_counter()
    info = inspect_model(model, inputs)
    inspect_s = time.perf_counter() - start
    print(f"inspect_model: {inspect_s:.1f} s, {len(info.groups)} groups, "
          f"{len(info.hidden)} hidden, peak {_peak_gib():.2f} GiB")
    start = time.perf_counter()
    pruned = apply_plan(model, PruningPlan.uniform(args.sparsity), inputs)
    apply_s = time.perf_counter() - start
    kept = sum(p.numel() for p in pruned.parameters())
    print(f"apply_plan {args.sparsity:.0%}: {apply_s:.1f} s, {kept / 1e9:.3f} B parameters "
          f"left, peak {_peak_gib():.2f} GiB")
    attn = pruned.model.layers[0].self_attn
    with torch.no_grad():
        logits = pruned(*inputs).logits
    print(f"layer 0: q_proj {attn.q_proj.out_features}, k_proj {attn.k_proj.out_features}, "
          f"mlp {pruned.model.layers[0].mlp.gate_proj.out_features}; logits "
          f"{tuple(logits.shape)}")
    print(f"total inspect + apply: {inspect_s + apply_s:.1f} s, peak {_peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
