"""Grouped convolutions on ONNX Runtime: remove channels inside every group, or whole groups?

Builds RegNet-Y models from ``transformers`` configs (random weights; latency depends only on
the architecture) at several group widths, and halves every group of each with
``autoprune.apply_plan`` in the two ways a plan offers:

- ``channels``: every grouped conv keeps half the channels of each group (the group count
  stays, the group width halves);
- ``groups``: the plan's ``whole_groups`` removes half the conv groups whole, with the input
  channels feeding them (the group width stays).

All are timed side by side on ``--target``; MACs from ``model_stats``. ONNX Runtime's x86 CPU
convolutions run on a blocked channel layout (NCHWc, blocks of 16 with AVX-512, 8 with AVX2)
only if every group's input channels are whole blocks (onnxruntime's nchwc_transformer.cc);
otherwise im2col + GEMM with reorders. The table shows what that costs per FLOP, and what the
search's cost model predicted for each way when fitted, as a search fits it, on a profile of
channel-only plans (uniform at four levels and each group alone) measured in the same run.

Run: ``.venv/bin/python benchmarks/grouped_conv.py [--widths 8,16,32,64] [--image 96]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

from autoprune.budget import latency_key  # noqa: E402
from autoprune.costmodel import CostModel, CostStructure  # noqa: E402
from autoprune.latency import compare_latency, load_target  # noqa: E402
from autoprune.plan import LayerRule, PruningPlan  # noqa: E402
from autoprune.prune import apply_plan, grouped_advice, inspect_model  # noqa: E402
from autoprune.stats import model_stats  # noqa: E402

HIDDEN = (64, 128, 256, 512)  # stage widths; every group width below divides them
DEPTHS = (1, 1, 2, 1)


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def regnet(hidden: tuple[int, ...], group_width: int) -> nn.Module:
    import transformers

    config = transformers.RegNetConfig(hidden_sizes=list(hidden), depths=list(DEPTHS),
                                       groups_width=group_width, embedding_size=32,
                                       num_labels=10, layer_type="y")
    torch.manual_seed(0)
    return Logits(transformers.RegNetForImageClassification(config)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="8,16,32,64", help="dense group widths")
    parser.add_argument("--image", type=int, default=96)
    parser.add_argument("--target", default="cpu-1t")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with provenance.recorded("grouped-conv"):
        run(args)


def plans(info) -> dict[str, PruningPlan]:
    """The two halvings, then the cost profile: uniform channel plans at four levels of the
    shipped spaces' highest sparsity (0.75) and each group alone at it."""
    half = LayerRule("structured", 0.5, "l2")
    whole = {g.name: LayerRule("structured", 0.5, "l2", whole_groups=True)
             for g in info.groups if g.whole_groups}
    out = {"channels": PruningPlan(default=half), "groups": PruningPlan(default=half, rules=whole)}
    for level in (0.25, 0.5, 0.75, 1.0):
        out[f"uniform {0.75 * level:g}"] = PruningPlan.uniform(0.75 * level, criterion="l2")
    for g in info.groups[:12]:
        out[f"only {g.name}"] = PruningPlan(rules={g.name: LayerRule("structured", 0.75, "l2")})
    return out


def run(args: argparse.Namespace) -> None:
    target = load_target(args.target)
    inputs = (torch.randn(1, 3, args.image, args.image),)
    key = latency_key(target.name)
    print(f"RegNet-Y, stages {HIDDEN}, depths {DEPTHS}, {args.image}x{args.image} images, "
          f"target {target.name}, {args.repeats} interleaved rounds")
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        dense = regnet(HIDDEN, width)
        info = inspect_model(dense, inputs)
        ref = model_stats(dense, inputs)
        cost = CostModel(CostStructure.from_model(dense, inputs, info, {
            "macs": ref.macs, "params": ref.params, "size_bytes": ref.size_bytes}),
            [target.name])
        todo = plans(info)
        models = {"dense": dense, **{n: apply_plan(dense, p, inputs) for n, p in todo.items()}}
        timed = {r.name: r for r in compare_latency(models, inputs, target, repeats=args.repeats)}
        cost.observe(PruningPlan(), {key: timed["dense"].stats.p50_ms})
        for name, plan in todo.items():
            if name not in ("channels", "groups"):  # held out: the profile fits the model
                cost.observe(plan, {key: timed[name].stats.p50_ms})
        groups = next(g for g in info.groups if g.whole_groups)
        print(f"group width {width}: {len(todo) - 2} profile plans; "
              f"{groups.name}: {grouped_advice(width)}")
        for name in ("dense", "channels", "groups"):
            row = timed[name]
            kept = model_stats(models[name], inputs).macs / ref.macs
            predicted = (timed["dense"].stats.p50_ms / cost.predict(todo[name])[key]
                         if name != "dense" else 1.0)
            conv = models[name].model.regnet.encoder.stages[-1].layers[0].layer[1].convolution
            rows.append([str(width), name, str(conv.in_channels // conv.groups),
                         str(conv.groups), f"{100 * kept:.1f} %", f"{row.stats.p50_ms:.3f}",
                         f"{row.speedup:.2f}x", f"{predicted:.2f}x",
                         "" if name == "dense" else f"{row.speedup * kept:.2f}"])
    provenance.print_table(
        "grouped", ["dense group width", "halved by", "group width", "groups (last stage)",
                    "MACs kept", "p50 ms", "speed-up", "cost model", "speed-up / FLOPs"], rows,
        right=(4, 5, 6, 7, 8))


if __name__ == "__main__":
    main()
