import pytest

from autoprune.budget import latency_key, parse_budget, parse_budgets, parse_objectives
from autoprune.errors import BudgetError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("latency<10ms", ("latency", "<", 10.0, "p50", None)),
        ("latency<=2.5ms@p90", ("latency", "<=", 2.5, "p90", None)),
        ("latency < 800us", ("latency", "<", 0.8, "p50", None)),
        ("latency<5ms@cpu-1t", ("latency", "<", 5.0, "p50", "cpu-1t")),
        ("latency<5ms@cpu@p90", ("latency", "<", 5.0, "p90", "cpu")),
        ("latency<3ms@remote://10.0.0.2:8765", ("latency", "<", 3.0, "p50",
                                                "remote://10.0.0.2:8765")),
        ("accuracy>=0.97", ("accuracy", ">=", 0.97, "p50", None)),
        ("accuracy>=97%", ("accuracy", ">=", 0.97, "p50", None)),
        ("params<1M", ("params", "<", 1e6, "p50", None)),
        ("params<250k", ("params", "<", 250e3, "p50", None)),
        ("flops<50M", ("flops", "<", 50e6, "p50", None)),
        ("size<4MB", ("size", "<", 4e6, "p50", None)),
        ("size<=2MiB", ("size", "<=", 2 * 2**20, "p50", None)),
    ],
)
def test_valid_budgets(text, expected):
    b = parse_budget(text)
    assert (b.metric, b.op, pytest.approx(b.value), b.statistic, b.target) == expected


def test_satisfied_violation_and_keys():
    b = parse_budget("latency<=2ms@p90")
    assert b.satisfied(2.0) and not b.satisfied(2.5) and not b.satisfied(None)
    assert b.violation(1.0) == pytest.approx(-0.5) and b.violation(3.0) == pytest.approx(0.5)
    assert b.metric_key("cpu-1t") == latency_key("cpu-1t", "p90") == "latency_p90_ms@cpu-1t"
    assert parse_budget("size<4MB").metric_key("cpu") == "size_bytes"
    acc = parse_budget("accuracy>=0.9")
    assert acc.violation(0.8) == pytest.approx(0.1 / 0.9) and not acc.is_cost
    assert [b.text for b in parse_budgets(["latency<1ms, params<1M", "accuracy>=0.9"])] == [
        "latency<1ms", "params<1M", "accuracy>=0.9"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("latency<10", r"latency needs a time unit \(ms, us or s\)"),
        ("latency<10kg", r"latency needs a time unit"),
        ("latency 10ms", r"cannot parse budget 'latency 10ms': expected METRIC OP VALUE"),
        ("latency=10ms", r"cannot parse budget"),
        ("<10ms", r"cannot parse budget"),
        ("params<1X", r"unknown unit 'X' for params; use K, M or G"),
        ("size<4", r"size needs a unit"),
        ("accuracy>=0.9@cpu", r"'@cpu' only applies to latency budgets"),
        ("latency<1ms@cpu@cpu-1t", r"names two targets"),
        ("accuracy>=0.9ms", r"unexpected unit 'ms' for task metric 'accuracy'"),
        ("latency<0ms", r"can never be met"),
    ],
)
def test_malformed_budgets(text, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(text)


def test_objectives():
    objs = parse_objectives(["params,size"], "accuracy", "maximize", "cpu-1t")
    assert [(o.key, o.direction) for o in objs] == [
        ("accuracy", "maximize"), ("latency_p50_ms@cpu-1t", "minimize"),
        ("params", "minimize"), ("size_bytes", "minimize")]
    with pytest.raises(BudgetError, match="unknown objective 'energy'"):
        parse_objectives(["energy"], "accuracy", "maximize", "cpu-1t")
