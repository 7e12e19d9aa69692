"""Built-in task ``sequences``: a small transformer encoder on generated motif sequences.

Each sample is 16 tokens of 16 Gaussian-noise features with one of 5 fixed 3-token motifs
added at a random position in the first or the second half of the sequence. The class
(10 in all) is ``2 * motif + half``: the model must find the motif (attention over tokens) and
where it is (positions). The data is generated from fixed seeds, nothing is downloaded. The
model is :class:`autoprune.testing.TransformerEncoder` (dim 128, 8 heads, 2 layers, ~0.4 M
parameters): a different network shape from ``digits`` (linear layers, attention heads,
LayerNorm), trained once and cached like it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from autoprune.finetune_settings import FinetuneSettings
from autoprune.task._contract import Task
from autoprune.tasks import _cache
from autoprune.tasks._registry import register_task
from autoprune.tasks._tensors import tensor_task, train_classifier_
from autoprune.testing.models import TransformerEncoder

__all__ = ["make_task", "motif_sequences"]

SEQ_LEN = 16  # tokens per sequence
FEATURES = 16  # features per token
MOTIFS = 5  # distinct motifs; classes = 2 * MOTIFS
MOTIF_LEN = 3  # tokens per motif
_TRAIN_VERSION = 1  # bump when the data or training recipe changes
_DEFAULT_FINETUNE = FinetuneSettings(
    steps=150, lr=5e-4, optimizer="adamw", weight_decay=0.01, eval_every=50
)


@functools.lru_cache(maxsize=8)
def motif_sequences(n: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``(n, 16, 16)`` and their labels in ``[0, 10)``; same seed, same data."""
    fixed = torch.Generator().manual_seed(1000)  # the motifs are the same for every seed
    motifs = torch.randn(MOTIFS, MOTIF_LEN, FEATURES, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ_LEN, FEATURES, generator=g) * noise
    motif = torch.randint(0, MOTIFS, (n,), generator=g)
    half = torch.randint(0, 2, (n,), generator=g)
    start = torch.randint(0, SEQ_LEN // 2 - MOTIF_LEN + 1, (n,), generator=g)
    start = start + half * (SEQ_LEN // 2)
    pos = start[:, None] + torch.arange(MOTIF_LEN)[None, :]  # (n, MOTIF_LEN)
    x[torch.arange(n)[:, None], pos] += motifs[motif]
    return x, motif * 2 + half


@register_task("sequences")
def make_task(
    *,
    dim: int = 128,
    num_heads: int = 8,
    depth: int = 2,
    epochs: int = 12,
    n_train: int = 4000,
    n_val: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    finetune: FinetuneSettings | None = None,
) -> Task:
    """The ``sequences`` task.

    Args:
        dim, num_heads, depth: transformer width, attention heads and layers.
        epochs: training epochs of the cached model (12 reach about 99 % validation accuracy).
        n_train, n_val: generated training and validation sequences.
        seed: seeds the training data, training and the data order (validation uses seed+1).
        batch_size: batch size of ``train_data`` (fine-tuning and calibration).
        cache_dir: where trained weights are cached; see :func:`_cache.cache_dir`.
        finetune: default fine-tuning settings for trials.

    Example:
        >>> task = make_task(dim=32, num_heads=2, depth=1, epochs=2)  # doctest: +SKIP
    """
    x_train, y_train = motif_sequences(n_train, seed)
    x_val, y_val = motif_sequences(n_val, seed + 1)
    data = (x_train, y_train, x_val, y_val)

    def fresh() -> nn.Module:
        return TransformerEncoder(
            num_classes=2 * MOTIFS,
            in_features=FEATURES,
            dim=dim,
            num_heads=num_heads,
            depth=depth,
            seq_len=SEQ_LEN,
        )

    config = {
        "dim": dim,
        "num_heads": num_heads,
        "depth": depth,
        "epochs": epochs,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "version": _TRAIN_VERSION,
    }

    def train_(model: nn.Module) -> dict[str, Any]:
        """AdamW + one-cycle LR."""
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        return train_classifier_(model, data, opt, epochs=epochs, seed=seed, batch_size=64,
                                 max_lr=2e-3, pct_start=0.2)

    build_model = _cache.trained_model_factory("sequences", config, fresh, train_, seed=seed,
                                               directory=cache_dir)
    return tensor_task(
        "sequences", data, build_model, fresh().example_inputs(), batch_size=batch_size,
        val_batch_size=500, seed=seed, finetune=finetune or _DEFAULT_FINETUNE,
        build_architecture=fresh,  # Ray workers load the driver's weights: no training
        description=(
            f"generated motif sequences ({n_train} train / {n_val} val, 10 classes), "
            f"transformer dim {dim}, {num_heads} heads, {depth} layers"
        ),
    )
