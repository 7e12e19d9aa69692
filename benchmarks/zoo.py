"""Every common architecture, pruned 50 % and timed: the zoo table.

Each model is built from a ``transformers`` config with random weights (latency does not depend
on them; nothing is downloaded), small: text models 4 layers, hidden 256, 8 heads of 32
(decoders with 2 key/value heads, Phi-3 with 4), FFN 1024, 128 tokens; vision models at
``--image`` pixels (default 96) with a 10-class head. Every model is wrapped in its serving
forward (ids and attention mask in, logits or hidden states out; images in, logits out).

Per model: the groups ``inspect_model`` finds, the layers it leaves whole (counted by reason),
then ``apply_plan`` with a uniform 50 % structured L2 plan (every listed group; hidden widths
stay), the pruned output shape checked against the dense one, ONNX Runtime checked against
PyTorch, and dense and pruned timed side by side on ``--target`` (``compare_latency``). MACs are
Torch-Pruning's count; speed-up / FLOPs ratio = speed-up / (dense MACs / pruned MACs). Seconds
are inspect + apply (after one untimed inspect). ``--sparsities`` also prunes (and checks,
without timing) at more ratios.

Run: ``.venv/bin/python benchmarks/zoo.py [--only llama,swin] [--image 96] [--repeats 1]
[--sparsities 0.25,0.75]``. Output: ``benchmarks/results/zoo-<date>.txt`` and ``.json``
(``provenance.recorded``): table ``zoo``, one row per model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn

from autoprune.latency import compare_latency, export_onnx, load_target
from autoprune.plan import PruningPlan
from autoprune.prune import apply_plan, conv1d_to_linear_, inspect_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

TEXT = dict(hidden=256, layers=4, heads=8, ffn=1024, vocab=1000, tokens=128)


class Serving(nn.Module):
    """The forward a user exports: tensors in, the model's first output (logits) out."""

    def __init__(self, model: nn.Module, text: bool):
        super().__init__()
        self.model, self.text = model, text

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.text:
            return self.model(input_ids=x, attention_mask=mask)[0]
        return self.model(pixel_values=x)[0]


def _decoder(family: str, kv_heads: int = 2, **extra) -> nn.Module:
    t = TEXT
    config = getattr(transformers, f"{family}Config")(
        vocab_size=t["vocab"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], num_key_value_heads=kv_heads,
        intermediate_size=t["ffn"], use_cache=False, **extra)
    return getattr(transformers, f"{family}ForCausalLM")(config)


def _bert() -> nn.Module:
    t = TEXT
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=t["vocab"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], intermediate_size=t["ffn"]))


def _t5() -> nn.Module:
    t = TEXT
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=t["vocab"], d_model=t["hidden"], d_kv=t["hidden"] // t["heads"],
        d_ff=t["ffn"], num_layers=t["layers"], num_heads=t["heads"]))


def _gpt2() -> nn.Module:
    t = TEXT
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=t["vocab"], n_embd=t["hidden"], n_layer=t["layers"], n_head=t["heads"],
        n_inner=t["ffn"], use_cache=False, bos_token_id=0, eos_token_id=0))
    return conv1d_to_linear_(model)


def _vision(name: str, image: int, **config) -> nn.Module:
    config_cls = getattr(transformers, f"{name}Config")
    return getattr(transformers, f"{name}ForImageClassification")(
        config_cls(num_labels=10, **config))


def zoo(image: int) -> dict[str, tuple[Callable[[], nn.Module], bool]]:
    """name: (builder, is a text model)."""
    t = TEXT
    vit = dict(image_size=image, patch_size=16, hidden_size=t["hidden"],
               num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
               intermediate_size=t["ffn"])
    return {
        "BERT": (_bert, True),
        "T5 encoder": (_t5, True),
        "GPT-2": (_gpt2, True),
        "Llama (GQA 8/2)": (lambda: _decoder("Llama"), True),
        "Qwen2 (GQA 8/2)": (lambda: _decoder("Qwen2"), True),
        "Mistral (GQA 8/2)": (lambda: _decoder("Mistral"), True),
        "Phi-3 (fused qkv 8/4)": (lambda: _decoder("Phi3", 4, pad_token_id=0, bos_token_id=1,
                                                    eos_token_id=1), True),
        "ViT": (lambda: _vision("ViT", image, **vit), False),
        "Swin": (lambda: _vision("Swin", image, image_size=image, patch_size=4, embed_dim=64,
                                 depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=6), False),
        "ConvNeXt": (lambda: _vision("ConvNext", image, hidden_sizes=[32, 64, 128, 256],
                                     depths=[1, 1, 2, 1]), False),
        "ResNet-50": (lambda: _vision("ResNet", image), False),
        "MobileNetV2": (lambda: _vision("MobileNetV2", image, image_size=image), False),
        "EfficientNet-B0": (lambda: _vision("EfficientNet", image, image_size=image), False),
        "RegNet": (lambda: _vision("RegNet", image), False),
        "MobileViT": (lambda: _vision("MobileViT", image, image_size=image), False),
    }


_KINDS = (("model output layer", "output"), ("tied to those of", "tied to output"),
          ("heads left whole", "shared bias"), ("concatenates copies", "patch merging"),
          ("equal groups", "uneven groups"), ("not reached", "unreached"))


def _whole(info) -> str:
    kinds = Counter(next((k for key, k in _KINDS if key in u.reason), "other")
                    for u in info.unprunable)
    return ", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "-"


def _inputs(text: bool, image: int) -> tuple[torch.Tensor, ...]:
    if text:
        ids = torch.randint(0, TEXT["vocab"], (1, TEXT["tokens"]))
        return ids, torch.ones_like(ids)
    return (torch.randn(1, 3, image, image),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names (prefix match, case-insensitive)")
    parser.add_argument("--image", type=int, default=96)
    parser.add_argument("--target", default="cpu-1t")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sparsities", default="", help="more ratios to prune and check")
    args = parser.parse_args()
    with provenance.recorded("zoo") as rec:
        run(args, rec)


def run(args: argparse.Namespace, rec: provenance.Record) -> None:
    print(f"transformers {transformers.__version__}; image {args.image} px, text "
          f"{TEXT['tokens']} tokens; {args.repeats} timing round(s) per model")
    rec.value("transformers", transformers.__version__)
    target = load_target(args.target)
    extra = [float(s) for s in args.sparsities.split(",") if s]
    rows = []
    for name, (build, text) in zoo(args.image).items():
        if args.only and not any(name.lower().startswith(o.strip().lower())
                                 for o in args.only.split(",")):
            continue
        torch.manual_seed(0)
        dense = Serving(build().eval(), text).eval()
        inputs = _inputs(text, args.image)
        inspect_model(dense, inputs)  # untimed: first calls import and warm up lazily
        start = time.perf_counter()
        info = inspect_model(dense, inputs)
        pruned = apply_plan(dense, PruningPlan.uniform(0.5), inputs)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            same_shape = pruned(*inputs).shape == dense(*inputs).shape
        checks = [f"50%: shape {'ok' if same_shape else 'DIFFERS'}"]
        for s in extra:
            other = apply_plan(dense, PruningPlan.uniform(s), inputs)
            with torch.no_grad():
                ok = other(*inputs).shape == dense(*inputs).shape
            result = export_onnx(other, inputs)
            checks.append(f"{s:.0%}: shape {'ok' if ok else 'DIFFERS'}, ORT diff "
                          f"{result.max_abs_diff:.1e}")
        timed = compare_latency({"dense": dense, "pruned": pruned}, inputs, target,
                                repeats=args.repeats)
        kept = timed[1].macs / timed[0].macs
        speedup = timed[1].speedup
        rows.append((name, f"{len(info.groups)}", _whole(info), f"{100 * kept:.1f} %",
                     f"{speedup:.2f}x", f"{speedup * kept:.2f}", f"{seconds:.1f}"))
        print(f"{name}: " + "; ".join(checks), flush=True)
    provenance.print_table(
        "zoo", ["model", "groups", "left whole (layers, by reason)", "MACs kept",
                f"speed-up @{target.name}", "speed-up / FLOPs", "inspect+apply s"],
        rows, right=(1, 3, 4, 5, 6))


if __name__ == "__main__":
    main()
