"""Built-in task ``digits``: scikit-learn's handwritten digits, a ~1 M-parameter residual CNN.

The 1797 bundled 8x8 images are resized to 32x32 (bilinear), normalized with the training
mean and standard deviation, and split 80/20 (stratified, fixed seed) into 1437 training and
360 validation images. The model is ``resnet_1m`` from :mod:`autoprune.testing` (widths
32-64-128-224, 1.05 M parameters), trained once with random 2-pixel shifts and cached; see
:mod:`autoprune.tasks._cache`. Nothing is downloaded.
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
from autoprune.testing.models import ResNetCNN

__all__ = ["make_task", "digits_tensors"]

IMAGE_SIZE = 32
_TRAIN_VERSION = 1  # bump when the training recipe changes: old cached weights are not reused


@functools.lru_cache(maxsize=4)
def digits_tensors(
    seed: int = 0, val_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: images ``(n, 1, 32, 32)`` float32, labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_val = train_test_split(
        range(len(digits.target)),
        test_size=val_fraction,
        stratify=digits.target,
        random_state=seed,
    )
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_val = x[idx_train], x[idx_val]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_val - mean) / std, y[idx_val]


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background."""
    b, c, h, w = x.shape
    background = x.amin().item()
    padded = nn.functional.pad(x, (max_shift,) * 4, value=background)
    off = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g)
    rows = (torch.arange(h)[None, :] + off[0][:, None])[:, None, :, None]  # (b, 1, h, 1)
    cols = (torch.arange(w)[None, :] + off[1][:, None])[:, None, None, :]  # (b, 1, 1, w)
    batch = torch.arange(b)[:, None, None, None]
    chan = torch.arange(c)[None, :, None, None]
    return padded[batch, chan, rows, cols]


@register_task("digits")
def make_task(
    *,
    widths: tuple[int, ...] = (32, 64, 128, 224),
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    finetune: FinetuneSettings | None = None,
) -> Task:
    """The ``digits`` task.

    Args:
        widths: channels per stage of the residual CNN; the default is ``resnet_1m``. Smaller
            widths (e.g. ``(8, 16, 32, 64)``) train in seconds, for tests.
        epochs: training epochs of the cached model (10 reach about 99 % validation accuracy).
        seed: seeds the train/val split, training and the data order.
        batch_size: batch size of ``train_data`` (fine-tuning and calibration).
        cache_dir: where trained weights are cached; see :func:`_cache.cache_dir`.
        finetune: default fine-tuning settings for trials.

    Example:
        >>> task = make_task(widths=(8, 16, 32, 64), epochs=3)  # doctest: +SKIP
        >>> task.evaluate(task.build_model())  # doctest: +SKIP
        0.97...
    """
    widths = tuple(int(w) for w in widths)
    data = digits_tensors(seed)

    def fresh() -> nn.Module:
        return ResNetCNN(num_classes=10, in_channels=1, widths=widths, image_size=IMAGE_SIZE)

    config = {
        "widths": list(widths),
        "epochs": epochs,
        "seed": seed,
        "version": _TRAIN_VERSION,
    }

    def train_(model: nn.Module) -> dict[str, Any]:
        """SGD + one-cycle LR, label smoothing, random 2-pixel shifts."""
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)
        return train_classifier_(model, data, opt, epochs=epochs, seed=seed, batch_size=64,
                                 max_lr=0.1, pct_start=0.25, label_smoothing=0.1,
                                 augment=lambda x, g: _random_shift(x, 2, g))

    build_model = _cache.trained_model_factory("digits", config, fresh, train_, seed=seed,
                                               directory=cache_dir)
    return tensor_task(
        "digits", data, build_model, fresh().example_inputs(), batch_size=batch_size,
        val_batch_size=512, seed=seed,
        build_architecture=fresh,  # Ray workers load the driver's weights: no training
        finetune=finetune or FinetuneSettings(steps=100, lr=0.01, eval_every=25),
        description=(
            "scikit-learn handwritten digits at 32x32 (1437 train / 360 val), "
            f"residual CNN widths {'-'.join(map(str, widths))}"
        ),
    )
