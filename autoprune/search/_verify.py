"""``--verify K``: does the search's proxy predict what the user gets?

The search ranks plans by their metric after brief fine-tuning (the proxy); a user applies the
winner with the task's full fine-tuning. Here the top K plans of the front and K others, spread
over the proxy's range, are fine-tuned again with the task's full budget and evaluated; the
Kendall tau between proxy and final metric goes into the summary and ``verify.json``. The best
plan is fine-tuned a second time with another seed: the difference is the final metric's
noise, and a tau over plans whose final metrics lie within it says little.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from autoprune.budget import latency_key
from autoprune.metrics import Direction, TrialStatus
from autoprune.results import recommend, target_front, uniform_reference
from autoprune.run.config import RunConfig
from autoprune.run.layout import VERIFY_JSON
from autoprune.trial import TrialResult, TrialSettings, run_trial

__all__ = ["Verification", "kendall_tau", "pick_plans", "final_result", "verify_search",
           "verify_section"]



@dataclass
class Verification:
    """Proxy vs final metric of some plans of a search (``verify.json``)."""

    metric: str  # the task metric
    proxy_steps: int  # fine-tuning steps of the search's trials
    final_steps: int  # the task's full fine-tuning steps
    plans: list[dict[str, Any]] = field(default_factory=list)  # trial, baseline, proxy, final, ms
    tau: float = math.nan  # Kendall tau-b between proxy and final metric (nan: < 2 plans)
    noise: float = math.nan  # |final(seed) - final(seed + 1)| of the best plan
    recommended: int | None = None  # trial number of the recommended plan (among ``plans``)
    uniform: int | None = None  # the best uniform baseline at its latency (among ``plans``)

    @property
    def spread(self) -> float:
        finals = [p["final"] for p in self.plans if math.isfinite(p["final"])]
        return max(finals) - min(finals) if finals else math.nan

    @property
    def conclusive(self) -> bool:
        """The final metrics differ by more than their noise (else tau says little)."""
        return self.spread > 2 * self.noise if math.isfinite(self.noise) else False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread, "conclusive": self.conclusive}

    def section(self) -> str:
        """The summary's Markdown section."""
        m = self.metric
        lines = ["", f"## Proxy check (--verify): {m} after {self.proxy_steps} fine-tuning "
                     f"steps vs after the task's full {self.final_steps}", ""]
        if not self.plans:
            return "\n".join([*lines, "no completed plan to verify", ""])
        verdict = ("" if self.conclusive else
                   " The final metrics differ by no more than twice their noise: tau says "
                   "little here.")
        lines += [f"Kendall tau between proxy and final {m} over {len(self.plans)} plans: "
                  f"{self.tau:.2f}. Final {m} {self.spread:.4f} apart (range); a second seed "
                  f"moved the best plan's by {self.noise:.4f} (noise).{verdict}", "",
                  f"| trial | baseline | proxy {m} | final {m} | p50 ms |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['trial']} | {p['baseline'] or ''} | {p['proxy']:.4f} | "
                  f"{p['final']:.4f} | {p['latency_ms']:.3f} |" for p in self.plans]
        return "\n".join([*lines, *self._against_uniform()]) + "\n"

    def _against_uniform(self) -> list[str]:
        """The product's claim checked on the final metric: the recommended plan against the
        best uniform baseline at equal latency, both fully fine-tuned."""
        by_trial = {p["trial"]: p for p in self.plans}
        best, ref = by_trial.get(self.recommended), by_trial.get(self.uniform)
        if best is None or ref is None:
            return []
        m = self.metric
        return ["", f"After the task's full fine-tuning, the recommended plan (trial "
                    f"{best['trial']}) reaches {m} {best['final']:.4f} and the best uniform "
                    f"baseline at equal latency ({ref['baseline']}, trial {ref['trial']}) "
                    f"{ref['final']:.4f}: {best['final'] - ref['final']:+.4f} (noise "
                    f"{self.noise:.4f})."]


_FIELDS = {f.name for f in fields(Verification)}


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties counted as in scipy); nan for fewer than 2 pairs or no variation."""
    import warnings

    from scipy.stats import kendalltau

    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 2:
        return math.nan
    with warnings.catch_warnings():  # a constant input: scipy warns and returns nan
        warnings.simplefilter("ignore")
        return float(kendalltau(*zip(*pairs)).statistic)


def pick_plans(results: list[TrialResult], config: RunConfig, k: int) -> list[TrialResult]:
    """The top ``k`` plans of the primary target's front and ``k`` other completed plans at
    evenly spaced ranks of the proxy metric (each plan once; the unchanged dense model is no
    plan to verify)."""
    sign = -Direction(config.metric_direction).sign
    distinct: dict[str, TrialResult] = {}
    for r in results:
        changes = r.plan.quantize != "none" or any(
            rule.active for rule in [r.plan.default, *r.plan.rules.values()])
        if (r.status == TrialStatus.COMPLETE and changes
                and math.isfinite(r.metrics.get(config.metric, math.nan))):
            distinct.setdefault(r.plan.key(), r)
    top = [r for r in target_front(results, config, config.primary)
           if r.plan.key() in distinct][:k]
    chosen = {r.plan.key() for r in top}
    rest = sorted((r for key, r in distinct.items() if key not in chosen),
                  key=lambda r: sign * r.metrics[config.metric])
    if len(rest) <= k:
        return top + rest
    picks = sorted({round(i * (len(rest) - 1) / max(1, k - 1)) for i in range(k)})
    return top + [rest[i] for i in picks]


def final_result(task: Any, plan: Any, seed: int, device: str = "cpu") -> TrialResult:
    """``plan`` fine-tuned with the task's full budget and evaluated (no latency, no budget):
    what ``autoprune apply`` gives the user."""
    full = task.finetune.replace(eval_every=0)
    return run_trial(task, plan, TrialSettings(targets=[], finetune=full, seed=seed,
                                               device=device))


def verify_search(task: Any, results: list[TrialResult], config: RunConfig,
                  settings: TrialSettings, k: int, run_dir: Path,
                  say: Callable[[str], None]) -> Verification:
    """Fine-tune :func:`pick_plans`, plus the recommended plan and the best uniform baseline
    at its latency, with the task's full budget; write ``verify.json``."""
    plans = pick_plans(results, config, k)
    proxy = settings.finetune or task.finetune
    out = Verification(config.metric, proxy.steps, task.finetune.steps)
    best = recommend(results, config)
    ref = uniform_reference(results, config, best) if best is not None else None
    if best is not None and ref is not None and not (best.baseline or "").startswith(
            ("dense", "uniform")):
        for r in (best, ref):  # compared on the final metric too
            if r.plan.key() not in {p.plan.key() for p in plans}:
                plans.append(r)
        numbers = {p.plan.key(): p.number for p in plans}
        out.recommended, out.uniform = numbers[best.plan.key()], numbers[ref.plan.key()]
    say(f"verifying the proxy: {len(plans)} plan(s) fine-tuned with the task's full budget "
        f"({task.finetune.steps} steps)")
    lat = latency_key(config.primary)
    for r in plans:
        final = final_result(task, r.plan, config.seed, settings.device)
        value = final.metrics.get(config.metric, math.nan)
        out.plans.append({"trial": r.number, "baseline": r.baseline,
                          "proxy": r.metrics[config.metric], "final": value,
                          "latency_ms": r.metrics.get(lat, math.nan), "status": final.status,
                          "reason": final.reason})
    out.tau = kendall_tau([p["proxy"] for p in out.plans], [p["final"] for p in out.plans])
    if plans:
        again = final_result(task, plans[0].plan, config.seed + 1, settings.device)
        out.noise = abs(again.metrics.get(config.metric, math.nan) - out.plans[0]["final"])
    (run_dir / VERIFY_JSON).write_text(json.dumps(out.to_dict(), indent=2))
    return out


def verify_section(run_dir: str | Path) -> str:
    """The summary section of a verified run (empty if the run was not verified)."""
    path = Path(run_dir) / VERIFY_JSON
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    return Verification(**{k: v for k, v in data.items() if k in _FIELDS}).section()
