"""Training on the embedded digits: knob values in the optimizer, temperature, clipping, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cyclical_training.config import TrainConfig
from cyclical_training.data import load_dataset
from cyclical_training.train import Trainer, resume_trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def quiet(_line: str) -> None:
    pass


def make_trainer(digits, **options) -> Trainer:
    values = {"epochs": 4, "batch_size": 128, "progress": False, "num_threads": 2}
    values.update(options)
    return Trainer(TrainConfig(**values), log=quiet, dataset=digits)


def strip_time(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def test_weight_decay_per_group_follows_knob(digits):
    trainer = make_trainer(digits, weight_decay="1e-4:1e-3", epochs=5, cycle_peak=0.5)
    groups = {group["group_name"]: group for group in trainer.optimizer.param_groups}
    expected = [1e-4, 5.5e-4, 1e-3, 5.5e-4, 1e-4]
    seen_decay, seen_zero = [], []
    for epoch in range(5):
        trainer.clock.start_epoch(epoch)
        trainer.knobs.apply(trainer.clock)
        seen_decay.append(groups["decay"]["weight_decay"])
        seen_zero.append(groups["no_decay"]["weight_decay"])
    assert seen_decay == pytest.approx(expected, rel=1e-12)
    assert seen_zero == [0.0] * 5


def test_zero_decay_group_holds_biases_and_norms(digits):
    trainer = make_trainer(digits)
    groups = {group["group_name"]: group for group in trainer.optimizer.param_groups}
    assert all(parameter.ndim >= 2 for parameter in groups["decay"]["params"])
    assert all(parameter.ndim < 2 for parameter in groups["no_decay"]["params"])
    norm_and_bias = [p for name, p in trainer.model.named_parameters() if name.endswith("bias") or p.ndim == 1]
    assert {id(p) for p in norm_and_bias} <= {id(p) for p in groups["no_decay"]["params"]}


def test_zero_decay_group_stays_zero_after_training(digits):
    trainer = make_trainer(digits, epochs=2, weight_decay="5e-4:5e-3")
    trainer.fit()
    groups = {group["group_name"]: group for group in trainer.optimizer.param_groups}
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] > 0.0


def test_temperature_divides_training_logits(digits):
    trainer = make_trainer(digits, temperature=2.0)
    logits = torch.randn(6, 10)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = trainer.training_loss(logits, labels, {"temperature": 2.0})
    torch.testing.assert_close(loss, F.cross_entropy(logits / 2.0, labels), rtol=0, atol=1e-7)


def test_temperature_not_used_in_evaluation(digits):
    cold = make_trainer(digits, temperature=0.25)
    hot = make_trainer(digits, temperature=4.0)
    hot.model.load_state_dict(cold.model.state_dict())
    assert cold.evaluate(cold.test_split) == hot.evaluate(hot.test_split)


def test_temperature_changes_training(digits):
    cold = make_trainer(digits, epochs=1, temperature=0.5)
    hot = make_trainer(digits, epochs=1, temperature=2.0)
    cold.fit()
    hot.fit()
    assert cold.history[0]["test_loss"] != hot.history[0]["test_loss"]


def test_clipping_sees_unscaled_gradients(digits):
    # A gradient scaler multiplies the loss by 1024; clipping must still act on true gradients,
    # so the weights and the logged norm match the run without a scaler.
    plain = make_trainer(digits, epochs=1, clip_norm=0.5, lr_schedule="constant", lr=0.05)
    scaled = make_trainer(digits, epochs=1, clip_norm=0.5, lr_schedule="constant", lr=0.05)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plain_record = plain.fit()
    scaled_record = scaled.fit()
    assert plain.history[0]["grad_norm_mean"] == pytest.approx(scaled.history[0]["grad_norm_mean"], rel=1e-4)
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert plain_record["final_test_accuracy"] == pytest.approx(scaled_record["final_test_accuracy"], abs=0.01)


def test_clipping_bounds_update_size(digits):
    # With plain SGD (no momentum, no decay) a clipped step moves the weights by at most lr * clip.
    trainer = make_trainer(
        digits, epochs=1, clip_norm=0.01, momentum=0.0, weight_decay=0.0, lr_schedule="constant", lr=1.0,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.clock.start_epoch(0)
    images, labels = trainer.train_split.images[:64], trainer.train_split.labels[:64]
    values = trainer.knobs.apply(trainer.clock)
    x = trainer.prepare_batch(images, values, torch.Generator().manual_seed(0))
    loss = trainer.training_loss(trainer.model(x), labels, values)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(trainer.trainable, values["clip_norm"])
    trainer.optimizer.step()
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainer.model.parameters(), before)))
    assert norm.item() > 0.01
    assert moved.item() == pytest.approx(0.01, rel=1e-3)


def test_all_three_knobs_in_one_run(digits, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(
        digits, epochs=3, weight_decay="5e-4:5e-3", temperature="0.5:2", clip_norm="1:10", out=str(out),
    )
    summary = trainer.fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["knobs"]["weight_decay"] for r in records] == pytest.approx([5e-4, 5e-3, 5e-4])
    assert [r["knobs"]["temperature"] for r in records] == pytest.approx([0.5, 2.0, 0.5])
    assert [r["knobs"]["clip_norm"] for r in records] == pytest.approx([1.0, 10.0, 1.0])
    assert all("grad_norm_mean" in r for r in records)
    assert summary["final_test_accuracy"] > 0.5


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_resume_repeats_uninterrupted_run(digits, tmp_path, unit):
    options = dict(
        epochs=4, weight_decay="5e-4:5e-3", temperature="0.5:2", clip_norm="1:10", momentum="0.95:0.85",
        cycle_unit=unit, seed=3,
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
    resumed.dataset = digits
    resumed.fit()

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return strip_time([json.loads(line) for line in lines])

    assert records("part") == records("whole")
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_holds_run_state(digits, tmp_path):
    out = tmp_path / "run"
    make_trainer(digits, epochs=2, out=str(out)).fit()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "clock"} <= set(state)
    assert state["epoch"] == 1
    assert state["clock"]["epoch"] == 1
    assert (out / "config.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert set(summary["versions"]) == {"cyclical_training", "torch", "python"}


def test_same_seed_same_metrics(digits):
    first = make_trainer(digits, epochs=2, seed=5)
    second = make_trainer(digits, epochs=2, seed=5)
    first.fit()
    second.fit()
    assert strip_time(first.history) == strip_time(second.history)


def test_train_size_balanced_subset(digits):
    trainer = make_trainer(digits, train_size=100, batch_size=50)
    counts = torch.bincount(trainer.train_split.labels, minlength=10)
    assert counts.tolist() == [10] * 10


def test_batch_larger_than_training_set_rejected(digits):
    from cyclical_training.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--batch-size must be <= the training set \(100 images\), got 128"):
        make_trainer(digits, train_size=100)
