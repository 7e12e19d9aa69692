"""Inspect and prune a Qwen2-0.5B-shaped decoder built from a config: time and peak memory.

24 layers, hidden 896, 14 query heads and 2 key/value heads of 64, FFN 4864, vocabulary 151936
(random weights, nothing downloaded; about 0.49 B parameters). ``inspect_model`` and then
``apply_plan`` with 50 % structured L2 on every group, each timed; peak resident memory of the
process (``ru_maxrss``) after each; then one forward pass of the pruned model. ``--layers``
scales the depth to check that time and memory grow linearly: each depth runs in a fresh
process (the peak is the process's), one row of the table ``scale`` each.

Run: ``.venv/bin/python benchmarks/decoder_scale.py [--layers 6 12 24]``. Output:
``benchmarks/results/decoder-scale-<date>.txt`` and ``.json`` (``provenance.recorded``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

ROW = "row: "  # the line a one-depth process ends with: its figures as JSON


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(layers: int, sparsity: float) -> None:
    """One depth, in this process: print what it measures, then its row as JSON."""
    import torch
    import transformers

    from autoprune.plan import PruningPlan
    from autoprune.prune import apply_plan, inspect_model

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
        tie_word_embeddings=True, use_cache=False)
    start = time.perf_counter()
    model = transformers.Qwen2ForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    build_s, build_peak = time.perf_counter() - start, _peak_gib()
    print(f"built: {params / 1e9:.3f} B parameters, {layers} layers ({build_s:.1f} s), "
          f"peak {build_peak:.2f} GiB")
    inputs = (torch.randint(0, config.vocab_size, (1, 16)),)
    start = time.perf_counter()
    info = inspect_model(model, inputs)
    inspect_s, inspect_peak = time.perf_counter() - start, _peak_gib()
    print(f"inspect_model: {inspect_s:.1f} s, {len(info.groups)} groups, "
          f"{len(info.hidden)} hidden, peak {inspect_peak:.2f} GiB")
    start = time.perf_counter()
    pruned = apply_plan(model, PruningPlan.uniform(sparsity), inputs)
    apply_s, apply_peak = time.perf_counter() - start, _peak_gib()
    kept = sum(p.numel() for p in pruned.parameters())
    print(f"apply_plan {sparsity:.0%}: {apply_s:.1f} s, {kept / 1e9:.3f} B parameters "
          f"left, peak {apply_peak:.2f} GiB")
    attn, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[0].mlp
    with torch.no_grad():
        logits = pruned(*inputs).logits
    print(f"layer 0: q_proj {attn.q_proj.out_features}, k_proj {attn.k_proj.out_features}, "
          f"mlp {mlp.gate_proj.out_features}; logits {tuple(logits.shape)}")
    print(f"total inspect + apply: {inspect_s + apply_s:.1f} s, peak {_peak_gib():.2f} GiB")
    print(ROW + json.dumps([
        layers, f"{params / 1e9:.3f}", f"{build_s:.1f}", f"{build_peak:.2f}",
        f"{inspect_s:.1f}", len(info.groups), f"{inspect_peak:.2f}", f"{apply_s:.1f}",
        f"{kept / 1e9:.3f}", f"{apply_peak:.2f}",
        f"{attn.q_proj.out_features} / {attn.k_proj.out_features} / "
        f"{mlp.gate_proj.out_features}",
        f"{inspect_s + apply_s:.1f}", f"{_peak_gib():.2f}"]), flush=True)


COLUMNS = ["layers", "parameters B", "build s", "peak GiB after build", "inspect s", "groups",
           "peak GiB after inspect", "apply s", "parameters left B", "peak GiB after apply",
           "layer 0 q / k / mlp", "inspect + apply s", "peak GiB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[24],
                        help="one depth or several (each in a fresh process)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.one:
        measure(args.layers[0], args.sparsity)
        return
    with provenance.recorded("decoder-scale") as rec:
        rows = []
        for layers in args.layers:
            print(f"\n## --layers {layers}", flush=True)
            done = subprocess.run([sys.executable, __file__, "--one", "--layers", str(layers),
                                   "--sparsity", str(args.sparsity)],
                                  capture_output=True, text=True)
            for line in done.stdout.splitlines():
                if line.startswith(ROW):
                    rows.append(json.loads(line[len(ROW):]))
                else:
                    print(line, flush=True)
            if done.returncode:
                print(done.stderr, flush=True)
                raise SystemExit(f"--layers {layers} exited with {done.returncode}")
        print(f"\ntransformers {version('transformers')}; Qwen2-0.5B's shape, "
              f"{args.sparsity:.0%} structured L2 on every group")
        rec.value("transformers", version("transformers"))
        provenance.print_table("scale", COLUMNS, rows, right=tuple(range(len(COLUMNS))))


if __name__ == "__main__":
    main()
