"""Knowledge distillation from a gct train checkpoint, with cyclical weight and temperature."""

from __future__ import annotations

import pytest
import torch

from cyclical_training.config import TrainConfig
from cyclical_training.data import ImageDataset, load_dataset
from cyclical_training.errors import ConfigError
from cyclical_training.losses import distillation_loss
from cyclical_training.train import Trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def quiet(_line: str) -> None:
    pass


def make_trainer(digits, **options) -> Trainer:
    values = {"epochs": 3, "batch_size": 128, "progress": False, "num_threads": 2}
    values.update(options)
    return Trainer(TrainConfig(**values), log=quiet, dataset=digits)


@pytest.fixture(scope="module")
def teacher_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    make_trainer(digits, epochs=1, out=str(out)).fit()
    return out


def first_five_classes(digits) -> ImageDataset:
    train = digits.train_labels < 5
    test = digits.test_labels < 5
    return ImageDataset(
        name="digits-0-4", classes=digits.classes[:5],
        train_images=digits.train_images[train], train_labels=digits.train_labels[train],
        test_images=digits.test_images[test], test_labels=digits.test_labels[test],
    )


def test_teacher_frozen_in_eval_mode(digits, teacher_run):
    trainer = make_trainer(digits, teacher=str(teacher_run), epochs=2, train_size=300, batch_size=100)
    before = {name: value.clone() for name, value in trainer.teacher.state_dict().items()}
    trainer.fit()
    assert not trainer.teacher.training
    assert all(not parameter.requires_grad for parameter in trainer.teacher.parameters())
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_teacher_loads_checkpoint_weights(digits, teacher_run):
    trainer = make_trainer(digits, teacher=str(teacher_run / "checkpoint.pt"))
    saved = torch.load(teacher_run / "checkpoint.pt", weights_only=True)["model"]
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_step_loss_is_distillation_loss(digits, teacher_run):
    trainer = make_trainer(digits, teacher=str(teacher_run), kd_weight="0.9:0.1", kd_temperature="2:6")
    trainer.clock.start_epoch(1)
    values = trainer.knobs.apply(trainer.clock)
    assert values["kd_weight"] == pytest.approx(0.1)
    assert values["kd_temperature"] == 6.0

    x = torch.randn(16, 1, 8, 8)
    labels = torch.arange(16) % 10
    trainer.model.eval()
    logits, loss = trainer.step_loss(x, labels, values, epoch=1, step=0, generator=torch.Generator())
    with torch.no_grad():
        teacher_logits = trainer.teacher(x)
    expected = distillation_loss(logits, teacher_logits, labels, 0.1, 6.0)
    assert torch.equal(loss, expected)
    loss.backward()
    assert all(parameter.grad is None for parameter in trainer.teacher.parameters())


def test_kd_knobs_follow_clock_in_record(digits, teacher_run):
    trainer = make_trainer(digits, teacher=str(teacher_run), kd_weight="0.9:0.1", train_size=300, batch_size=100)
    trainer.fit()
    assert [r["knobs"]["kd_weight"] for r in trainer.history] == pytest.approx([0.9, 0.1, 0.9])
    assert [r["knobs"]["kd_temperature"] for r in trainer.history] == [4.0, 4.0, 4.0]


def test_teacher_with_other_classes_rejected(digits, teacher_run):
    with pytest.raises(ConfigError, match="must predict the data's 5 classes, got a model with 10"):
        Trainer(TrainConfig(epochs=1, batch_size=64, progress=False, teacher=str(teacher_run)),
                log=quiet, dataset=first_five_classes(digits))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kd_weight": "0.9:0.1"}, "--kd-weight needs --teacher"),
        ({"teacher": "x", "loss": "focal"}, "--teacher needs --loss ce"),
        ({"teacher": "x", "temperature": "0.5:2"}, "--teacher needs --temperature 1"),
        ({"teacher": "x", "kd_weight": 1.5}, "--kd-weight must be <= 1"),
    ],
)
def test_invalid_distillation_options(digits, options, message):
    with pytest.raises(ConfigError, match=message):
        make_trainer(digits, **options)
