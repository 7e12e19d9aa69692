"""Searches over tiny random-init decoder LLMs (the causal-LM example task) complete."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from autoprune.results import load_run  # noqa: E402
from autoprune.search import run_search  # noqa: E402
from autoprune.space import FloatRange, SearchSpace  # noqa: E402
from autoprune.task import load_task  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "causal_lm_task.py"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_three_trial_search_on_a_tiny_decoder(family, tmp_path, fast_target):
    # The example's task at test size: perplexity on stdlib docs, byte tokens, built offline.
    task = load_task(f"{EXAMPLE}:make_task", family=family, size="tiny", seq_len=16,
                     n_train=32, n_val=16, batch_size=8, steps=3)
    space = SearchSpace(name="kv_groups_and_ffn", sparsity=FloatRange(0.0, 0.6, 0.1))
    result = run_search(task, space, ["latency<10s"], targets=[fast_target], trials=3,
                        output=tmp_path / "run", progress=False)
    _, results = load_run(result.run_dir)
    assert [r.status for r in results] == ["complete"] * 3, [r.reason for r in results]
    dense = next(r for r in results if r.baseline == "dense")
    # Random weights over 256 byte tokens: perplexity near the vocabulary size.
    assert 100 < dense.metrics["perplexity"] < 600
    pruned = [r for r in results if r.plan.rules and r is not dense]
    assert pruned and all(math.isfinite(r.metrics["perplexity"]) for r in pruned)
    assert all(r.metrics["params"] < dense.metrics["params"] for r in pruned
               if any(rule.sparsity >= 0.2 for rule in r.plan.rules.values()))
