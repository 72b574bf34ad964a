"""CyclicalCallback inside a real Lightning Trainer: knob values, temperature, clipping, resume."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from cyclical_training.errors import CheckpointError, ConfigError
from cyclical_training.integrations.lightning import CyclicalCallback
from cyclical_training.knobs import Knob, WarmupCosine
from cyclical_training.losses import cross_entropy

FEATURES, CLASSES = 6, 3
SAMPLES, BATCH_SIZE = 40, 8
BATCHES = SAMPLES // BATCH_SIZE  # 5 batches per epoch
BUILT_DECAY = 1e-3


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(inputs, labels), batch_size=BATCH_SIZE, shuffle=False)


def triangle(progress: float, peak: float = 0.5) -> float:
    """Linear difficulty: 0 at both ends and 1 at ``peak``."""
    if progress <= peak:
        return progress / peak
    return (1.0 - progress) / (1.0 - peak)


class TinyClassifier(pl.LightningModule):
    """A linear classifier that records optimizer settings, knob values and gradient norms."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.9, input_scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(FEATURES, CLASSES)
        self.lr, self.momentum, self.input_scale = lr, momentum, input_scale
        self.temperature = 1.0
        self.steps: list[dict] = []
        self.norms_before_clipping: list[float] = []
        self.norms_after_clipping: list[float] = []

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        optimizer = self.trainer.optimizers[0]
        self.steps.append(
            {
                "epoch": self.current_epoch,
                "global_step": self.global_step,
                "lr": [group["lr"] for group in optimizer.param_groups],
                "weight_decay": [group["weight_decay"] for group in optimizer.param_groups],
                "momentum": [group["momentum"] for group in optimizer.param_groups],
                "temperature": self.temperature,
                "values": dict(getattr(self, "cyclical_values", {})),
            }
        )
        logits = self.net(inputs * self.input_scale)
        return cross_entropy(logits, labels, temperature=self.temperature)

    def on_after_backward(self) -> None:
        self.norms_before_clipping.append(gradient_norm(self))

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning runs this after every callback's on_before_optimizer_step, so after clipping.
        self.norms_after_clipping.append(gradient_norm(self))

    def configure_optimizers(self):
        groups = [
            {"params": [self.net.weight], "weight_decay": BUILT_DECAY},
            {"params": [self.net.bias], "weight_decay": 0.0},
        ]
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)


def gradient_norm(module: torch.nn.Module) -> float:
    norms = [parameter.grad.norm() for parameter in module.parameters() if parameter.grad is not None]
    return torch.stack(norms).norm().item()


class RecordingLogger(Logger):
    """A logger that keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


def make_trainer(callbacks: list, max_epochs: int = 4, **options) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(options)
    return pl.Trainer(callbacks=callbacks, **settings)


def fit(callback: CyclicalCallback, model: TinyClassifier | None = None, max_epochs: int = 4,
        ckpt_path=None, extra_callbacks: tuple = (), **options) -> TinyClassifier:
    model = model or TinyClassifier()
    trainer = make_trainer([callback, *extra_callbacks], max_epochs=max_epochs, **options)
    trainer.fit(model, train_dataloaders=make_loader(), ckpt_path=ckpt_path)
    return model


def first_step_of_each_epoch(model: TinyClassifier) -> list[dict]:
    firsts = {}
    for record in model.steps:
        firsts.setdefault(record["epoch"], record)
    return [firsts[epoch] for epoch in sorted(firsts)]


# Optimizer knobs --------------------------------------------------------------------------------


def test_weight_decay_per_group_follows_knob():
    callback = CyclicalCallback(peak=0.5, weight_decay=Knob(1e-4, 1e-3, name="weight_decay"))
    model = fit(callback, max_epochs=5)

    expected = [1e-4, 5.5e-4, 1e-3, 5.5e-4, 1e-4]
    assert len(model.steps) == 5 * BATCHES
    for record in model.steps:
        decay, zero_decay = record["weight_decay"]
        assert decay == pytest.approx(expected[record["epoch"]], rel=1e-12)
        assert zero_decay == 0.0


def test_weight_decay_constant_within_epoch():
    callback = CyclicalCallback(peak=0.5, weight_decay=Knob(1e-4, 1e-3, name="weight_decay"))
    model = fit(callback, max_epochs=3)

    for epoch in range(3):
        decays = {record["weight_decay"][0] for record in model.steps if record["epoch"] == epoch}
        assert len(decays) == 1


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lr_per_step_with_step_unit(accumulate):
    epochs = 3
    steps_per_epoch = math.ceil(BATCHES / accumulate)
    total_steps = epochs * steps_per_epoch
    callback = CyclicalCallback(peak=0.5, unit="step", lr=Knob(0.01, 0.1, name="lr"))
    model = fit(callback, max_epochs=epochs, accumulate_grad_batches=accumulate)

    assert callback.clock.total_steps == total_steps
    assert len(model.steps) == epochs * BATCHES
    for index, record in enumerate(model.steps):
        batch = index % BATCHES
        step = record["epoch"] * steps_per_epoch + batch // accumulate
        expected = 0.01 + triangle(step / (total_steps - 1)) * (0.1 - 0.01)
        assert record["global_step"] == step
        assert record["lr"] == [pytest.approx(expected, rel=1e-9)] * 2


def test_lr_warmup_cosine_per_step():
    epochs, total_steps = 3, 3 * BATCHES
    schedule = WarmupCosine(0.1, warmup_steps=4, final_value=0.001)
    callback = CyclicalCallback(unit="step", lr=schedule)
    model = fit(callback, max_epochs=epochs)

    for record in model.steps:
        step = record["global_step"]
        if step < 4:
            expected = 0.1 * (step + 1) / 4
        else:
            t = (step - 4) / (total_steps - 4)
            expected = 0.001 + (0.1 - 0.001) * 0.5 * (1.0 + math.cos(math.pi * t))
        assert record["lr"][0] == pytest.approx(expected, rel=1e-9)


def test_momentum_relative_to_built_value():
    callback = CyclicalCallback(peak=0.5, momentum=Knob(0.95, 0.85, name="momentum"))
    model = fit(callback, max_epochs=3)

    expected = [0.95, 0.85, 0.95]
    for record in first_step_of_each_epoch(model):
        assert record["momentum"] == [pytest.approx(expected[record["epoch"]])] * 2


# Values handed to the module --------------------------------------------------------------------


def test_temperature_in_training_step():
    callback = CyclicalCallback(peak=0.5, temperature=Knob(1.0, 3.0, name="temperature"))
    model = fit(callback, max_epochs=5)

    expected = [1.0, 2.0, 3.0, 2.0, 1.0]
    assert len(model.steps) == 5 * BATCHES
    for record in model.steps:
        assert record["temperature"] == pytest.approx(expected[record["epoch"]])


def test_cyclical_values_difficulty_and_knobs():
    callback = CyclicalCallback(
        peak=0.5, temperature=Knob(1.0, 3.0, name="temperature"), mixup_alpha=Knob(0.0, 0.4), label_noise=0.1
    )
    model = fit(callback, max_epochs=5)

    expected_difficulty = [0.0, 0.5, 1.0, 0.5, 0.0]
    for record in first_step_of_each_epoch(model):
        values = record["values"]
        epoch = record["epoch"]
        assert set(values) == {"difficulty", "temperature", "mixup_alpha", "label_noise"}
        assert values["difficulty"] == pytest.approx(expected_difficulty[epoch])
        assert values["mixup_alpha"] == pytest.approx(0.4 * expected_difficulty[epoch])
        assert values["label_noise"] == 0.1
        assert values["temperature"] == record["temperature"]


# Gradient clipping and logging ------------------------------------------------------------------


def test_clipping_to_scheduled_norm():
    clip = Knob(0.02, 0.005, name="clip_norm")
    callback = CyclicalCallback(peak=0.5, clip_norm=clip)
    model = fit(callback, model=TinyClassifier(input_scale=10.0), max_epochs=3)

    scheduled = [clip.value(d) for d in (0.0, 1.0, 0.0) for _ in range(BATCHES)]
    assert len(model.norms_after_clipping) == len(scheduled)
    for before, after, limit in zip(model.norms_before_clipping, model.norms_after_clipping, scheduled):
        assert before > limit
        assert after <= limit * (1 + 1e-5)
        assert after == pytest.approx(limit, rel=1e-4)


def test_values_and_grad_norm_logged():
    clip = Knob(0.02, 0.005, name="clip_norm")
    logger = RecordingLogger()
    callback = CyclicalCallback(peak=0.5, lr=Knob(0.05, 0.1, name="lr"), clip_norm=clip)
    model = fit(callback, model=TinyClassifier(input_scale=10.0), max_epochs=3, logger=logger, log_every_n_steps=1)

    step_records = [metrics for _, metrics in logger.records if "cyclical/grad_norm" in metrics]
    assert len(step_records) == 3 * BATCHES
    for index, metrics in enumerate(step_records):
        assert {"cyclical/difficulty", "cyclical/lr", "cyclical/clip_norm"} <= set(metrics)
        assert metrics["cyclical/lr"] == pytest.approx(model.steps[index]["lr"][0])
        assert metrics["cyclical/grad_norm"] == pytest.approx(model.norms_before_clipping[index], rel=1e-5)
        assert metrics["cyclical/grad_norm"] > metrics["cyclical/clip_norm"]


def float16_scaler_plugin(init_scale: float = 256.0) -> MixedPrecision:
    # On CPU Lightning picks bfloat16 without a scaler, so build the float16 scaler path by hand.
    # A small initial scale keeps the float16 gradients of this model finite.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_clipping_after_amp_unscaling():
    clip = Knob(0.02, 0.005, name="clip_norm")
    logger = RecordingLogger()
    callback = CyclicalCallback(peak=0.5, clip_norm=clip)
    model = fit(
        callback, model=TinyClassifier(input_scale=10.0), max_epochs=3,
        plugins=[float16_scaler_plugin(256.0)], logger=logger, log_every_n_steps=1,
    )

    scheduled = [clip.value(d) for d in (0.0, 1.0, 0.0) for _ in range(BATCHES)]
    logged = [metrics["cyclical/grad_norm"] for _, metrics in logger.records if "cyclical/grad_norm" in metrics]
    assert len(logged) == len(scheduled)
    steps = zip(model.norms_before_clipping, logged, model.norms_after_clipping, scheduled)
    for scaled, unscaled, after, limit in steps:
        # Gradients in on_after_backward are multiplied by the loss scale, and the logged norm is unscaled.
        assert unscaled == pytest.approx(scaled / 256.0, rel=1e-3)
        assert after == pytest.approx(limit, rel=1e-4)


def test_fused_optimizer_with_scaler_raises():
    class Fused(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, fused=True)

    trainer = make_trainer([CyclicalCallback(clip_norm=1.0)], plugins=[float16_scaler_plugin()])

    with pytest.raises(ConfigError, match="fused=True"):
        trainer.fit(Fused(), train_dataloaders=make_loader())


def test_gradient_clip_val_conflict_raises():
    callback = CyclicalCallback(clip_norm=1.0)
    model = TinyClassifier()
    trainer = make_trainer([callback], gradient_clip_val=0.5)

    with pytest.raises(ConfigError, match="gradient_clip_val"):
        trainer.fit(model, train_dataloaders=make_loader())
    assert model.steps == []


def test_clipping_hook_conflict_raises():
    class SelfClipping(TinyClassifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")

    trainer = make_trainer([CyclicalCallback(clip_norm=1.0)])

    with pytest.raises(ConfigError, match="configure_gradient_clipping"):
        trainer.fit(SelfClipping(), train_dataloaders=make_loader())


# Configuration errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"difficulty": 0.5}, "clock's own value"),
        ({"lr": "0.1"}, "must be a Knob, a WarmupCosine or a number"),
        ({"lr": True}, "must be a Knob, a WarmupCosine or a number"),
        ({"lr": Knob(-0.1, 0.1)}, "lr must be > 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"unit": "batch"}, "unit must be one of epoch, step"),
        ({"peak": 0.0}, "peak must be in"),
    ],
)
def test_invalid_option_raises(options, message):
    with pytest.raises(ConfigError, match=message):
        CyclicalCallback(**options)


def test_lr_scheduler_conflict_raises():
    class Scheduled(TinyClassifier):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)]

    trainer = make_trainer([CyclicalCallback(lr=Knob(0.01, 0.1))])

    with pytest.raises(ConfigError, match="learning-rate scheduler"):
        trainer.fit(Scheduled(), train_dataloaders=make_loader())


def test_max_steps_before_schedule_end_raises():
    trainer = make_trainer([CyclicalCallback(temperature=Knob(1.0, 2.0))], max_epochs=4, max_steps=7)

    with pytest.raises(ConfigError, match="max_steps=7"):
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader())


def test_unbounded_epochs_raise():
    trainer = make_trainer([CyclicalCallback(temperature=Knob(1.0, 2.0))], max_epochs=-1, max_steps=20)

    with pytest.raises(ConfigError, match="max_epochs"):
        trainer.fit(TinyClassifier(), train_dataloaders=make_loader())


def test_two_callbacks_rejected_by_lightning():
    # Both instances have the state key "CyclicalCallback", and Lightning rejects that at Trainer init.
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        make_trainer([CyclicalCallback(temperature=2.0), CyclicalCallback(lr=0.1)])


# Resume -----------------------------------------------------------------------------------------


def resume_knobs() -> dict:
    return {
        "peak": 0.5,
        "unit": "step",
        "lr": Knob(0.01, 0.1, name="lr"),
        "momentum": Knob(0.95, 0.85, name="momentum"),
        "weight_decay": Knob(1e-4, 1e-3, name="weight_decay"),
        "temperature": Knob(1.0, 3.0, name="temperature"),
    }


def values_by_step(model: TinyClassifier) -> dict[int, tuple]:
    return {
        record["global_step"]: (record["lr"], record["momentum"], record["weight_decay"], record["temperature"])
        for record in model.steps
    }


class SaveAtStep(Callback):
    """Save a checkpoint after the optimizer step that makes ``trainer.global_step`` equal ``step``."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


def test_resume_from_epoch_checkpoint(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = fit(CyclicalCallback(**resume_knobs()), extra_callbacks=(saver,), enable_checkpointing=True)

    checkpoint = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["CyclicalCallback"]
    assert state["clock"] == {"epoch": 1, "global_step": 2 * BATCHES - 1}
    assert state["schedule"]["steps_per_epoch"] == [BATCHES] * 4

    resumed = fit(CyclicalCallback(**resume_knobs()), ckpt_path=tmp_path / "epoch=1.ckpt")
    expected = values_by_step(full)
    seen = values_by_step(resumed)
    assert sorted(seen) == list(range(2 * BATCHES, 4 * BATCHES))
    for step, values in seen.items():
        assert values == expected[step]


def test_resume_mid_epoch(tmp_path):
    path = tmp_path / "mid.ckpt"
    full = fit(CyclicalCallback(**resume_knobs()), extra_callbacks=(SaveAtStep(7, path),))

    resumed = fit(CyclicalCallback(**resume_knobs()), ckpt_path=path)
    expected = values_by_step(full)
    seen = values_by_step(resumed)
    assert min(seen) == 7
    assert max(seen) == 4 * BATCHES - 1
    for step, values in seen.items():
        assert values == expected[step]


def test_resume_with_other_length_raises(tmp_path):
    path = tmp_path / "mid.ckpt"
    fit(CyclicalCallback(**resume_knobs()), extra_callbacks=(SaveAtStep(7, path),))

    with pytest.raises(CheckpointError, match="schedule"):
        fit(CyclicalCallback(**resume_knobs()), max_epochs=6, ckpt_path=path)
