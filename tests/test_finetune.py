"""Fine-tuning from a gct train checkpoint with cyclical unfreezing of the blocks."""

from __future__ import annotations

import json

import pytest
import torch

from cyclical_training.config import TrainConfig
from cyclical_training.data import ImageDataset, load_dataset
from cyclical_training.errors import ConfigError
from cyclical_training.finetune import trainable_block_count
from cyclical_training.train import Trainer, resume_trainer


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
def pretrained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    make_trainer(digits, epochs=1, train_size=500, seed=1, out=str(out)).fit()
    return out


def first_five_classes(digits) -> ImageDataset:
    train = digits.train_labels < 5
    test = digits.test_labels < 5
    return ImageDataset(
        name="digits-0-4", classes=digits.classes[:5],
        train_images=digits.train_images[train], train_labels=digits.train_labels[train],
        test_images=digits.test_images[test], test_labels=digits.test_labels[test],
    )


def block_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights and BatchNorm buffers of the body blocks, cloned."""
    return {name: value.clone() for name, value in trainer.model.state_dict().items() if name.startswith("blocks.")}


def optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Momentum buffers of the body blocks' parameters, by parameter name, cloned."""
    names = {parameter: name for name, parameter in trainer.model.named_parameters()}
    buffers = {}
    for parameter, state in trainer.optimizer.state.items():
        if names[parameter].startswith("blocks.") and "momentum_buffer" in state:
            buffers[names[parameter]] = state["momentum_buffer"].clone()
    return buffers


def run_epoch(trainer: Trainer, loader, epoch: int) -> dict:
    trainer.clock.start_epoch(epoch)
    loader.set_epoch(epoch, trainer.batch_sizes[epoch])
    return trainer.train_epoch(epoch, loader)


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_finetune_starts_from_checkpoint(digits, pretrained):
    trainer = make_trainer(digits, finetune=str(pretrained))
    saved = torch.load(pretrained / "checkpoint.pt", weights_only=True)["model"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_head_replaced_when_classes_differ(digits, pretrained):
    trainer = Trainer(TrainConfig(epochs=1, batch_size=64, progress=False, num_threads=2, finetune=str(pretrained)),
                      log=quiet, dataset=first_five_classes(digits))
    assert trainer.model.head.out_features == 5
    saved = torch.load(pretrained / "checkpoint.pt", weights_only=True)["model"]
    for name, value in block_state(trainer).items():
        assert torch.equal(value, saved[name]), name
    trainer.fit()
    assert trainer.history[-1]["test_accuracy"] > 0.2


@pytest.mark.parametrize(
    ("unfreeze", "blocks", "expected"),
    [(0.0, 3, 0), (1.0, 3, 3), (0.5, 3, 2), (0.4, 3, 1), (0.5, 4, 2), (0.2, 5, 1), (0.1, 5, 0)],
)
def test_trainable_block_count_rounds(unfreeze, blocks, expected):
    assert trainable_block_count(unfreeze, blocks) == expected


def test_frozen_blocks_do_not_move(digits, pretrained):
    # Three epochs at d = 0, 1, 0: only the head trains, then every block, then the head again.
    trainer = make_trainer(digits, finetune=str(pretrained), unfreeze="0:1", weight_decay=5e-3, momentum=0.9)
    loader = trainer._make_train_loader()
    initial = block_state(trainer)

    first = run_epoch(trainer, loader, 0)
    assert first["trainable_blocks"] == 0
    assert_same(initial, block_state(trainer))
    assert optimizer_state(trainer) == {}
    head = trainer.model.head.weight
    assert "momentum_buffer" in trainer.optimizer.state[head]

    second = run_epoch(trainer, loader, 1)
    assert second["trainable_blocks"] == 3
    moved = block_state(trainer)
    assert not torch.equal(moved["blocks.0.0.weight"], initial["blocks.0.0.weight"])
    buffers = optimizer_state(trainer)
    assert len(buffers) == sum(1 for name, _ in trainer.model.named_parameters() if name.startswith("blocks."))

    third = run_epoch(trainer, loader, 2)
    assert third["trainable_blocks"] == 0
    # Weights, BatchNorm running statistics and momentum buffers all stay bit for bit.
    assert_same(moved, block_state(trainer))
    assert_same(buffers, optimizer_state(trainer))


def test_optimizer_groups_fixed_across_freezing(digits, pretrained):
    trainer = make_trainer(digits, finetune=str(pretrained), unfreeze="0:1")
    count = sum(len(group["params"]) for group in trainer.optimizer.param_groups)
    assert count == len(list(trainer.model.parameters()))


def test_resume_with_frozen_blocks_repeats_run(digits, pretrained, tmp_path):
    options = dict(
        epochs=4, finetune=str(pretrained), unfreeze="0:1", seed=3, weight_decay="5e-4:5e-3", train_size=400,
    )
    whole = make_trainer(digits, out=str(tmp_path / "whole"), **options)
    whole.fit()

    class StopAfterTwoEpochs(Exception):
        pass

    def stop_after_two(line: str) -> None:
        if line.startswith("epoch 2/4"):
            raise StopAfterTwoEpochs

    partial = Trainer(
        TrainConfig(batch_size=128, progress=False, num_threads=2, out=str(tmp_path / "part"), **options),
        log=stop_after_two, dataset=digits,
    )
    with pytest.raises(StopAfterTwoEpochs):
        partial.fit()
    resumed = resume_trainer(tmp_path / "part", log=quiet)
    assert resumed.start_epoch == 2
    resumed.fit()

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert [record["trainable_blocks"] for record in records("whole")] == [0, 2, 2, 0]
    assert records("part") == records("whole")
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_invalid_finetune_options(digits, pretrained):
    with pytest.raises(ConfigError, match="--unfreeze needs --finetune"):
        make_trainer(digits, unfreeze="0:1")
    with pytest.raises(ConfigError, match="--model must be auto or digits-net"):
        make_trainer(digits, finetune=str(pretrained), model="fast-cnn")
