"""The run directory of a search: the one module that names its files (the same for every
backend)::

    run.json             how the search was configured (for --resume, show, report, plan)
    study.db             the Optuna study (Optuna backend; optuna-dashboard opens it)
    ray/                 the Ray Tune experiment and its journal (Ray backend)
    latency_cache.json   measured latencies by architecture, target and protocol
    cost_profile.jsonl   the cost model's profile, measured before the first trial
    trials.jsonl         every finished trial: plan, status, reason, metrics, timings
    trials.csv           the same as a table
    pareto/              one plan file per Pareto-optimal trial (plan + metrics + targets)
    summary.md           the summary printed at the end of the search
    verify.json          proxy against final metric of verified plans (--verify)
    deployment.md/.json  the deployment plan across targets (autoprune plan)
    report.html          the HTML report (autoprune report)
"""

from __future__ import annotations

__all__ = ["RUN_JSON", "STUDY_DB", "RAY_DIR", "LATENCY_CACHE", "COST_PROFILE", "TRIALS_JSONL",
           "TRIALS_CSV", "PARETO_DIR", "SUMMARY_MD", "VERIFY_JSON", "DEPLOYMENT_MD",
           "DEPLOYMENT_JSON", "REPORT_HTML"]

RUN_JSON = "run.json"
STUDY_DB = "study.db"
RAY_DIR = "ray"
LATENCY_CACHE = "latency_cache.json"
COST_PROFILE = "cost_profile.jsonl"
TRIALS_JSONL = "trials.jsonl"
TRIALS_CSV = "trials.csv"
PARETO_DIR = "pareto"
SUMMARY_MD = "summary.md"
VERIFY_JSON = "verify.json"
DEPLOYMENT_MD = "deployment.md"
DEPLOYMENT_JSON = "deployment.json"
REPORT_HTML = "report.html"
