"""Varied calibration inputs: augmented copies of training inputs for the label-free fits.

Data-aware importance and least-squares reconstruction fit the pruned model to the dense one
on calibration inputs, and a fit sees only what those inputs show: fitted on one kind of text
(docstrings), a pruned encoder kept less of what the dense model does on another (fortunes).
A task's ``augment_fn`` makes a varied copy of a batch of inputs; the fits then run on the
training batches followed by one augmented copy of each. Neither fit reads targets (Fisher
scores project the outputs on random noise; reconstruction matches the dense model's
activations), so a copy needs none. Gradient criteria (taylor) and fine-tuning use the
training batches only.

For token inputs, :class:`ReplaceTokens` replaces a share of the tokens by tokens drawn from
the vocabulary, as TinyBERT's augmentation does with a language model's proposals (Jiao et
al. 2020). On the pretrained MiniLM with 30 % of its heads and FFN channels removed, copies
with 30 % of tokens replaced raised fidelity on text of another kind from 0.889 to 0.897
(docs/recovery.md, benchmarks/results/recovery-ablation-20261207-1645.txt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ReplaceTokens", "with_augmented"]

Augment = Callable[[Any, torch.Generator], Any]  # (inputs, generator) -> augmented inputs


@dataclass(frozen=True)
class ReplaceTokens:
    """An ``augment_fn`` for token inputs: each token of ``inputs[index]`` whose id is in
    ``vocabulary`` is replaced, with probability ``p``, by an id drawn uniformly from it.

    Tokens outside ``vocabulary`` (padding, [CLS], [SEP], ...) stay, and so do the other
    inputs (the attention mask).

    Example:
        >>> augment = ReplaceTokens(torch.arange(5, 100), p=1.0)
        >>> ids = torch.tensor([[101, 7, 8, 102, 0]])
        >>> out, mask = augment((ids, torch.ones(1, 5)), torch.Generator().manual_seed(0))
        >>> out[0, [0, 3, 4]].tolist(), bool((out[0, 1:3] != ids[0, 1:3]).any())
        ([101, 102, 0], True)
    """

    vocabulary: torch.Tensor  # token ids that may be replaced and drawn (no special tokens)
    p: float = 0.3  # share of those tokens replaced
    index: int = 0  # which input holds the token ids

    def __post_init__(self) -> None:
        vocab = torch.as_tensor(self.vocabulary, dtype=torch.int64).flatten().unique()
        if vocab.numel() < 2:
            raise ValueError("ReplaceTokens needs a vocabulary of at least 2 token ids")
        if not 0 < self.p <= 1:
            raise ValueError(f"ReplaceTokens.p must be in (0, 1], got {self.p!r}")
        object.__setattr__(self, "vocabulary", vocab)

    def __call__(self, inputs: Any, generator: torch.Generator) -> Any:
        parts = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        ids = parts[self.index]
        vocab = self.vocabulary.to(ids.device)
        replace = torch.isin(ids, vocab) & (torch.rand(ids.shape, generator=generator)
                                            .to(ids.device) < self.p)
        drawn = vocab[torch.randint(0, len(vocab), ids.shape, generator=generator)
                      .to(ids.device)]
        parts[self.index] = torch.where(replace, drawn.to(ids.dtype), ids)
        return type(inputs)(parts) if isinstance(inputs, (tuple, list)) else parts[0]


def with_augmented(batches: Sequence[tuple], augment: Augment | None,
                   seed: int = 0) -> list[tuple]:
    """``batches`` followed by one augmented copy of each (seeded); ``batches`` alone if
    ``augment`` is None. A copy keeps its source's targets: use it for label-free fits only."""
    batches = list(batches)
    if augment is None:
        return batches
    generator = torch.Generator().manual_seed(seed)
    return batches + [(augment(inputs, generator), targets) for inputs, targets in batches]

