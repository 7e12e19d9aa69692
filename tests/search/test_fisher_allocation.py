"""A space ranking by Fisher importance starts from the global Fisher allocation."""

import json

from autoprune.cli import main
from autoprune.search._base import FISHER_FIT

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"


def _search(tmp_path, fast_target, extra: str, trials: int) -> list[dict]:
    """The trials of a search of a Fisher space (``extra``: more YAML) at params<50%."""
    space = tmp_path / "fisher.yaml"
    space.write_text("name: fisher\nsparsity: {low: 0.0, high: 0.8, step: 0.05}\n"
                     "criteria: [fisher]\n" + extra)
    out = tmp_path / "run"
    assert main(["search", "--task", SYNTHETIC, "--space", str(space), "--target", fast_target,
                 "--budget", "params<50%", "--trials", str(trials), "--finetune-steps", "2",
                 "--output", str(out), "--quiet"]) == 0
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def test_a_fisher_space_tries_the_global_fisher_allocation_scaled_onto_the_budget(
        tmp_path, fast_target):
    trials = _search(tmp_path, fast_target, "", 6)
    fit = next(t for t in trials if t["baseline"] == FISHER_FIT)
    rules = fit["plan"]["rules"]
    sparsities = [r["sparsity"] for r in rules.values() if r["mode"] == "structured"]
    assert {r["criterion"] for r in rules.values() if r["mode"] == "structured"} == {"fisher"}
    assert len(set(sparsities)) > 1  # not uniform: the global ranking decides
    # steered onto the budget: it keeps about half of the dense model's parameters
    dense = next(t for t in trials if t["baseline"] == "dense")
    assert 0.35 < fit["metrics"]["params"] / dense["metrics"]["params"] <= 0.5


def test_a_space_with_int8_also_starts_from_the_fisher_allocation_in_int8(tmp_path,
                                                                           fast_target):
    trials = {t["baseline"]: t for t in _search(tmp_path, fast_target,
                                                "quantize: [none, int8-dynamic]\n", 8)}
    fp32, int8 = trials[FISHER_FIT], trials[f"{FISHER_FIT}-int8-dynamic"]
    assert (fp32["plan"]["quantize"], int8["plan"]["quantize"]) == ("none", "int8-dynamic")
    assert int8["params"] == {**fp32["params"], "quantize": "int8-dynamic"}
