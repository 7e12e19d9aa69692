"""Prune a decoder LLM and keep its perplexity: a task file.

``make_task()`` loads a `transformers` causal LM from a local directory (``save_pretrained``
output or a Hub snapshot already on disk: nothing is ever downloaded), or, when none is given,
builds a Llama-, Qwen2- or GPT-2-shaped one from a config with random weights. The text is
built offline: the documentation of Python's own standard library modules (``inspect.getdoc``),
cut into fixed-length pieces, alternately for training and validation so both cover every
module. With a model directory it is tokenized with the directory's tokenizer; without one the
tokens are the text's bytes (a 256-token vocabulary). The metric is **perplexity** on the
validation pieces (lower is better); fine-tuning minimizes next-token cross-entropy.

    pip install "autoprune[hf]"
    autoprune layers --task examples/causal_lm_task.py
    HF_LM_DIR=path/to/model autoprune search --task examples/causal_lm_task.py \\
        --budget "latency<60%" --trials 30 --output runs/lm

The model is wrapped in the forward that is exported for serving: token ids and attention
mask in, logits out, no ``past_key_values``. Run this file (``python
examples/causal_lm_task.py``) to prune 50 % of the key/value groups and FFN channels of the
config-built model and fine-tune it briefly.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune.finetune import FinetuneSettings
from autoprune.task import Metric, Task

# Standard-library modules whose documentation is the text (present in every CPython).
MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses", "datetime",
           "decimal", "difflib", "email", "fractions", "functools", "heapq", "html", "itertools",
           "json", "logging", "pathlib", "pickle", "queue", "random", "re", "shutil", "sqlite3",
           "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "unittest",
           "urllib.parse", "uuid", "zipfile")

# Config-built decoders (random weights): family -> size -> config arguments.
SIZES = {
    "small": dict(hidden=256, layers=4, heads=8, kv_heads=2, ffn=1024),
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64),
}


class CausalLM(nn.Module):
    """The serving forward of a causal LM: ids and attention mask in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # the `transformers` *ForCausalLM, with use_cache off

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each token given the ones before it, averaged over tokens."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def _perplexity(model: nn.Module, data: DataLoader) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for (ids, mask), targets in data:
            logits = model(ids.to(device), mask.to(device))
            n = targets[:, 1:].numel()
            total += next_token_loss(logits, targets.to(device)).item() * n
            count += n
    return math.exp(total / count)


def perplexity() -> Metric:
    """exp(mean next-token cross-entropy) on the validation pieces; lower is better."""
    return Metric("perplexity", "minimize", _perplexity)


def stdlib_text() -> str:
    """The documentation of :data:`MODULES`, one after the other (built offline)."""
    docs = (inspect.getdoc(importlib.import_module(name)) or "" for name in MODULES)
    return "\n\n".join(d for d in docs if d)


def load_lm(model_dir: str | None, family: str, size: str, vocab: int) -> nn.Module:
    """The `transformers` causal LM: from ``model_dir`` (local files only), else a config."""
    import transformers

    if model_dir:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                  local_files_only=True)
    else:
        if family not in ("llama", "qwen2", "gpt2") or size not in SIZES:
            raise ValueError(f"family must be llama, qwen2 or gpt2 and size one of "
                             f"{sorted(SIZES)}, got {family!r}, {size!r}")
        s = SIZES[size]
        torch.manual_seed(0)
        if family == "gpt2":
            from autoprune.prune import conv1d_to_linear_

            config = transformers.GPT2Config(vocab_size=vocab, n_embd=s["hidden"],
                                             n_layer=s["layers"], n_head=s["heads"],
                                             n_inner=s["ffn"], bos_token_id=0, eos_token_id=0)
            model = conv1d_to_linear_(transformers.GPT2LMHeadModel(config))
        else:
            name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
            config = getattr(transformers, f"{name}Config")(
                vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                intermediate_size=s["ffn"], bos_token_id=0, eos_token_id=0, pad_token_id=0)
            model = getattr(transformers, f"{name}ForCausalLM")(config)
    model.config.use_cache = False  # the past_key_values-free forward that is served
    return model.eval()


def tokenize(text: str, model_dir: str | None) -> torch.Tensor:
    """Token ids of ``text``: the directory's tokenizer, else the UTF-8 bytes."""
    if model_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def make_task(
    model_dir: str | None = os.environ.get("HF_LM_DIR"),
    family: str = "llama",
    size: str = "small",
    seq_len: int = 64,
    n_train: int = 256,
    n_val: int = 64,
    batch_size: int = 8,
    steps: int = 100,
    lr: float = 1e-4,
) -> Task:
    """The task factory (``load_task("examples/causal_lm_task.py", model_dir=...)``).

    Args:
        model_dir: a local `transformers` causal-LM directory; None builds ``family`` at
            ``size`` from a config with random weights (no download either way).
        family: ``llama``, ``qwen2`` or ``gpt2``, for a config-built model.
        size: ``small`` (4 layers, hidden 256, 8 heads, 2 key/value heads, FFN 1024) or
            ``tiny`` (tests).
        seq_len: tokens per piece of text.
        n_train: training pieces (fine-tuning and calibration), at most what the text holds.
        n_val: validation pieces perplexity is measured on.
        batch_size: fine-tuning batch size.
        steps: fine-tuning steps per trial.
        lr: AdamW's peak learning rate.
    """
    ids = tokenize(stdlib_text(), model_dir)
    pieces = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    train, val = pieces[0::2][:n_train], pieces[1::2][:n_val]
    lm = load_lm(model_dir, family, size, vocab=256)
    dense = CausalLM(lm).eval()

    def build_model() -> nn.Module:  # a fresh copy for every trial: trials prune it in place
        return copy.deepcopy(dense)

    def batches(x: torch.Tensor) -> TensorDataset:
        return TensorDataset(x, torch.ones_like(x), x)

    def collate(items: list) -> tuple:
        ids, mask, targets = (torch.stack(t) for t in zip(*items))
        return (ids, mask), targets

    name = os.path.basename(os.path.normpath(model_dir)) if model_dir else f"{family}-{size}"
    return Task(
        name=f"lm-{name}",
        build_model=build_model,
        example_inputs=(val[:1], torch.ones_like(val[:1])),
        train_data=DataLoader(batches(train), batch_size=batch_size, shuffle=True,
                              collate_fn=collate, generator=torch.Generator().manual_seed(0)),
        val_data=DataLoader(batches(val), batch_size=16, collate_fn=collate),
        metric=perplexity(),
        loss_fn=next_token_loss,
        finetune=FinetuneSettings(steps=steps, lr=lr, optimizer="adamw", weight_decay=0.01,
                                  warmup_steps=min(10, steps // 10),
                                  eval_every=max(1, steps // 4)),
        description=f"{type(lm).__name__}, perplexity on Python's standard-library docs",
    )


def main() -> int:
    from autoprune.finetune import finetune_
    from autoprune.plan import PruningPlan
    from autoprune.prune import apply_plan, inspect_model
    from autoprune.task import load_task

    task = load_task(f"{__file__}:make_task", steps=40)  # exactly what --task does
    model = task.build_model()
    print(inspect_model(model, task.example_inputs).table())
    params = sum(p.numel() for p in model.parameters())
    print(f"\ndense:  perplexity {task.evaluate(model):.2f}, {params:,} parameters")
    pruned = apply_plan(model, PruningPlan.uniform(0.5), task.example_inputs)
    params = sum(p.numel() for p in pruned.parameters())
    print(f"pruned: perplexity {task.evaluate(pruned):.2f}, {params:,} parameters")
    result = finetune_(pruned, task)
    print(f"fine-tuned {result.steps_done} steps in {result.seconds:.1f} s: "
          f"perplexity {task.evaluate(pruned):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
