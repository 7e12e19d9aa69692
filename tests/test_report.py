"""The HTML report: fronts per target with baselines, sparsity, history, failed trials; works
without study.db (Ray runs); renders in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from autoprune.budget import latency_key
from autoprune.cli import main
from autoprune.errors import UsageError
from autoprune.plan import LayerRule, PruningPlan
from autoprune.report import write_report
from autoprune.results import RunConfig, load_run, target_front, write_run
from autoprune.trial import TrialResult

TASK = "autoprune.testing.tasks:synthetic_task"
FAST = {"warmup_runs": 2, "warmup_seconds": 0.0, "min_runs": 5, "min_seconds": 0.02,
        "max_runs": 200, "max_seconds": 0.2, "target_ci": 0.05}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real two-target search; params<15K makes the dense model infeasible (19.8K)."""
    from autoprune.search import run_search

    tmp = tmp_path_factory.mktemp("report")
    specs = []
    for name in ("cpu-1t", "cpu"):
        (tmp / f"{name}.json").write_text(json.dumps({"base": name, **FAST}))
        specs.append(str(tmp / f"{name}.json"))
    run_search(TASK, "per_layer_structured", ["params<15K"], targets=specs, trials=6,
               finetune_steps=4, output=tmp / "run", progress=False)
    return tmp / "run"


def _figure_json(html: str, div_id: str) -> str:
    """The JSON plotly draws the figure ``div_id`` from (the script after its div)."""
    start = html.index(f'id="{div_id}"')
    return html[start:html.index("</script>", start)]


def test_report_holds_every_front_with_baselines(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    html = path.read_text()
    config, results = load_run(run_dir)
    assert config.target_names == ["cpu-1t", "cpu"]
    for target in config.target_names:
        front = target_front(results, config, target)
        assert front
        numbers = ", ".join(str(r.number) for r in front)
        assert f"Pareto trials on {target}: {numbers}</p>" in html
        figure = _figure_json(html, f"front-{target}")
        assert f"p50 latency on {target} (ms)" in figure
        for r in front:  # labelled on the chart, listed in the table with its plan file
            assert f'"#{r.number}"' in figure
            assert f"<td>pareto/trial_{r.number}.json</td>" in html
        for r in results:
            if r.baseline:  # the dense model and every uniform baseline are marked
                assert f"{r.baseline} (trial {r.number})" in figure
        assert '"Pareto front"' in figure and '"symbol":"star"' in figure
    # The dense model broke params<15K: listed with its reason; budgets drawn on the chart.
    dense = next(r for r in results if r.baseline == "dense")
    assert dense.status == "infeasible"
    assert f"<td>{dense.number}</td><td>infeasible</td><td>dense</td>" in html
    assert "breaks params&lt;15K (measured 1.981e+04)" in html
    assert "sparsity" in _figure_json(html, "sparsity")
    assert 'id="history-metric"' in html and 'id="history-latency"' in html
    # Self-contained: plotly.js inlined, nothing fetched.
    assert "<script src" not in html and "cdn.plot.ly" not in html.split("<body>")[1]
    assert len(html) > 3_000_000


def test_report_cli_writes_the_output_file(run_dir, tmp_path, capsys):
    out = tmp_path / "nested" / "r.html"
    assert main(["report", str(run_dir), "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_report_without_study_db_keeps_trial_numbers(tmp_path):
    """A Ray run has trials.jsonl and run.json but no study.db; numbers may have gaps."""
    config = RunConfig(
        task=TASK, space={"name": "hand-made"}, budgets=["latency<3ms@edge"],
        targets=[{"name": "edge", "spec": "edge.yaml"}, {"name": "cloud", "spec": "cloud.yaml"}],
        objectives=[{"key": "accuracy", "direction": "maximize"},
                    {"key": latency_key("edge"), "direction": "minimize"}],
        metric="accuracy", metric_direction="maximize", backend="ray")

    def result(n, status, acc, edge, cloud, baseline=None, reason="", **rules):
        m = {latency_key("edge"): edge, latency_key("cloud"): cloud, "params": 1e4 / (n + 1)}
        if acc is not None:
            m["accuracy"] = acc
        plan = PruningPlan(rules={k: LayerRule("structured", v) for k, v in rules.items()})
        return TrialResult(plan, status, m, reason, number=n, baseline=baseline)

    results = [
        result(0, "infeasible", 0.99, 5.0, 1.0, "dense", "breaks latency<3ms@edge"),
        result(1, "complete", 0.95, 2.5, 0.5, conv1=0.25, conv2=0.5),
        result(2, "complete", 0.90, 1.5, 0.6, "uniform-structured-0.5", conv1=0.5, conv2=0.5),
        # trial 3 left no result (e.g. a worker crashed)
        result(4, "failed", None, 1.0, 0.4, reason="ExportError: <Unsupported op> in conv3"),
        result(5, "pruned", 0.2, 2.0, 0.7, reason="stopped early at step 2 (accuracy 0.2)"),
    ]
    results[1].fallbacks = {"conv1": "bn_scale -> l1"}  # what ranked conv1, recorded
    write_run(tmp_path, config, results)
    config.save(tmp_path)
    assert not (tmp_path / "study.db").exists()
    html = write_report(tmp_path, tmp_path / "out.html").read_text()
    assert "Pareto trials on edge: 1, 2</p>" in html
    assert "Pareto trials on cloud: 1</p>" in html  # on cloud trial 1 dominates trial 2
    # Optuna's hover text carries the run's trial numbers (trial 3's gap is kept).
    edge = _figure_json(html, "front-edge")
    assert '\\"number\\": 5' not in edge  # pruned: not on a front chart
    assert '\\"number\\": 2' in edge and '\\"number\\": 0' in edge
    assert "ExportError: &lt;Unsupported op&gt; in conv3" in html  # escaped reason
    assert "stopped early at step 2" in html
    assert ("<h2>Criterion fallbacks (1 trials)</h2>\n<ul><li>trial 1: 1 group(s) ranked "
            "bn_scale -&gt; l1 (the criterion cannot score them), e.g. conv1</li></ul>") in html
    heat = _figure_json(html, "sparsity")
    assert '"conv1"' in heat and '"conv2"' in heat and "S 0.25" in heat


def test_missing_plotly_says_how_to_install(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(UsageError, match=r"pip install 'autoprune\[report\]'"):
        write_report(run_dir)
    assert main(["report", str(run_dir)]) == 2
    assert "autoprune[report]" in capsys.readouterr().err


CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    if CHROMIUM is None:
        # .ci/run installs Chromium and sets this, so CI draws the report instead of skipping
        assert not os.environ.get("AUTOPRUNE_REQUIRE_CHROMIUM"), "Chromium is not installed"
        pytest.skip("needs chromium (apt-get install chromium)")
    html = write_report(run_dir, tmp_path / "report.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--virtual-time-budget=15000"]
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom",
                          html.as_uri()], capture_output=True, text=True, timeout=240).stdout
    charts = len(re.findall(r'class="plotly-graph-div"', html.read_text()))
    assert charts == 5  # two fronts, sparsity, metric history, latency history
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom)) == charts  # all drawn
    assert dom.count('class="main-svg"') >= 2 * charts
    png = tmp_path / "report.png"
    subprocess.run([*flags, f"--user-data-dir={tmp_path / 'p2'}", f"--screenshot={png}",
                    "--window-size=1400,2400", html.as_uri()], capture_output=True,
                   timeout=240)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
