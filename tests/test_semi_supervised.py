"""Cyclical semi-supervised learning on the embedded digits: split, pseudo-labels, knobs."""

from __future__ import annotations

import pytest
import torch

from cyclical_training.config import TrainConfig
from cyclical_training.data import load_dataset
from cyclical_training.errors import ConfigError
from cyclical_training.semi_supervised import pseudo_label_loss, strong_view, weak_view
from cyclical_training.train import Trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def quiet(_line: str) -> None:
    pass


def make_trainer(digits, **options) -> Trainer:
    values = {
        "epochs": 3, "batch_size": 50, "labeled": 200, "unlabeled_ratio": 2, "progress": False, "num_threads": 2,
    }
    values.update(options)
    return Trainer(TrainConfig(**values), log=quiet, dataset=digits)


def without_time_and_pseudo_accuracy(records: list[dict]) -> list[dict]:
    dropped = ("seconds", "pseudo_label_accuracy")
    return [{key: value for key, value in record.items() if key not in dropped} for record in records]


def test_labeled_subset_balanced_and_disjoint(digits):
    trainer = make_trainer(digits)
    assert torch.bincount(trainer.train_split.labels, minlength=10).tolist() == [20] * 10
    training_images = len(digits.train_labels)
    assert len(trainer.semi_supervised) == training_images - 200
    # An epoch is one pass over the labeled images: ceil(200 / 50) steps.
    assert trainer.clock.steps_in_epoch(0) == 4


def test_labeled_not_below_training_set_rejected(digits):
    size = len(digits.train_labels)
    with pytest.raises(ConfigError) as error:
        make_trainer(digits, labeled=size)
    assert f"({size} images)" in str(error.value)
    assert f"--labeled {size}" in str(error.value)


def test_unlabeled_knobs_need_labeled(digits):
    with pytest.raises(ConfigError, match="--unlabeled-weight needs --labeled"):
        make_trainer(digits, labeled=None, batch_size=128, unlabeled_weight="0:1")


def test_unlabeled_labels_never_used(digits):
    options = dict(epochs=2, unlabeled_ratio=1, confidence=0.3, seed=4)
    original = make_trainer(digits, **options)
    shuffled = make_trainer(digits, **options)
    held = shuffled.semi_supervised.held_labels
    permuted = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(permuted, held)
    shuffled.semi_supervised.held_labels = permuted

    original.fit()
    shuffled.fit()

    assert without_time_and_pseudo_accuracy(original.history) == without_time_and_pseudo_accuracy(shuffled.history)
    for a, b in zip(original.model.state_dict().values(), shuffled.model.state_dict().values()):
        assert torch.equal(a, b)
    # The threshold is low enough that some images pass, so the report does read the labels.
    assert any(record["pseudo_label_share"] > 0 for record in original.history)
    accuracies = [record["pseudo_label_accuracy"] for record in original.history]
    assert accuracies != [record["pseudo_label_accuracy"] for record in shuffled.history]


def test_knobs_follow_clock_in_record(digits):
    trainer = make_trainer(digits, unlabeled_ratio=1, unlabeled_weight="0:1", confidence="0.98:0.9")
    trainer.fit()
    records = trainer.history
    assert [r["knobs"]["unlabeled_weight"] for r in records] == [0.0, 1.0, 0.0]
    assert [r["knobs"]["confidence"] for r in records] == pytest.approx([0.98, 0.9, 0.98])
    for record in records:
        assert 0.0 <= record["pseudo_label_share"] <= 1.0
        assert record["unlabeled_loss"] >= 0.0


def test_default_knobs_with_labeled(digits):
    trainer = make_trainer(digits, epochs=1)
    assert trainer.knobs.values(trainer.clock)["unlabeled_weight"] == 1.0
    assert trainer.knobs.values(trainer.clock)["confidence"] == 0.95


def test_pseudo_label_loss_masks_below_threshold():
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 9.0]])
    strong = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.5, 0.0, 0.0]])
    loss, mask, pseudo = pseudo_label_loss(weak, strong, threshold=0.9)
    assert mask.tolist() == [True, False, True]
    assert pseudo.tolist() == [0, 1, 2]
    expected = torch.nn.functional.cross_entropy(strong, pseudo, reduction="none")
    # The mean runs over all three images, with 0 for the one under the threshold.
    assert loss.item() == pytest.approx((expected[0] + expected[2]).item() / 3)


def test_pseudo_label_loss_gradient_only_through_strong():
    weak = torch.randn(4, 3, requires_grad=True)
    strong = torch.randn(4, 3, requires_grad=True)
    loss, _, _ = pseudo_label_loss(weak, strong, threshold=0.0)
    loss.backward()
    assert weak.grad is None
    assert strong.grad is not None


def test_weak_view_identity_below_16_pixels():
    images = torch.randn(5, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    assert weak_view(images, generator) is images
    large = torch.randn(5, 3, 32, 32)
    assert weak_view(large, generator).shape == large.shape


def test_strong_view_keeps_part_of_small_image():
    images = torch.ones(64, 1, 8, 8)
    strong = strong_view(images, torch.Generator().manual_seed(0))
    # Cutout of side 4 on 8x8 images: each image keeps at least 48 of its 64 pixels non-zero.
    nonzero = (strong != 0).flatten(1).sum(dim=1)
    assert int(nonzero.min()) >= 48


def test_unlabeled_batches_repeat_per_epoch(digits):
    trainer = make_trainer(digits)
    ssl = trainer.semi_supervised
    first = ssl.batch_indices(epoch=1, step=3, labeled_batch=50)
    ssl.batch_indices(epoch=2, step=0, labeled_batch=50)
    assert len(first) == 100
    assert torch.equal(first, ssl.batch_indices(epoch=1, step=3, labeled_batch=50))
    assert len(set(first.tolist())) == 100
