"""A search over a transformer: attention heads and MLP widths are searched like channels."""

from autoprune.results import load_run
from autoprune.search import run_search
from autoprune.task import load_task


def test_search_on_the_sequences_transformer_prunes_heads(tmp_path, fast_target):
    task = load_task("sequences", dim=32, num_heads=4, depth=1, epochs=2, n_train=512,
                     n_val=256, cache_dir=tmp_path / "cache")
    task.finetune = task.finetune.replace(steps=4, eval_every=0)
    result = run_search(task, "per_layer_structured", ["latency<1s"], targets=[fast_target],
                        trials=5, output=tmp_path / "run", progress=False)
    config, results = load_run(result.run_dir)
    assert [r.status for r in results].count("complete") >= 4
    half = next(r for r in results if r.baseline == "uniform-structured-0.5")
    # 4 heads of width 8 -> 2 heads: q/k/v lose half their outputs, as every MLP does.
    rules = half.plan.rules
    attention = [name for name in rules if name.endswith("attn.v")]
    assert attention and all(rules[n].sparsity == 0.5 for n in attention)
    dense = next(r for r in results if r.baseline == "dense")
    assert half.metrics["params"] < 0.5 * dense.metrics["params"]
