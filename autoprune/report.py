"""A self-contained HTML report of a run: ``autoprune report RUN``.

Sections: the deployment plan (recommended plan per target), the Pareto front on every target
(Optuna's ``plot_pareto_front``, with the dense model, the uniform baselines and the budgets
marked), the per-layer sparsity of every Pareto plan (a plotly heatmap), the trial history
(Optuna's ``plot_optimization_history`` of the task metric, then latency per target by trial)
and the failed / infeasible / early-stopped trials with their reasons.

Everything is read from the run directory's ``trials.jsonl`` and ``run.json``, which every
backend writes (a Ray run has no ``study.db``): each chart is drawn from an in-memory Optuna
study rebuilt per target, so trial numbers match the run's. plotly.js is inlined, so the file
works offline. Needs plotly: ``pip install 'autoprune[report]'``.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

from autoprune.budget import Budget, latency_key
from autoprune.deployment import deployment_plan, table_rows
from autoprune.errors import UsageError
from autoprune.metrics import Direction, TrialStatus
from autoprune.results import (
    fallback_lines,
    load_run,
    metric_cell,
    steering_lines,
    target_budgets,
    target_front,
    warning_lines,
)
from autoprune.run.config import RunConfig
from autoprune.run.layout import REPORT_HTML
from autoprune.trial import TrialResult

__all__ = ["write_report", "build_figures"]

_STATUS_COLORS = {TrialStatus.COMPLETE: "#1f77b4", TrialStatus.INFEASIBLE: "#ff7f0e",
                  TrialStatus.PRUNED: "#9467bd", TrialStatus.FAILED: "#d62728"}


def _plotly():
    try:
        import plotly  # noqa: F401
        import plotly.graph_objects as go
    except ImportError:
        raise UsageError("autoprune report needs plotly: pip install 'autoprune[report]' "
                         "(or pip install plotly)") from None
    return go


def _silence_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def _short(baseline: str | None) -> str:
    if not baseline:
        return ""
    if baseline.startswith("uniform-"):
        mode, _, sparsity = baseline[len("uniform-"):].rpartition("-")
        return f"uniform {sparsity}" + ("" if mode == "structured" else f" {mode}")
    return baseline


def _hover(r: TrialResult, config: RunConfig) -> dict[str, Any]:
    """The user attributes Optuna's hover text shows (kept short: no plan, no curve)."""
    m = r.metrics
    attrs: dict[str, Any] = {"status": r.status}
    if r.baseline:
        attrs["baseline"] = r.baseline
    for t in config.target_names:
        for stat in ("p50", "p90"):
            if latency_key(t, stat) in m:
                attrs[f"{stat} ms @{t}"] = round(m[latency_key(t, stat)], 5)
    for key in ("params", "macs", "size_bytes"):
        if key in m:
            attrs[key] = int(m[key])
    attrs["quantize"] = r.plan.quantize
    if r.plan.drop_blocks:
        attrs["blocks dropped"] = ", ".join(r.plan.drop_blocks)
    if f"{config.metric}_fp32" in m:  # a quantized plan: its metric is the quantized model's
        attrs[f"{config.metric} fp32"] = round(m[f"{config.metric}_fp32"], 5)
    if r.reason:
        attrs["reason"] = r.reason[:200]
    return attrs


def _numbered(results: list[TrialResult]) -> list[TrialResult | None]:
    """Results indexed by trial number (gaps: trials that left no result, e.g. a crash)."""
    numbered = [r for r in results if r.number is not None]
    if len(numbered) != len(results):  # no numbers: keep the file's order
        return list(results)
    out: list[TrialResult | None] = [None] * (max((r.number for r in numbered), default=-1) + 1)
    for r in numbered:
        out[r.number] = r
    return out


def _study(directions: list[str], results: list[TrialResult], config: RunConfig, values,
           constraints=None):
    """An in-memory Optuna study with one trial per run trial (same numbers).

    ``values(r)`` gives the trial's objective values or None (then the trial is shown as
    failed); ``constraints(r)`` its constraint values (<= 0: feasible).
    """
    optuna = _silence_optuna()
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(directions=directions)
    trials = []
    for r in _numbered(results):
        v = values(r) if r is not None else None
        if v is None:
            trials.append(create_trial(state=TrialState.FAIL, user_attrs=(
                _hover(r, config) if r is not None else {"status": "no result"})))
            continue
        trials.append(create_trial(
            state=TrialState.COMPLETE, values=v, user_attrs=_hover(r, config),
            constraints=constraints(r) if constraints else None))
    study.add_trials(trials)
    return study


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _budget_lines(fig, budgets: list[Budget], config: RunConfig, target: str) -> None:
    """Dashed lines on a front plot: latency budgets of ``target`` (x), metric budgets (y)."""
    for b in budgets:
        style = {"line_dash": "dash", "line_color": "#c0392b", "annotation_text": b.text,
                 "annotation_font_color": "#c0392b"}
        if b.limits_latency_on(target, config.primary):
            fig.add_vline(x=b.value, **style)
        elif b.metric == config.metric:
            fig.add_hline(y=b.value, **style)


def front_figure(config: RunConfig, results: list[TrialResult], target: str,
                 front: list[TrialResult]):
    """Optuna's Pareto-front plot of metric vs p50 latency on ``target``, baselines marked.

    Feasibility is judged with the budgets that apply to ``target``; trials that were not
    fine-tuned (they broke a budget) are infeasible.
    """
    go = _plotly()
    optuna = _silence_optuna()
    lat = latency_key(target)
    budgets = target_budgets(config, target)
    metric = config.metric

    def values(r: TrialResult) -> list[float] | None:
        m = r.metrics
        measured = r.status in (TrialStatus.COMPLETE, TrialStatus.INFEASIBLE)
        if not measured or not _finite(m.get(metric), m.get(lat)):
            return None
        return [m[metric], m[lat]]

    def constraints(r: TrialResult) -> dict[str, float]:
        out = {b.text: b.violation_by(r.metrics, config.primary) for b in budgets}
        out["fine-tuned"] = 0.0 if r.status == TrialStatus.COMPLETE else 1.0
        return out

    directions = [config.metric_direction, Direction.MINIMIZE]
    study = _study(directions, results, config, values, constraints)
    # Latency on x, the metric on y: how people read an accuracy-latency trade-off.
    fig = optuna.visualization.plot_pareto_front(
        study, target_names=[f"p50 latency on {target} (ms)", metric],
        targets=lambda t: [t.values[1], t.values[0]])
    styles = {  # Optuna's traces, by the label of their hover box: legend name, colour
        "Best Trial": ("Pareto front", "#d62728"), "Feasible Trial": ("meets budgets", "#1f77b4"),
        "Trial": ("dominated", "#1f77b4"),
        "Infeasible Trial": ("breaks a budget / not fine-tuned", "#bbbbbb")}
    for trace in fig.data:
        label = str(trace.hovertemplate or "").split("<extra>")[-1].replace("</extra>", "")
        name, color = styles.get(label, (label or trace.name, None))
        trace.name, trace.showlegend = name, True
        if color is not None:  # one colour per kind (Optuna colours by trial number)
            trace.marker.color, trace.marker.showscale = color, False
            trace.marker.size = 9
    points = [r for r in front if _finite(r.metrics.get(lat), r.metrics.get(metric))]
    if points:
        pts = sorted(points, key=lambda r: r.metrics[lat])
        fig.add_trace(go.Scatter(
            x=[r.metrics[lat] for r in pts], y=[r.metrics[metric] for r in pts],
            mode="lines+text", text=[f"#{r.number}" for r in pts], textposition="top left",
            line={"color": "rgba(31,119,180,0.5)", "shape": "hv"}, hoverinfo="skip",
            name="front (trial numbers)"))
    marks = [r for r in results if r.baseline and _finite(r.metrics.get(lat),
                                                           r.metrics.get(metric))]
    for r in marks:
        dense = r.baseline == "dense"
        fig.add_trace(go.Scatter(
            x=[r.metrics[lat]], y=[r.metrics[metric]], mode="markers+text",
            text=[_short(r.baseline)], textposition="bottom right",
            marker={"symbol": "star" if dense else "diamond", "size": 16 if dense else 12,
                    "color": "#f1c40f" if dense else "#2ecc71",
                    "line": {"color": "black", "width": 1}},
            name=f"{r.baseline} (trial {r.number})", legendgroup="baselines",
            hovertemplate=(f"trial {r.number}: {r.baseline}, {r.status}<br>{metric} "
                           "%{y:.4f}<br>p50 %{x:.4g} ms<extra></extra>")))
    _budget_lines(fig, budgets, config, target)
    fig.update_layout(title=f"Pareto front on {target}: {metric} vs p50 latency",
                      height=520, legend={"orientation": "v"}, margin={"t": 60})
    return fig


def sparsity_figure(config: RunConfig, plans: dict[int, tuple[TrialResult, list[str]]]):
    """Heatmap of per-group sparsity: one row per Pareto plan, one column per group."""
    go = _plotly()
    columns: list[str] = []
    for r, _ in plans.values():
        for key in r.plan.rules:
            if key not in columns:
                columns.append(key)
    if not columns:
        columns = ["(all layers)"]
    z, text, custom, labels = [], [], [], []
    for number, (r, targets) in sorted(plans.items()):
        row_z, row_text, row_custom = [], [], []
        for col in columns:
            if col == "(all layers)":
                rule = r.plan.default
            elif col.startswith("re:"):
                rule = r.plan.rules.get(col, r.plan.default)
            else:
                rule = r.plan.rule_for(col)
            value = rule.sparsity if rule.active else 0.0
            row_z.append(value)
            row_text.append({"structured": "S", "unstructured": "U"}.get(rule.mode, "-")
                            + (f" {value:.2f}" if rule.active else ""))
            row_custom.append(f"{rule.mode}, {rule.criterion}")
        z.append(row_z)
        text.append(row_text)
        custom.append(row_custom)
        name = f"trial {number}" + (f" ({_short(r.baseline)})" if r.baseline else "")
        name += f" {r.plan.quantize}" if r.plan.quantize != "none" else ""
        labels.append(f"{name} [{', '.join(targets)}]")
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=labels, text=text, texttemplate="%{text}", customdata=custom,
        zmin=0.0, zmax=1.0, colorscale="Blues", colorbar={"title": {"text": "sparsity"}},
        hovertemplate="%{y}<br>%{x}: sparsity %{z:.2f} (%{customdata})<extra></extra>"))
    fig.update_layout(
        title="Per-group sparsity of the Pareto plans (S structured, U unstructured, - skipped;"
              " [fronts the plan is on])",
        height=max(320, 60 + 34 * len(labels)), margin={"l": 10, "t": 60},
        xaxis={"tickangle": -35}, yaxis={"autorange": "reversed"})
    return fig


def metric_history_figure(config: RunConfig, results: list[TrialResult]):
    """Optuna's optimization history of the task metric (fine-tuned trials), best so far."""
    optuna = _silence_optuna()
    metric = config.metric

    def values(r: TrialResult) -> list[float] | None:
        v = r.metrics.get(metric)
        return [v] if r.status == TrialStatus.COMPLETE and _finite(v) else None

    study = _study([config.metric_direction], results, config, values)
    fig = optuna.visualization.plot_optimization_history(study, target_name=metric)
    fig.update_layout(title=f"Trial history: {metric} of fine-tuned trials (Optuna)",
                      height=380, margin={"t": 60})
    return fig


def latency_history_figure(config: RunConfig, results: list[TrialResult]):
    """p50 latency on every target by trial number, coloured by trial status."""
    go = _plotly()
    from plotly.subplots import make_subplots

    targets = config.target_names
    fig = make_subplots(rows=len(targets), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"p50 latency on {t} (ms)" for t in targets])
    for row, target in enumerate(targets, start=1):
        lat = latency_key(target)
        for status, color in _STATUS_COLORS.items():
            rs = [r for r in results if r.status == status and _finite(r.metrics.get(lat))]
            rs.sort(key=lambda r: r.baseline is not None)  # the legend shows the first symbol
            if not rs:
                continue
            fig.add_trace(go.Scatter(
                x=[r.number for r in rs], y=[r.metrics[lat] for r in rs], mode="markers",
                marker={"color": color, "size": 8,
                        "symbol": ["star" if r.baseline == "dense" else
                                   "diamond" if r.baseline else "circle" for r in rs]},
                name=status, legendgroup=status, showlegend=row == 1,
                text=[html.escape(f"trial {r.number} {r.baseline or ''} {r.reason[:120]}")
                      for r in rs],
                hovertemplate="%{text}<br>p50 %{y:.4g} ms<extra>" + status + "</extra>"),
                row=row, col=1)
        for b in target_budgets(config, target):
            if b.metric == "latency":
                fig.add_hline(y=b.value, line_dash="dash", line_color="#c0392b",
                              annotation_text=b.text, annotation_font_color="#c0392b",
                              row=row, col=1)
    numbers = [r.number for r in results if r.number is not None]
    if numbers:  # every trial number on the axis, failed ones (no latency) included
        fig.update_xaxes(range=[min(numbers) - 0.5, max(numbers) + 0.5])
    fig.update_xaxes(title_text="trial", row=len(targets), col=1)
    fig.update_layout(title="Trial history: latency per target (stars: dense, diamonds: "
                            "uniform baselines)",
                      height=260 * len(targets) + 120, margin={"t": 80})
    return fig


def build_figures(config: RunConfig, results: list[TrialResult]) -> dict[str, Any]:
    """All report figures by name (``front:TARGET``, ``sparsity``, ``history:*``)."""
    figures: dict[str, Any] = {}
    on_fronts: dict[int, tuple[TrialResult, list[str]]] = {}
    for target in config.target_names:
        front = target_front(results, config, target)
        figures[f"front:{target}"] = front_figure(config, results, target, front)
        for r in front:
            on_fronts.setdefault(r.number, (r, []))[1].append(target)
    if on_fronts:
        figures["sparsity"] = sparsity_figure(config, on_fronts)
    if any(r.status == TrialStatus.COMPLETE and config.metric in r.metrics for r in results):
        figures["history:metric"] = metric_history_figure(config, results)
    if results:
        figures["history:latency"] = latency_history_figure(config, results)
    return figures


# -- HTML -----------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 24px auto; max-width: 1320px; color: #222; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom:
1px solid #ddd; padding-bottom: 4px; } h3 { margin-top: 1.2em; }
.meta { color: #555; } table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } tr.bad td { background: #fff3f0; }
td.reason { max-width: 720px; font-family: ui-monospace, Menlo, monospace; font-size: 0.9em; }
.note { color: #444; } .figure { margin: 8px 0 24px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _html_table(header: list[str], rows: list[list[str]], bad: list[bool] | None = None,
                reason_col: int | None = None) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = ' class="bad"' if bad and bad[i] else ""
        out.append(f"<tr{cls}>" + "".join(
            f'<td class="reason">{_e(c)}</td>' if j == reason_col else f"<td>{_e(c)}</td>"
            for j, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _front_table(config: RunConfig, front: list[TrialResult], target: str,
                 dense: TrialResult | None, run_dir: Path) -> str:
    lat, lat90 = latency_key(target), latency_key(target, "p90")
    dense_lat = dense.metrics.get(lat) if dense else None
    rows = []
    for r in front:
        m = r.metrics
        speed = f"{dense_lat / m[lat]:.2f}x" if dense_lat and m.get(lat) else "-"
        plan_file = f"pareto/trial_{r.number}.json"
        rows.append([str(r.number), r.baseline or "",
                     metric_cell(r, config.metric), f"{m[lat]:.4g}" if lat in m else "-",
                     f"{m[lat90]:.4g}" if lat90 in m else "-", speed,
                     f"{m.get('params', 0) / 1e3:.1f}K", f"{m.get('size_bytes', 0) / 1e3:.1f} KB",
                     r.plan.quantize,
                     plan_file if (run_dir / plan_file).is_file() else "-"])
    header = ["trial", "baseline", config.metric, "p50 ms", "p90 ms", "speed-up vs dense",
              "params", "size", "quantize", "plan file"]
    return _html_table(header, rows)


def _figure_html(fig, div_id: str) -> str:
    return '<div class="figure">' + fig.to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id,
        config={"displaylogo": False, "responsive": True}) + "</div>"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text)


def _lines_html(lines: list[str]) -> str:
    """Markdown lines of headings (##), bullets (- ) and paragraphs as HTML."""
    html = []
    for line in lines:
        if line.startswith("## "):
            html.append(f"<h2>{_e(line[3:])}</h2>")
        elif line.startswith("- "):
            html.append(f"<ul><li>{_e(line[2:])}</li></ul>")
        elif line:
            html.append(f"<p>{_e(line)}</p>")
    return "\n".join(html).replace("</ul>\n<ul>", "")


def render_html(run_dir: Path, config: RunConfig, results: list[TrialResult]) -> str:
    """The report as one HTML string (plotly.js inlined)."""
    _plotly()
    from plotly.offline import get_plotlyjs

    from autoprune import __version__

    figures = build_figures(config, results)
    plan = deployment_plan(config, results)
    for t in plan.targets:
        if t.trial is not None:
            for rel in (f"pareto/trial_{t.trial.number}.json",
                        f"deployment/trial_{t.trial.number}.json"):
                if (run_dir / rel).is_file():
                    t.plan_file = rel
                    break
            else:
                t.plan_file = f"not saved (autoprune plan {run_dir} writes it)"
    dense = next((t.dense for t in plan.targets if t.dense), None)
    counts = ", ".join(f"{n} {s}" for s, n in plan.counts.items())
    body = [
        f"<h1>autoprune report: {_e(config.task)}</h1>",
        f'<p class="meta">Run <code>{_e(run_dir)}</code> &middot; space '
        f"<b>{_e(config.space.get('name'))}</b> &middot; backend {_e(config.backend)} / "
        f"{_e(config.sampler)} &middot; {len(results)} trials ({_e(counts)}) &middot; budgets: "
        f"<b>{_e(config.budgets_text())}</b> &middot; targets: "
        f"<b>{_e(', '.join(config.target_names))}</b></p>",
        "<h2>Deployment plan</h2>",
        '<p class="note">Recommended plan per target: the best '
        f"{_e(config.metric)} among plans meeting the budgets that apply to the target "
        "(<code>autoprune plan</code> writes the same table).</p>",
    ]
    header, rows = table_rows(plan)
    body.append(_html_table(header, rows, bad=[not t.met for t in plan.targets]))
    body.append("<ul>" + "".join(f"<li><b>{_e(t.target)}</b>: {_e(t.note)}</li>"
                                 for t in plan.targets) + "</ul>")
    body.append(_lines_html(plan.busy_lines))
    body.append(_lines_html(steering_lines(results, config, dense)))
    body.append("<h2>Pareto front per target</h2>")
    body.append('<p class="note">Accuracy depends only on the plan, latency on the plan and the '
                "target: each target keeps its own front. Star: the dense model; diamonds: "
                "uniform baselines; dashed lines: budgets. Hover a point for its trial.</p>")
    for target in config.target_names:
        front = target_front(results, config, target)
        body.append(f"<h3>{_e(target)}</h3>")
        body.append(_figure_html(figures[f"front:{target}"], f"front-{_slug(target)}"))
        body.append(f"<p>Pareto trials on {_e(target)}: "
                    f"{_e(', '.join(str(r.number) for r in front) or 'none')}</p>")
        body.append(_front_table(config, front, target, dense, run_dir))
    if "sparsity" in figures:
        body.append("<h2>Per-layer sparsity of the Pareto plans</h2>")
        body.append(_figure_html(figures["sparsity"], "sparsity"))
    body.append("<h2>Trial history</h2>")
    for key in ("history:metric", "history:latency"):
        if key in figures:
            body.append(_figure_html(figures[key], key.replace(":", "-")))
    fell_back = fallback_lines(results)
    if fell_back:
        body.append(f"<h2>Criterion fallbacks ({len(fell_back)} trials)</h2>")
        body.append(_lines_html(fell_back))
    warned = warning_lines(results)
    if warned:
        body.append("<h2>Warnings</h2>")
        body.append(_lines_html(warned))
    others = [r for r in results if r.status != TrialStatus.COMPLETE]
    body.append(f"<h2>Failed, infeasible and early-stopped trials ({len(others)})</h2>")
    if others:
        rows = [[str(r.number), r.status, r.baseline or "",
                 f"{r.metrics[config.metric]:.4f}" if config.metric in r.metrics else "-",
                 ", ".join(f"{r.metrics[latency_key(t)]:.4g}" if latency_key(t) in r.metrics
                           else "-" for t in config.target_names),
                 r.reason] for r in others]
        body.append(_html_table(
            ["trial", "status", "baseline", config.metric,
             f"p50 ms ({', '.join(config.target_names)})", "reason"], rows, reason_col=5))
    else:
        body.append("<p>Every trial completed.</p>")
    body.append(f'<p class="meta">Generated by autoprune {_e(__version__)} on '
                f"{time.strftime('%Y-%m-%d %H:%M')} from trials.jsonl and run.json.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>autoprune report: {_e(config.task)}</title>"
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>\n'
            + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of a run (default ``RUN/report.html``) and return its path.

    Example:
        >>> write_report("runs/digits")  # doctest: +SKIP
        PosixPath('runs/digits/report.html')
    """
    run_dir = Path(run_dir)
    _plotly()  # fail before any work when plotly is missing
    config, results = load_run(run_dir)
    path = Path(output) if output else run_dir / REPORT_HTML
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(run_dir, config, results), encoding="utf-8")
    return path
