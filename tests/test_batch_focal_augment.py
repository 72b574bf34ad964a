"""Cyclical batch size, focal losses and augmentation magnitude inside a training run."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch

from cyclical_training.cli import main
from cyclical_training.config import TrainConfig
from cyclical_training.data import load_dataset
from cyclical_training.losses import cross_entropy, cyclical_focal_loss, focal_loss
from cyclical_training.train import Trainer, plan_run


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make_trainer(digits, **options) -> Trainer:
    values = {"epochs": 5, "batch_size": 128, "progress": False, "num_threads": 2}
    values.update(options)
    return Trainer(TrainConfig(**values), log=lambda line: None, dataset=digits)


# Batch size ---------------------------------------------------------------------------------


def test_batch_sizes_follow_cycle():
    plan = plan_run(TrainConfig(epochs=5, batch_size="512:128"), train_images=50_000)
    assert plan.batch_sizes == [512, 320, 128, 320, 512]


def test_steps_per_epoch_ceil_and_floor():
    ceil_plan = plan_run(TrainConfig(epochs=5, batch_size="512:128"), train_images=1000)
    floor_plan = plan_run(TrainConfig(epochs=5, batch_size="512:128", drop_last=True), train_images=1000)
    assert ceil_plan.clock._epoch_steps == [2, 4, 8, 4, 2]
    assert floor_plan.clock._epoch_steps == [1, 3, 7, 3, 1]
    assert ceil_plan.clock.total_steps == 20


def test_step_clock_ends_on_last_real_step(digits):
    trainer = make_trainer(digits, batch_size="512:128", cycle_unit="step", cycle_peak=1.0, temperature="1:2")
    trainer.fit()
    assert trainer.clock.global_step == trainer.clock.total_steps - 1
    assert trainer.knobs.values(trainer.clock)["temperature"] == 2.0


def test_each_sample_seen_once_per_epoch_with_cycled_batch(digits):
    trainer = make_trainer(digits, batch_size="512:128", epochs=3)
    # Mark each image with its index in the first two pixels and record what the loop receives.
    count = len(trainer.train_split.labels)
    trainer.train_split.images[:, 0, 0, 0] = (torch.arange(count) // 256).to(torch.uint8)
    trainer.train_split.images[:, 0, 0, 1] = (torch.arange(count) % 256).to(torch.uint8)
    seen: dict[int, list[int]] = {}
    sizes: dict[int, list[int]] = {}
    prepare = trainer.prepare_batch

    def recording_prepare(images, values, generator):
        indices = (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()
        seen.setdefault(trainer.clock.epoch, []).extend(indices)
        sizes.setdefault(trainer.clock.epoch, []).append(len(indices))
        return prepare(images, values, generator)

    trainer.prepare_batch = recording_prepare
    trainer.fit()
    for epoch in range(3):
        assert sorted(seen[epoch]) == list(range(count)), f"epoch {epoch}"
    assert sizes[0][:-1] == [512] * (math.ceil(count / 512) - 1)
    assert sizes[1][:-1] == [128] * (math.ceil(count / 128) - 1)
    assert [record["knobs"]["batch_size"] for record in trainer.history] == [512, 128, 512]


@pytest.mark.parametrize(
    "scaling, factors",
    [("none", [1.0, 1.0, 1.0]), ("linear", [1.0, 0.25, 1.0]), ("sqrt", [1.0, 0.5, 1.0])],
)
def test_lr_scaling_with_batch_size(scaling, factors):
    config = TrainConfig(epochs=3, batch_size="512:128", lr=0.4, lr_schedule="constant", lr_scaling=scaling)
    plan = plan_run(config, train_images=4096)
    lrs = []
    for epoch in range(3):
        plan.clock.start_epoch(epoch)
        lrs.append(plan.knobs["lr"].at(plan.clock))
    assert lrs == pytest.approx([0.4 * factor for factor in factors], rel=1e-12)


def test_schedule_csv_shows_batch_sizes(capsys):
    assert main(["schedule", "--batch-size", "512:128", "--epochs", "10", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(row["batch_size"]) for row in rows] == [512, 427, 341, 256, 171, 171, 256, 341, 427, 512]


def test_schedule_steps_from_train_images(capsys):
    assert main([
        "schedule", "--batch-size", "512:128", "--epochs", "3", "--train-images", "1000",
        "--cycle-unit", "step", "--csv",
    ]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    per_epoch = [sum(1 for row in rows if row["epoch"] == str(epoch)) for epoch in (1, 2, 3)]
    assert per_epoch == [2, 8, 2]


# Focal losses in the trainer ----------------------------------------------------------------


def test_trainer_uses_cyclical_focal_difficulty(digits):
    trainer = make_trainer(digits, loss="cyclical-focal", label_smoothing=0.1, gamma_hc=2.0, gamma_neg=4.0)
    logits = torch.randn(8, 10)
    labels = torch.arange(8)
    for epoch, d in zip(range(5), [0.0, 0.5, 1.0, 0.5, 0.0]):
        trainer.clock.start_epoch(epoch)
        loss = trainer.training_loss(logits, labels, {"temperature": 1.0})
        expected = cyclical_focal_loss(logits, labels, d, 2.0, 0.0, 4.0, 0.1)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6), f"epoch {epoch}"


def test_trainer_fixed_focal_is_hard_end(digits):
    trainer = make_trainer(digits, loss="focal", label_smoothing=0.1)
    logits = torch.randn(8, 10)
    labels = torch.arange(8)
    trainer.clock.start_epoch(0)
    loss = trainer.training_loss(logits, labels, {"temperature": 2.0})
    expected = focal_loss(logits / 2.0, labels, 0.0, 4.0, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_trainer_cross_entropy_with_smoothing(digits):
    trainer = make_trainer(digits, label_smoothing=0.2)
    logits = torch.randn(8, 10)
    labels = torch.arange(8)
    loss = trainer.training_loss(logits, labels, {"temperature": 0.5})
    assert loss.item() == pytest.approx(cross_entropy(logits, labels, 0.5, 0.2).item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["focal", "cyclical-focal"])
def test_focal_losses_train_digits(digits, loss):
    summary = make_trainer(digits, loss=loss, epochs=3).fit()
    assert summary["final_test_accuracy"] > 0.6


# Augmentation magnitude in the trainer -----------------------------------------------------


def test_augment_magnitude_follows_clock(digits):
    trainer = make_trainer(digits, augment="0:1", epochs=3)
    trainer.fit()
    assert [record["knobs"]["augment"] for record in trainer.history] == [0.0, 1.0, 0.0]


def test_augment_zero_is_identity_in_trainer(digits):
    trainer = make_trainer(digits, augment="0:1")
    trainer.clock.start_epoch(0)
    values = trainer.knobs.apply(trainer.clock)
    images = trainer.train_split.images[:32]
    prepared = trainer.prepare_batch(images, values, torch.Generator().manual_seed(0))
    from cyclical_training.augment import normalize

    expected = normalize(images, trainer.dataset.mean, trainer.dataset.std)
    assert torch.equal(prepared, expected)


def test_augment_hard_end_changes_batch(digits):
    trainer = make_trainer(digits, augment="0:1")
    trainer.clock.start_epoch(2)
    values = trainer.knobs.apply(trainer.clock)
    images = trainer.train_split.images[:32]
    prepared = trainer.prepare_batch(images, values, torch.Generator().manual_seed(0))
    from cyclical_training.augment import normalize

    plain = normalize(images, trainer.dataset.mean, trainer.dataset.std)
    assert values["augment"] == 1.0
    assert (prepared - plain).abs().mean().item() > 0.1


def test_augment_seeded_runs_repeat(digits):
    first = make_trainer(digits, augment="0.5", epochs=2, seed=4)
    second = make_trainer(digits, augment="0.5", epochs=2, seed=4)
    first.fit()
    second.fit()
    assert [r["train_loss"] for r in first.history] == [r["train_loss"] for r in second.history]
