"""Calibration copies: ReplaceTokens, and the fits (Fisher statistics, reconstruction) that use
them while gradient criteria do not."""

import copy

import pytest
import torch

from autoprune.augment import ReplaceTokens, with_augmented
from autoprune.errors import TaskError
from autoprune.plan import PruningPlan, Recovery
from autoprune.prune import prune_model_
from autoprune.recover import reconstruct_plan_
from autoprune.task import Task

VOCAB = 128


def test_replace_tokens_replaces_the_asked_share_of_vocabulary_tokens_and_nothing_else():
    ids = torch.randint(5, VOCAB, (64, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1], ids[:, 30:39] = 1, 2, 0  # [CLS], [SEP], padding
    mask = (ids != 0).long()
    augment = ReplaceTokens(torch.arange(5, VOCAB), p=0.3)
    out, out_mask = augment((ids, mask), torch.Generator().manual_seed(1))
    assert out.shape == ids.shape and out.dtype == ids.dtype and out_mask is mask
    special = ids < 5
    assert torch.equal(out[special], ids[special])  # special tokens and padding stay
    assert bool(((out >= 5) | special).all())  # drawn ids come from the vocabulary
    changed = (out != ids).float()[~special].mean().item()
    assert 0.26 < changed < 0.34  # 30 %, less the 1 in 123 draws that repeat the token
    again, _ = augment((ids, mask), torch.Generator().manual_seed(1))
    assert torch.equal(again, out)  # seeded


def test_replace_tokens_names_a_bad_setting():
    with pytest.raises(ValueError, match=r"ReplaceTokens.p must be in \(0, 1\], got 0"):
        ReplaceTokens(torch.arange(10), p=0)
    with pytest.raises(ValueError, match="at least 2 token ids"):
        ReplaceTokens(torch.tensor([7, 7]))


def test_with_augmented_appends_one_copy_of_each_batch_with_its_targets():
    batches = [(torch.arange(6).view(2, 3) + 10 * i, torch.tensor([i, i])) for i in range(3)]
    assert with_augmented(batches, None) == batches
    out = with_augmented(batches, ReplaceTokens(torch.arange(100), p=1.0), seed=3)
    assert len(out) == 6 and all(out[i] is batches[i] for i in range(3))
    for (x, y), (ax, ay) in zip(batches, out[3:]):
        assert ay is y and ax.shape == x.shape and not torch.equal(ax, x)


def test_task_rejects_an_augment_fn_that_is_not_callable():
    with pytest.raises(TaskError, match="augment_fn must be callable or None"):
        Task(name="t", build_model=lambda: torch.nn.Linear(2, 2), example_inputs=torch.ones(1, 2),
             train_data=[], val_data=[], augment_fn=0.3)


def _bert(layers=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=layers,
                                     num_attention_heads=6, intermediate_size=96)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _token_batches(low, high, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(low, high, (16, 12), generator=g), None) for _ in range(n)]


class _Counting:
    """An augment_fn that counts its calls."""

    def __init__(self):
        self.calls = 0
        self.replace = ReplaceTokens(torch.arange(VOCAB))

    def __call__(self, inputs, generator):
        self.calls += 1
        return self.replace(inputs, generator)


@pytest.mark.parametrize("criterion,copies", [("fisher", 2), ("activation", 2), ("taylor", 0),
                                              ("l2", 0)])
def test_only_the_label_free_statistics_of_pruning_see_the_copies(criterion, copies):
    dense = _bert(layers=1)
    batches = [(x, torch.zeros(16, 12, 48)) for x, _ in _token_batches(0, VOCAB, 2, 0)]
    augment = _Counting()
    prune_model_(copy.deepcopy(dense), PruningPlan.uniform(0.5, criterion=criterion),
                 (batches[0][0],), calibration=batches,
                 loss_fn=lambda out, y: (out[0] - y).square().mean(), augment=augment)
    assert augment.calls == copies


def _held_error(model, dense, batches):
    with torch.no_grad():
        return sum((model(x)[0] - dense(x)[0]).square().sum().item() for x, _ in batches) / sum(
            dense(x)[0].square().sum().item() for x, _ in batches)


def test_reconstruction_with_copies_fits_tokens_the_training_batches_never_show():
    dense = _bert()
    train = _token_batches(0, VOCAB // 2, 8, seed=0)  # the low half of the vocabulary only
    unseen = _token_batches(VOCAB // 2, VOCAB, 4, seed=9)  # the high half only
    pruned = copy.deepcopy(dense)
    report = prune_model_(pruned, PruningPlan.uniform(0.5, criterion="l2"), (train[0][0],))
    errors, samples = {}, {}
    for name, augment in (("plain", None), ("copies", ReplaceTokens(torch.arange(VOCAB), 0.5))):
        task = Task(name="t", build_model=lambda: dense, example_inputs=train[0][0][:1],
                    train_data=train, val_data=train, augment_fn=augment)
        model = copy.deepcopy(pruned)
        result = reconstruct_plan_(task, dense, model, report, Recovery(calibration_samples=128))
        errors[name], samples[name] = _held_error(model, dense, unseen), result.samples
    assert samples == {"plain": 128, "copies": 256}
    before = _held_error(pruned, dense, unseen)
    assert errors["copies"] < 0.9 * errors["plain"] < before
