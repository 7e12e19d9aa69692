from __future__ import annotations

import dataclasses
import json
import math
import random
import time

import pytest
import torch

import autoprune.latency._measure as measure_module
from autoprune.errors import TargetError
from autoprune.latency import (
    LatencyCache,
    LatencyStats,
    compare_latency,
    export_onnx,
    format_latency_table,
    load_target,
    measure_interleaved,
    measure_latency,
    median_ci,
    median_ci_rel,
    prepare_inputs,
    summarize,
)
from autoprune.latency._measure import _block_spread, _stop
from autoprune.latency._stats import BUSY_P90_P50
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan
from autoprune.testing import create_test_model


@pytest.fixture
def count_measurements(monkeypatch):
    """Count the ONNX Runtime measurements measure_latency really runs."""
    calls = []
    real = measure_module.measure_onnx

    def counting(onnx_model, arrays, target, limit_ms=None):
        calls.append([a.shape for a in arrays])
        return real(onnx_model, arrays, target, limit_ms)

    monkeypatch.setattr(measure_module, "measure_onnx", counting)
    return calls


def test_summarize_and_median_ci():
    stats = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats.p50_ms == 3.0 and stats.runs == 5 and stats.min_ms == 1.0
    assert stats.mean_ms == 4.0
    assert stats.std_ms == pytest.approx(math.sqrt(12.5))
    assert stats.cv == pytest.approx(math.sqrt(12.5) / 4.0)
    assert stats.p90_ms == pytest.approx(7.6)
    assert stats.value("p50") == 3.0 and stats.value("p90") == stats.p90_ms
    assert stats.value("mean") == 4.0
    assert median_ci([1.0, 2.0, 3.0, 4.0, 10.0]) == (1.0, 10.0)
    with pytest.raises(TargetError, match="p50, p90 or mean"):
        stats.value("p99")
    assert median_ci_rel([5.0] * 100) == 0.0
    assert median_ci_rel([1.0, 2.0]) == math.inf
    # 400 runs evenly spread over +-10 %: order statistics 180 and 221 (1-based) bound the
    # median, so the CI half-width is 41 steps of 0.2 / 399, halved: ~1 %
    xs = [1.0 + 0.2 * (i / 399 - 0.5) for i in range(400)]
    assert median_ci_rel(xs) == pytest.approx(41 * 0.2 / 399 / 2)
    assert LatencyStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_measure_latency_stats(fast_target):
    model = create_test_model("resnet_tiny")
    stats = measure_latency(model, model.example_inputs(), fast_target)
    assert fast_target.min_runs <= stats.runs <= fast_target.max_runs
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms
    assert stats.p50_ms < 50  # a 20k-parameter CNN on 32x32 takes well under a millisecond
    assert stats.std_ms >= 0 and stats.cv == pytest.approx(stats.std_ms / stats.mean_ms)
    assert not stats.cached


def test_stopping_rule_caps_runs(fast_target):
    model = create_test_model("resnet_tiny")
    capped = dataclasses.replace(fast_target, min_runs=7, max_runs=7, target_ci=0.001)
    assert measure_latency(model, model.example_inputs(), capped).runs == 7
    # a generous CI target stops right after min_runs (checked every 5 runs)
    loose = dataclasses.replace(fast_target, min_runs=10, max_runs=1000, target_ci=0.9)
    assert 10 <= measure_latency(model, model.example_inputs(), loose).runs <= 15  # noisy CPU


def test_limit_ends_timing_once_the_budget_is_surely_broken(fast_target):
    model = create_test_model("resnet_tiny")
    slow = dataclasses.replace(fast_target, min_runs=10, max_runs=100000, max_seconds=5,
                               min_seconds=0.2, target_ci=0.0001)
    # a 1 ns budget is broken at the first CI check after min_seconds (then every 5 runs) ...
    start = time.perf_counter()
    broken = measure_latency(model, model.example_inputs(), slow, limit_ms=1e-6)
    assert broken.screened and broken.runs % 5 == 0
    assert time.perf_counter() - start < 2  # ... not at max_seconds (5 s)


def test_stopping_rule_with_a_budget_to_decide(fast_target):
    # 1.00 .. 1.99 in random order: the median's 95 % CI is [1.39, 1.60], +-7.0 %
    xs = [1.0 + 0.01 * i for i in random.Random(0).sample(range(100), 100)]
    loose = dataclasses.replace(fast_target, target_ci=0.1)
    assert median_ci(xs) == pytest.approx((1.39, 1.6))
    assert _stop(xs, loose, None)
    assert _stop(xs, dataclasses.replace(loose, target_ci=0.01), 1.2)  # surely above 1.2 ms
    assert _stop(xs, loose, 1.8)  # surely below: the usual rule
    # 1.5 ms is inside the CI: go on until the CI is 3x narrower than target_ci
    assert not _stop(xs, loose, 1.5)
    assert _stop(xs, dataclasses.replace(loose, target_ci=0.25), 1.5)


def test_stopping_rule_waits_out_load_that_changes_while_timing(fast_target):
    # the same 100 runs: shuffled, the 5 blocks' medians agree within +-8 %; in rising order
    # (the machine got busier while timing) they spread +-27 %, and timing goes on
    rising = [1.0 + 0.01 * i for i in range(100)]
    shuffled = random.Random(0).sample(rising, 100)
    loose = dataclasses.replace(fast_target, target_ci=0.1)
    assert _block_spread(shuffled) < 0.08 and _block_spread(rising) == pytest.approx(0.8 / 2.99)
    assert _stop(shuffled, loose, None) and not _stop(rising, loose, None)
    assert _block_spread(rising[:9]) == 0.0  # too few runs for blocks: the CI rule alone


def test_screening_protocol_is_short_and_never_slower():
    screen = load_target("cpu-1t").screening()
    assert (screen.warmup_runs, screen.warmup_seconds, screen.min_runs, screen.min_seconds,
            screen.max_seconds, screen.target_ci) == (10, 0.02, 20, 0.05, 2.0, 0.03)
    assert screen.key() == load_target("cpu-1t").key()  # same device and runtime settings
    quick = dataclasses.replace(load_target("cpu-1t"), warmup_runs=2, warmup_seconds=0.0,
                                min_runs=5, min_seconds=0.0, max_seconds=0.5, target_ci=0.1)
    assert quick.screening() == quick


def test_screened_and_full_measurements_are_cached_apart(fast_target, count_measurements,
                                                         monkeypatch):
    # other load on the machine must not turn the screening into a full measurement here
    monkeypatch.setattr(LatencyStats, "busy", property(lambda self: False))
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    cache = LatencyCache()
    screened = measure_latency(model, inputs, fast_target, cache=cache, screen=True)
    assert screened.screened and not screened.cached
    again = measure_latency(model, inputs, fast_target, cache=cache, screen=True)
    assert again.cached and again.screened and len(count_measurements) == 1
    # a full measurement is not answered by a screening one ...
    full = measure_latency(model, inputs, fast_target, cache=cache)
    assert not full.screened and not full.cached and len(count_measurements) == 2
    # ... but a screening request prefers the full one
    preferred = measure_latency(model, inputs, fast_target, cache=cache, screen=True)
    assert preferred.cached and not preferred.screened and preferred.p50_ms == full.p50_ms
    assert len(cache) == 2 and len(count_measurements) == 2
    # a screening measurement that decided one budget does not answer for another
    other = apply_plan(model, PruningPlan.uniform(0.5), inputs)
    measure_latency(other, inputs, fast_target, cache=cache, limit_ms=1e-6)
    assert measure_latency(other, inputs, fast_target, cache=cache, limit_ms=1e-6).cached
    assert not measure_latency(other, inputs, fast_target, cache=cache, limit_ms=5.0).cached
    assert len(count_measurements) == 4


def test_measure_onnx_bytes_and_path(fast_target, tmp_path):
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    result = export_onnx(model, inputs, tmp_path / "m.onnx")
    assert measure_latency(result.onnx_bytes, inputs, fast_target).runs >= 5
    assert measure_latency(tmp_path / "m.onnx", inputs, fast_target).runs >= 5
    with pytest.raises(TargetError, match="does not exist"):
        measure_latency(tmp_path / "nope.onnx", inputs, fast_target)


def test_same_shapes_measured_once(fast_target, count_measurements):
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    cache = LatencyCache()
    by_l1 = apply_plan(model, PruningPlan.uniform(0.5, "structured", "l1"), inputs)
    by_l2 = apply_plan(model, PruningPlan.uniform(0.5, "structured", "l2"), inputs)
    by_l1_other_weights = apply_plan(
        create_test_model("resnet_tiny"), PruningPlan.uniform(0.5, "structured"), inputs
    )
    assert not torch.equal(by_l1.stem[0].weight, by_l1_other_weights.stem[0].weight)

    first = measure_latency(by_l1, inputs, fast_target, cache=cache)
    second = measure_latency(by_l2, inputs, fast_target, cache=cache)
    third = measure_latency(by_l1_other_weights, inputs, fast_target, cache=cache)

    assert len(count_measurements) == 1
    assert (cache.hits, cache.misses, len(cache)) == (2, 1, 1)
    assert not first.cached and second.cached and third.cached
    assert second.p50_ms == first.p50_ms == third.p50_ms

    # other shapes, another target or another batch size: measured again
    measure_latency(model, inputs, fast_target, cache=cache)
    measure_latency(by_l1, inputs, dataclasses.replace(fast_target, batch_size=2), cache=cache)
    measure_latency(
        by_l1, inputs, dataclasses.replace(fast_target, graph_optimization_level="basic"),
        cache=cache,
    )
    assert len(count_measurements) == 4
    assert count_measurements[2] == [(2, 1, 32, 32)]


def test_unstructured_masks_share_the_dense_measurement(fast_target, count_measurements):
    # Zeroed weights do not change the exported graph: ORT runs the same dense kernels.
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    cache = LatencyCache()
    measure_latency(model, inputs, fast_target, cache=cache)
    for sparsity in (0.3, 0.8):
        masked = apply_plan(model, PruningPlan.uniform(sparsity, "unstructured"), inputs)
        assert measure_latency(masked, inputs, fast_target, cache=cache).cached
    assert len(count_measurements) == 1


def test_cache_file_is_reused_by_a_resumed_search(fast_target, tmp_path, count_measurements):
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    path = tmp_path / "run" / "latency_cache.json"
    stats = measure_latency(model, inputs, fast_target, cache=LatencyCache(path))
    data = json.loads(path.read_text())
    assert data["version"] == 2 and len(data["entries"]) == 1

    resumed = LatencyCache(path)
    again = measure_latency(create_test_model("resnet_tiny"), inputs, fast_target, cache=resumed)
    assert again.cached and again.p50_ms == stats.p50_ms
    assert len(count_measurements) == 1

    # two caches on one file merge their entries instead of overwriting each other
    other = LatencyCache(path)
    narrow = create_test_model("resnet_tiny", widths=(4, 8, 16))
    measure_latency(narrow, inputs, fast_target, cache=other)
    resumed.put("extra-key", stats)
    assert len(json.loads(path.read_text())["entries"]) == 3


def test_entries_measured_in_memory_merge_into_the_cache_file(fast_target, tmp_path,
                                                             count_measurements):
    """A Ray worker measures into a cache in its memory and sends the new entries back; only
    the driver writes the file."""
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    driver = LatencyCache(tmp_path / "latency_cache.json")
    worker = LatencyCache()
    worker.merge(driver.entries())
    stats = measure_latency(model, inputs, fast_target, cache=worker)
    new = worker.take_new()
    assert len(new) == 1 and worker.take_new() == {}  # taken once
    assert not (tmp_path / "latency_cache.json").exists()
    driver.merge(new)
    assert json.loads((tmp_path / "latency_cache.json").read_text())["entries"] == new
    again = measure_latency(create_test_model("resnet_tiny"), inputs, fast_target, cache=driver)
    assert again.cached and again.p50_ms == stats.p50_ms and driver.take_new() == {}
    assert len(count_measurements) == 1


def test_corrupt_cache_file_is_ignored(fast_target, tmp_path):
    path = tmp_path / "latency_cache.json"
    path.write_text("{not json")
    cache = LatencyCache(path)
    assert len(cache) == 0
    model = create_test_model("resnet_tiny")
    measure_latency(model, model.example_inputs(), fast_target, cache=cache)
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_prepare_inputs(fast_target):
    x = torch.randn(1, 3, 8, 8)
    (same,) = prepare_inputs((x,), fast_target)
    assert same is x or torch.equal(same, x)
    (batched,) = prepare_inputs((x,), dataclasses.replace(fast_target, batch_size=4))
    assert batched.shape == (4, 3, 8, 8) and batched.dtype == x.dtype
    ids = torch.ones(1, 5, dtype=torch.long)
    shaped = prepare_inputs(
        (x, ids), dataclasses.replace(fast_target, input_shapes=((2, 3, 4, 4), (2, 7)))
    )
    assert [tuple(t.shape) for t in shaped] == [(2, 3, 4, 4), (2, 7)]
    assert shaped[1].dtype == torch.long and int(shaped[1].abs().sum()) == 0
    with pytest.raises(TargetError, match="gives 1 input shape"):
        prepare_inputs((x, ids), dataclasses.replace(fast_target, input_shapes=((1, 3),)))


def test_measure_interleaved_repeats(fast_target):
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    onnx_models = {
        "dense": export_onnx(model, inputs).onnx_bytes,
        "narrow": export_onnx(create_test_model("resnet_tiny", widths=(4, 8, 16)), inputs)
        .onnx_bytes,
    }
    result = measure_interleaved(onnx_models, [inputs[0].numpy()], fast_target, repeats=3)
    assert list(result) == ["dense", "narrow"]
    assert all(len(v) == 3 and all(s.runs >= 5 for s in v) for v in result.values())


def test_compare_latency_rows_and_table(fast_target):
    model = create_test_model("resnet_tiny")
    inputs = model.example_inputs()
    models = {
        "dense": model,
        "unstructured-80%": apply_plan(model, PruningPlan.uniform(0.8, "unstructured"), inputs),
        "structured-50%": apply_plan(model, PruningPlan.uniform(0.5, "structured"), inputs),
    }
    target = dataclasses.replace(fast_target, min_runs=20, max_runs=200, max_seconds=1.0)
    rows = compare_latency(models, inputs, target)

    assert [r.name for r in rows] == list(models)
    dense, masked, structured = rows
    assert dense.speedup == 1.0
    assert dense.params == masked.params == 19810
    assert 0.15 < masked.nonzero_fraction < 0.3 and dense.nonzero_fraction > 0.95
    assert masked.macs == dense.macs  # zeros are still multiplied
    assert structured.params < 0.35 * dense.params and structured.macs < 0.35 * dense.macs
    assert structured.speedup == pytest.approx(dense.stats.p50_ms / structured.stats.p50_ms)

    table = format_latency_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["model", "params", "nonzero", "MACs", "p50"]
    assert len(lines) == 5 and lines[2].startswith("dense") and "1.00x" in lines[2]
    assert "19.81k" in lines[3]


def test_a_screened_value_near_its_budget_is_decided_by_the_full_protocol(monkeypatch,
                                                                         fast_target):
    protocols = []

    def fake(onnx_model, arrays, target, limit_ms=None):
        protocols.append(target)
        return summarize([1.02] * 10), []

    monkeypatch.setattr(measure_module, "measure_onnx", fake)
    model = create_test_model("resnet_tiny")
    cache = LatencyCache()
    slow = dataclasses.replace(fast_target, min_seconds=1.0, max_seconds=10.0)
    # 1.02 ms against 1.0 ms (2 %) and 1.06 ms (4 %): within 5 %, measured again in full
    for limit in (1.0, 1.06):
        stats = measure_latency(model, model.example_inputs(), slow, cache=cache,
                                limit_ms=limit)
        assert not stats.screened and protocols[-2:] == [slow.screening(), slow]
        cache = LatencyCache()
    # 1.02 ms against 1.2 ms (15 %): the screening value stands
    protocols.clear()
    stats = measure_latency(model, model.example_inputs(), slow, cache=cache, limit_ms=1.2)
    assert stats.screened and protocols == [slow.screening()]


def test_busy_measurement_is_one_whose_p90_is_far_above_its_median():
    quiet = summarize([1.0] * 85 + [1.4] * 15)  # p90 1.4 ms: 1.4x the median
    busy = summarize([1.0] * 85 + [1.6] * 15)  # p90 1.6 ms: 1.6x
    assert BUSY_P90_P50 == 1.5
    assert not quiet.busy and busy.busy


def test_a_busy_screening_measurement_is_taken_again_in_full(monkeypatch, fast_target):
    busy = summarize([1.0] * 80 + [3.0] * 20)  # p90 3x the median
    answers, protocols = [], []

    def fake(onnx_model, arrays, target, limit_ms=None):
        protocols.append(target)
        return answers.pop(0), []

    monkeypatch.setattr(measure_module, "measure_onnx", fake)
    model = create_test_model("resnet_tiny")
    slow = dataclasses.replace(fast_target, min_seconds=1.0, max_seconds=10.0)
    answers[:] = [busy, summarize([1.1] * 10)]
    stats = measure_latency(model, model.example_inputs(), slow, screen=True)
    assert not stats.screened and stats.p50_ms == 1.1
    assert protocols == [slow.screening(), slow]
    # even its fastest run (1.0 ms) breaks a 0.5 ms budget: the verdict stands
    answers[:], protocols[:] = [busy], []
    stats = measure_latency(model, model.example_inputs(), slow, limit_ms=0.5)
    assert stats.screened and protocols == [slow.screening()]
