"""Prune a pretrained Hugging Face encoder and keep its embeddings: a task file.

``make_task()`` loads a `transformers` encoder from a local directory (``save_pretrained``
output or a Hub snapshot already on disk: nothing is ever downloaded), or, when none is
given, builds one from a config with random weights (all-MiniLM-L6-v2's shape by default).
The metric is **cosine fidelity**: the mean cosine similarity between the pruned model's
embeddings and the dense model's on held-out inputs (1.0 = the same embeddings). Fine-tuning
distils: its targets are the dense model's embeddings and its loss is ``1 - cosine``, at the
learning rate a pretrained encoder is tuned with (AdamW, 2e-5).

    pip install "autoprune[hf]"
    autoprune layers --task examples/hf_encoder_task.py
    HF_ENCODER_DIR=path/to/model autoprune search --task examples/hf_encoder_task.py \\
        --budget "latency<60%" --budget "cosine>=0.9" --trials 30 --output runs/encoder

Text encoders (BERT, RoBERTa, DistilBERT, MiniLM, ...) embed by mean-pooling token states;
ViTs embed with their CLS token. With a directory, sentences come from ``texts`` (a text
file, one sentence per line, tokenized with the directory's tokenizer); without one, inputs
are random token ids or images, which is enough to show the mechanics, not to judge quality.
Run this file (``python examples/hf_encoder_task.py``) to prune 50 % of the heads and FFN
channels of the config-built encoder and fine-tune it briefly.
"""

from __future__ import annotations

import copy
import os
import re

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autoprune.augment import ReplaceTokens
from autoprune.finetune import FinetuneSettings
from autoprune.task import Metric, Task, call_model

# Config-built encoders (random weights): family -> size -> config arguments.
CONFIGS = {
    "bert": {
        "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                       num_attention_heads=12, intermediate_size=1536),
        "tiny": dict(vocab_size=128, hidden_size=48, num_hidden_layers=2,
                     num_attention_heads=6, intermediate_size=96),
    },
    "distilbert": {
        "minilm": dict(vocab_size=30522, dim=384, n_layers=6, n_heads=12, hidden_dim=1536),
        "tiny": dict(vocab_size=128, dim=48, n_layers=2, n_heads=6, hidden_dim=96),
    },
    "vit": {
        "minilm": dict(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=6,
                       num_attention_heads=12, intermediate_size=1536),
        "tiny": dict(image_size=16, patch_size=4, hidden_size=48, num_hidden_layers=2,
                     num_attention_heads=6, intermediate_size=96),
    },
}


class TextEmbedder(nn.Module):
    """A text encoder's sentence embedding: token states mean-pooled over the attention mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # the `transformers` encoder (BertModel, DistilBertModel, ...)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class ImageEmbedder(nn.Module):
    """A ViT's image embedding: the final state of its CLS token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # the `transformers` ViTModel (or another image encoder)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values)[0][:, 0]


def cosine_loss(embeddings: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Distillation loss: ``1 - cosine(embedding, dense embedding)``, averaged."""
    return 1 - nn.functional.cosine_similarity(embeddings, dense, dim=-1).mean()


def _cosine_fidelity(model: nn.Module, data: DataLoader) -> float:
    sims = [nn.functional.cosine_similarity(call_model(model, x), dense, dim=-1)
            for x, dense in data]
    return torch.cat(sims).mean().item()


def cosine_fidelity() -> Metric:
    """Mean cosine similarity to the dense model's embeddings (the val data's targets)."""
    return Metric("cosine", "maximize", _cosine_fidelity)


def trim_padding(batch: list) -> tuple:
    """Collate ``EmbeddingPairs`` items, dropping the padding columns no sentence of the batch
    uses: short sentences padded to ``seq_len`` cost several times the compute they need, and
    masked padding does not change the embeddings."""
    inputs, targets = torch.utils.data.default_collate(batch)
    if len(inputs) == 2:  # (input_ids, attention_mask)
        used = int(inputs[1].any(0).nonzero().max()) + 1
        inputs = [t[:, :used] for t in inputs]
    return tuple(inputs), targets


class EmbeddingPairs(Dataset):
    """Model inputs and, as targets, the dense model's embeddings of them."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], dense: nn.Module, batch: int = 64):
        self.inputs = inputs  # tensors with one row per example
        with torch.no_grad():
            self.targets = torch.cat([dense(*(t[i:i + batch] for t in inputs))
                                      for i in range(0, len(inputs[0]), batch)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return tuple(t[i] for t in self.inputs), self.targets[i]


def load_encoder(model_dir: str | None, family: str, size: str) -> nn.Module:
    """The `transformers` model: from ``model_dir`` (local files only), else from a config."""
    import transformers

    if model_dir:
        return transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
    classes = {"bert": ("BertConfig", "BertModel"),
               "distilbert": ("DistilBertConfig", "DistilBertModel"),
               "vit": ("ViTConfig", "ViTModel")}
    if family not in classes or size not in CONFIGS[family]:
        raise ValueError(f"family must be one of {sorted(CONFIGS)} and size one of "
                         f"{sorted(CONFIGS['bert'])}, got {family!r}, {size!r}")
    config_cls, model_cls = (getattr(transformers, n) for n in classes[family])
    torch.manual_seed(0)
    return model_cls(config_cls(**CONFIGS[family][size]))


def make_inputs(encoder: nn.Module, n: int, seq_len: int, model_dir: str | None,
                texts: str | None, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` inputs: tokenized sentences from ``texts``, else random token ids or images."""
    g = torch.Generator().manual_seed(seed)
    config = encoder.config
    if hasattr(config, "image_size"):
        size = config.image_size
        return (torch.randn(n, config.num_channels, size, size, generator=g),)
    if texts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        with open(texts, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()][:n]
        enc = tokenizer(lines, padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    ids = torch.randint(0, config.vocab_size, (n, seq_len), generator=g)
    return ids, torch.ones(n, seq_len, dtype=torch.int64)


def token_vocabulary(encoder: nn.Module, model_dir: str | None) -> torch.Tensor:
    """The token ids augmentation may replace and draw: the tokenizer's vocabulary without its
    special and reserved tokens ([PAD], [CLS], [unused0], <s>, ...); every id of a config-built
    model's (its inputs are random ids)."""
    if not model_dir:
        return torch.arange(encoder.config.vocab_size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    special = set(tokenizer.all_special_ids)
    return torch.tensor(sorted(i for token, i in tokenizer.get_vocab().items()
                               if i not in special and not re.fullmatch(r"\[.*\]|<.*>", token)))


def make_task(
    model_dir: str | None = os.environ.get("HF_ENCODER_DIR"),
    family: str = "bert",
    size: str = "minilm",
    texts: str | None = None,
    n_train: int = 512,
    n_val: int = 128,
    seq_len: int = 32,
    batch_size: int = 16,
    steps: int = 100,
    lr: float = 2e-5,
    augment: float = 0.3,
) -> Task:
    """The task factory (``load_task("examples/hf_encoder_task.py", model_dir=...)``).

    Args:
        model_dir: a local `transformers` model directory; None builds ``family`` at ``size``
            from a config with random weights (no download either way).
        family: ``bert``, ``distilbert`` or ``vit``, for a config-built model.
        size: ``minilm`` (6 layers, 12 heads of 32, FFN 1536) or ``tiny`` (tests).
        texts: a text file of sentences (one per line), tokenized with ``model_dir``'s
            tokenizer; None uses random token ids.
        n_train: training inputs (fine-tuning and calibration).
        n_val: validation inputs the cosine fidelity is measured on.
        seq_len: tokens per text input (padded or truncated).
        batch_size: fine-tuning batch size.
        steps: fine-tuning steps per trial.
        lr: AdamW's peak learning rate (a pretrained encoder's usual one by default).
        augment: share of a text input's tokens that calibration copies replace at random
            (``ReplaceTokens``: importance and reconstruction also fit on those copies, so
            they see more than the training text); 0 = no copies.
    """
    encoder = load_encoder(model_dir, family, size).eval()
    wrap = ImageEmbedder if hasattr(encoder.config, "image_size") else TextEmbedder
    dense = wrap(encoder).eval()

    def build_model() -> nn.Module:  # a fresh copy for every trial: trials prune it in place
        return copy.deepcopy(dense)

    inputs = make_inputs(encoder, n_train + n_val, seq_len, model_dir, texts, seed=0)
    train = EmbeddingPairs(tuple(t[:n_train] for t in inputs), dense)
    val = EmbeddingPairs(tuple(t[n_train:] for t in inputs), dense)
    name = os.path.basename(os.path.normpath(model_dir)) if model_dir else f"{family}-{size}"
    text = wrap is TextEmbedder
    augment_fn = ReplaceTokens(token_vocabulary(encoder, model_dir), augment) if (
        text and augment > 0) else None
    return Task(
        name=f"hf-{name}",
        build_model=build_model,
        example_inputs=tuple(t[n_train:n_train + 1] for t in inputs),
        train_data=DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=trim_padding,
                              generator=torch.Generator().manual_seed(0)),
        val_data=DataLoader(val, batch_size=64, collate_fn=trim_padding),
        metric=cosine_fidelity(),
        loss_fn=cosine_loss,
        finetune=FinetuneSettings(steps=steps, lr=lr, optimizer="adamw", weight_decay=0.01,
                                  warmup_steps=min(10, steps // 10),
                                  eval_every=max(1, steps // 4)),
        description=f"{type(encoder).__name__} embeddings, cosine fidelity to the dense model",
        augment_fn=augment_fn,
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
    print(f"\ndense:  cosine {task.evaluate(model):.4f}, {params:,} parameters")
    pruned = apply_plan(model, PruningPlan.uniform(0.5), task.example_inputs)
    params = sum(p.numel() for p in pruned.parameters())
    print(f"pruned: cosine {task.evaluate(pruned):.4f}, {params:,} parameters")
    result = finetune_(pruned, task)
    print(f"fine-tuned {result.steps_done} steps in {result.seconds:.1f} s: "
          f"cosine {task.evaluate(pruned):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
