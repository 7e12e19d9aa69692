"""Command line: ``autoprune search | apply | layers | bench | show | plan | report``, and
``autoprune serve-latency``.

Each subcommand is one small function taking the parsed arguments and returning an exit code.
Usage errors (bad budgets, plans, task files, options) print a message and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from autoprune import __version__
from autoprune.errors import AutopruneError, UsageError
from autoprune.run.layout import RUN_JSON

__all__ = ["main", "build_parser"]

EXAMPLES = {
    "search": 'autoprune search --task digits --budget "latency<1.5ms" --trials 40',
    "apply": "autoprune apply runs/digits/pareto/trial_12.json --task digits --output ship/",
    "layers": "autoprune layers --task digits",
    "bench": "autoprune bench --task digits --plan ship/plan.json --target cpu-1t",
    "show": "autoprune show runs/digits",
    "plan": "autoprune plan runs/digits",
    "report": "autoprune report runs/digits",
    "serve-latency": "autoprune serve-latency --host 127.0.0.1 --port 8765 --token-file tok",
}


def _search(args: argparse.Namespace) -> int:
    from autoprune.search import run_search

    if not args.task and not args.resume:
        raise UsageError("--task is required (a built-in name such as digits, file.py:make_task "
                         "or package.module:make_task)")
    options = {"address": args.address, "cpus_per_trial": args.cpus_per_trial,
               "gpus_per_trial": args.gpus_per_trial, "max_failures": args.max_failures,
               "isolation": args.isolation}
    try:
        result = run_search(
            args.task, args.space, args.budget, targets=args.target, trials=args.trials,
            output=args.output, backend=args.backend, sampler=args.sampler,
            objectives=args.objectives, seed=args.seed, resume=args.resume,
            finetune_steps=args.finetune_steps, screen_latency=not args.full_latency,
            steer=not args.no_steer, workers=args.workers,
            backend_options=options, progress=not args.quiet, token_file=args.token_file,
            verify=args.verify, quantize=args.quantize, device=args.device)
    except KeyboardInterrupt:
        if args.output and not (Path(args.output) / RUN_JSON).is_file():
            print("\ninterrupted before the first trial: nothing to resume; run the same "
                  "command again", file=sys.stderr)
        else:
            print("\ninterrupted: finished trials are saved; continue with --resume "
                  f"--output {args.output or 'RUN_DIR'}", file=sys.stderr)
        return 130
    print()
    print(result.summary)
    print(f"run directory: {result.run_dir}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from autoprune.device import resolve_device
    from autoprune.finalize import finalize_plan
    from autoprune.plan import PruningPlan
    from autoprune.task import load_task

    plan = PruningPlan.load(args.plan)
    device = resolve_device(args.device)  # before the task loads: a missing GPU fails fast
    metrics = finalize_plan(load_task(args.task), plan, args.output,
                            finetune_steps=args.finetune_steps, targets=args.target,
                            token_file=args.token_file, seed=args.seed, device=device)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        if isinstance(value, dict):  # per group: how many groups got each value
            counts = Counter(value.values())
            shown = ", ".join(f"{v} ({n} groups)" for v, n in counts.items())
        elif isinstance(value, list):
            shown = ", ".join(map(str, value))
        else:
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{key.ljust(width)}  {shown}")
    print(f"wrote {args.output}/model.onnx, plan.json, metrics.json")
    return 0


def _layers(args: argparse.Namespace) -> int:
    from autoprune.prune import droppable_blocks, inspect_model
    from autoprune.task import load_task

    task = load_task(args.task)
    model = task.build_model()
    print(inspect_model(model, task.example_inputs).table())
    blocks = droppable_blocks(model, task.example_inputs)
    if blocks:
        ok = [n for n, why in blocks.items() if why is None]
        print(f"\nblocks of the main stack a plan may drop whole (drop_blocks): "
              f"{', '.join(ok) if ok else 'none'}")
        for name, why in blocks.items():
            if why is not None:
                print(f"  {name}: not droppable, {why}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from autoprune.latency import compare_latency, format_latency_table, load_target
    from autoprune.plan import PruningPlan
    from autoprune.prune import apply_plan
    from autoprune.quantize import quantize_model
    from autoprune.task import load_task

    task = load_task(args.task)
    dense = task.build_model()
    models = {"dense": dense}
    shipped = {}  # label -> the quantized ONNX model a quantizing plan ships
    for path in args.plan or []:
        plan = PruningPlan.load(path)
        calibration = task.calibration_batches(4)
        label = path if plan.quantize == "none" else f"{path} ({plan.quantize})"
        models[label] = apply_plan(dense, plan, task.example_inputs, calibration=calibration,
                                   loss_fn=task.loss_fn, augment=task.augment_fn)
        if plan.quantize != "none":
            shipped[label] = quantize_model(task, models[label], plan.quantize)
    for spec in args.target:
        target = load_target(spec, token_file=args.token_file)
        rows = compare_latency(models, task.example_inputs, target, onnx_models=shipped)
        print(f"target {target.name}")
        print(format_latency_table(rows, statistic=target.statistic))
    return 0


def _show(args: argparse.Namespace) -> int:
    from autoprune.results import load_run, summarize
    from autoprune.search._verify import verify_section

    config, results = load_run(args.run)
    print(summarize(results, config) + verify_section(args.run))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from autoprune.deployment import write_deployment_plan

    print(write_deployment_plan(args.run))
    return 0


def _report(args: argparse.Namespace) -> int:
    from autoprune.report import write_report

    path = write_report(args.run, args.output)
    print(f"wrote {path}")
    return 0


def _serve_latency(args: argparse.Namespace) -> int:
    from autoprune.latency import serve_latency

    serve_latency(args.host, args.port, args.token_file, max_model_mb=args.max_model_mb,
                  read_timeout=args.read_timeout)
    return 0


def _add_task(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--task", required=required,
                   help="built-in task name (digits), path/to/file.py:make_task or "
                        "package.module:make_task")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="where reconstruction, fine-tuning and evaluation run: auto (a GPU "
                        "when torch sees one; default), cpu, cuda, cuda:N. Latency is "
                        "measured on --target")


def _add_targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", default=None,
                   help="latency target: cpu-1t (default), cpu, a profile .yaml/.json, or "
                        "remote://host:port; repeat for several targets")
    p.add_argument("--token-file", help="token file for remote:// targets (or set "
                                        "AUTOPRUNE_LATENCY_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoprune",
        description="Search pruning plans for a PyTorch model: accuracy vs measured ONNX "
                    "Runtime latency.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_,
                           epilog=f"example:\n  {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = command("search", _search, "search pruning plans; writes a run directory")
    _add_task(p, required=False)
    p.add_argument("--space", default="per_layer_structured",
                   help="search space: a shipped name (per_layer_structured, "
                        "per_stage_structured, global_unstructured, mixed, uniform_structured) "
                        "or a YAML file (default: per_layer_structured)")
    p.add_argument("--budget", action="append", default=None,
                   help='hard constraint, repeatable: "latency<10ms", "latency<=2.5ms@p90", '
                        '"latency<5ms@cpu-1t", "accuracy>=0.97", "params<1M", "flops<50M", '
                        '"size<4MB"')
    _add_targets(p)
    p.add_argument("--trials", type=int,
                   help="number of trials (default: 40; on --resume: the run's own)")
    p.add_argument("--output", help="run directory (default: runs/<date-time>)")
    p.add_argument("--backend", choices=["optuna", "ray"], default="optuna",
                   help="optuna: embedded, one machine (default); ray: Ray Tune cluster")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "random"], default="tpe",
                   help="Optuna sampler (default: tpe)")
    p.add_argument("--objectives", action="append",
                   help="extra objectives besides the task metric and latency: params, flops, "
                        "size (e.g. --objectives params,size)")
    p.add_argument("--seed", type=int, default=0, help="sampler and fine-tuning seed")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output (after a crash or Ctrl-C)")
    p.add_argument("--finetune-steps", type=int,
                   help="fine-tuning steps per trial (default: the task's)")
    p.add_argument("--full-latency", action="store_true",
                   help="time every trial with the target's full protocol (default: a quick "
                        "screening protocol during the search, then the full one for the "
                        "front and the baselines)")
    p.add_argument("--no-steer", action="store_true",
                   help="sample sparsities as they are (default: each sampled allocation is "
                        "scaled by the cost model so its predicted cost just meets the "
                        "tightest cost budget)")
    p.add_argument("--workers", type=int, default=1, help="concurrent trials (ray backend)")
    p.add_argument("--address", help="ray: address of an existing cluster ('auto'); default: "
                                     "start a local Ray")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="ray: CPUs per trial")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="ray: GPUs per trial")
    p.add_argument("--max-failures", type=int, default=2,
                   help="ray: retries of a trial whose worker process died (default: 2)")
    p.add_argument("--isolation", choices=["node", "measurements"], default="node",
                   help="ray: node (default) = a measurement has the node to itself; "
                        "measurements = only measurements are serialized")
    p.add_argument("--quantize", choices=["none", "static", "dynamic"],
                   help="limit the space's precision choices to fp32 and this INT8 scheme "
                        "(none: fp32 only, for targets without INT8 kernels)")
    _add_device(p)
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="at the end, fine-tune the front's top K plans and K others with the "
                        "task's full budget and report the Kendall tau between the search's "
                        "metric and theirs (summary, verify.json; default: 0 = off)")

    p = command("apply", _apply, "apply a plan: prune, fine-tune, export ONNX, re-measure")
    p.add_argument("plan", help="plan file (.json/.yaml), e.g. RUN/pareto/trial_12.json")
    _add_task(p)
    p.add_argument("--output", required=True, help="directory for model.onnx and metrics.json")
    p.add_argument("--finetune-steps", type=int,
                   help="fine-tuning steps (default: the task's, as in the search)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    _add_device(p)
    _add_targets(p)

    p = command("layers", _layers, "list prunable groups and layers that cannot be pruned")
    _add_task(p)

    p = command("bench", _bench, "latency of the dense and pruned models, side by side (a "
                                 "quantizing plan is timed as its quantized ONNX model)")
    _add_task(p)
    p.add_argument("--plan", action="append", help="plan file to compare (repeatable)")
    _add_targets(p)

    p = command("show", _show, "print the summary of a run directory")
    p.add_argument("run", help="run directory")

    p = command("plan", _plan, "deployment plan: recommended plan per target (Markdown + JSON)")
    p.add_argument("run", help="run directory")

    p = command("report", _report, "self-contained HTML report of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--output", help="HTML file (default: RUN/report.html)")

    p = command("serve-latency", _serve_latency,
                "serve latency measurements on this device for remote:// targets")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--token-file", help="file holding the shared token (default: "
                                        "$AUTOPRUNE_LATENCY_TOKEN)")
    p.add_argument("--max-model-mb", type=float, default=256,
                   help="largest ONNX model accepted, in MiB (default: 256)")
    p.add_argument("--read-timeout", type=float, default=20.0,
                   help="seconds a client may stay silent while sending a request; a model "
                        "must also arrive at >= 256 KiB/s (default: 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    if getattr(args, "target", "unset") is None:
        args.target = ["cpu-1t"]
    try:
        return args.fn(args)
    except BrokenPipeError:  # e.g. `autoprune show RUN | head`
        sys.stderr.close()
        return 0
    except UsageError as e:
        print(f"autoprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except AutopruneError as e:
        print(f"autoprune {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
