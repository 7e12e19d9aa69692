"""A Qwen2-0.5B-shaped decoder is inspected and pruned in bounded time and memory (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

_SCRIPT = """
import json, resource, time, torch, transformers
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan, inspect_model
torch.manual_seed(0)
config = transformers.Qwen2Config(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, use_cache=False)
model = transformers.Qwen2ForCausalLM(config).eval()
inputs = (torch.randint(0, config.vocab_size, (1, 16)),)
start = time.perf_counter()
info = inspect_model(model, inputs)
pruned = apply_plan(model, PruningPlan.uniform(0.5), inputs)
seconds = time.perf_counter() - start
attn = pruned.model.layers[23].self_attn
print(json.dumps({
    "params": sum(p.numel() for p in model.parameters()), "seconds": seconds,
    "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "groups": len(info.groups), "q": attn.q_proj.out_features, "k": attn.k_proj.out_features,
    "logits": list(pruned(*inputs).logits.shape)}))
"""


@pytest.mark.slow
def test_half_billion_parameter_decoder_in_under_3_minutes_and_12_gib():
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.45e9 < got["params"] < 0.55e9
    assert got["seconds"] < 180 and got["peak_gib"] < 12, got
    assert got["groups"] == 48  # one key/value-group unit and one FFN group per layer
    assert (got["q"], got["k"]) == (7 * 64, 64)  # 1 of 2 key/value groups, its 7 query heads
    assert got["logits"] == [1, 16, 151936]
