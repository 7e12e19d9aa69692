"""Grouped convolutions on ONNX Runtime: remove channels inside every group, or whole groups?

Builds RegNet-Y models from ``transformers`` configs (random weights; latency depends only on
the architecture) at several group widths, and for each the two ways of halving every stage's
width:

- ``channels``: every group keeps half its channels (the group count stays, the group width
  halves): what pruning a grouped conv's channel group does today;
- ``groups``: half the groups go whole (the group width stays).

All are timed side by side on ``--target``; MACs from ``model_stats``. ONNX Runtime's x86 CPU
convolutions run on a blocked channel layout (NCHWc, blocks of 16 with AVX-512, 8 with AVX2)
only if every group's input channels are whole blocks (onnxruntime's nchwc_transformer.cc);
otherwise im2col + GEMM with reorders. The table shows what that costs per FLOP.

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

from autoprune.latency import compare_latency, load_target  # noqa: E402
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


def run(args: argparse.Namespace) -> None:
    target = load_target(args.target)
    inputs = (torch.randn(1, 3, args.image, args.image),)
    half = tuple(h // 2 for h in HIDDEN)
    print(f"RegNet-Y, stages {HIDDEN}, depths {DEPTHS}, {args.image}x{args.image} images, "
          f"target {target.name}, {args.repeats} interleaved rounds")
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        models = {"dense": regnet(HIDDEN, width),
                  "channels": regnet(half, width // 2),
                  "groups": regnet(half, width)}
        macs = {name: model_stats(m, inputs).macs for name, m in models.items()}
        timed = compare_latency(models, inputs, target, repeats=args.repeats)
        for row in timed:
            kept = macs[row.name] / macs["dense"]
            gw = width if row.name != "channels" else width // 2
            rows.append([str(width), row.name, str(gw), f"{HIDDEN[-1] // width}"
                         if row.name == "dense" else f"{half[-1] // gw}",
                         f"{100 * kept:.1f} %", f"{row.stats.p50_ms:.3f}",
                         f"{row.speedup:.2f}x",
                         "" if row.name == "dense" else f"{row.speedup * kept:.2f}"])
    provenance.print_table(
        "grouped", ["dense group width", "halved by", "group width", "groups (last stage)",
                    "MACs kept", "p50 ms", "speed-up", "speed-up / FLOPs"], rows,
        right=(4, 5, 6, 7))


if __name__ == "__main__":
    main()
