"""A Lightning callback that drives knobs from the training clock inside ``Trainer.fit``.

``CyclicalCallback`` builds a ``Clock`` from ``Trainer(max_epochs=...)`` and the number of
optimizer steps per epoch. Before every training batch it moves the clock to Lightning's own
position (``trainer.current_epoch`` and ``trainer.global_step``) and writes the scheduled lr,
momentum and weight decay into the optimizer. It also hands every value to the LightningModule,
clips gradients to the scheduled ``clip_norm``, and logs each value once per optimizer step.

Example::

    import lightning.pytorch as pl
    import torch

    from cyclical_training.integrations.lightning import CyclicalCallback
    from cyclical_training.knobs import Knob
    from cyclical_training.losses import cross_entropy

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 3)
            self.temperature = 1.0  # replaced by the scheduled value before every training batch

        def training_step(self, batch, batch_idx):
            x, y = batch
            # Only training logits are divided by the temperature, validation logits never are.
            return cross_entropy(self.net(x), y, temperature=self.temperature)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    callback = CyclicalCallback(
        peak=0.5,
        weight_decay=Knob(5e-4, 5e-3, name="weight_decay"),
        temperature=Knob(1.0, 2.0, name="temperature"),
        clip_norm=Knob(2.0, 1.0, name="clip_norm"),
    )
    trainer = pl.Trainer(max_epochs=30, callbacks=[callback])
    trainer.fit(Classifier(), train_dataloaders=train_loader)

The clock's difficulty is always available as ``pl_module.cyclical_values["difficulty"]``, for
example as the ``difficulty`` argument of ``cyclical_focal_loss``.

Lightning facts this module relies on were read in the source of lightning 2.6.6:

- ``on_train_batch_start`` runs before ``training_step``. In automatic optimization,
  ``training_step`` runs inside the closure of ``optimizer.step``, and with
  ``accumulate_grad_batches = k`` every k-th batch (and the last batch of an epoch) steps.
- ``on_before_optimizer_step`` runs after the closure and after the AMP gradient scaler has
  unscaled the gradients. Callback hooks run first, then the LightningModule's hook, and then
  Lightning's own clipping through ``configure_gradient_clipping``.
- ``trainer.global_step`` counts optimizer steps and ``trainer.num_training_batches`` counts
  the batches of one epoch after ``limit_train_batches``. Both are known at ``on_train_start``,
  and a resumed ``fit(ckpt_path=...)`` restores the step and epoch counters before that hook.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch import strategies as lightning_strategies
    from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as error:  # pragma: no cover - the test file skips without lightning
    raise ImportError(
        "cyclical_training.integrations.lightning needs the lightning package, which is missing. "
        "Install it with: pip install 'cyclical-training[lightning]'"
    ) from error

from ..clock import UNITS, Clock, validate_clock_options
from ..errors import CheckpointError, ConfigError, TrainingError, check_choice
from ..knobs import OPTIMIZER_FIELDS, Knob, KnobSet, Schedule, WarmupCosine, make_knob

__all__ = ["CyclicalCallback"]

# Key of the clock's difficulty in ``pl_module.cyclical_values``, which no knob may use.
DIFFICULTY_KEY = "difficulty"

# Strategies that shard gradients across ranks. The clipping here is written and tested for
# unsharded gradients only. DeepSpeed also accumulates and clips inside its own engine.
_SHARDING_STRATEGY_NAMES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


class CyclicalCallback(Callback):
    """Set knobs from the training clock at every training batch of ``Trainer.fit``.

    Clock options are those of ``Clock``: ``peak``, ``shape``, ``cycles`` and ``unit``
    (``"epoch"`` keeps values constant within an epoch, ``"step"`` changes them every optimizer
    step). Each knob is a ``Knob``, a ``WarmupCosine`` or a plain number for a constant:

    - ``lr``, ``momentum`` and ``weight_decay`` are written into every parameter group of the
      one optimizer, relative to the value each group was built with (see ``KnobSet``). A group
      built with 0 stays at 0.
    - ``temperature`` is set as ``pl_module.temperature`` before every training batch. The
      module's ``training_step`` must divide its logits by it. Validation and test steps must
      use plain logits, because the attribute keeps the last training value.
    - ``clip_norm`` clips the global L2 norm of the optimizer's gradients to the scheduled value
      in ``on_before_optimizer_step``, after AMP unscaling. The norm before clipping is logged
      as ``<log_prefix>grad_norm``.
    - Any other keyword is a named knob whose value is only computed and handed to the module.

    Before every training batch ``pl_module.cyclical_values`` is set to a new dict with the
    clock's ``difficulty`` and every knob value. Each of these values is logged with
    ``pl_module.log(on_step=True, on_epoch=False)`` once per optimizer step.

    The run needs ``Trainer(max_epochs=N)``, a training dataloader with a length that stays the
    same in every epoch, and exactly one optimizer when an optimizer knob or ``clip_norm`` is
    given. Steps per epoch follow ``accumulate_grad_batches`` or a ``GradientAccumulationScheduler``.
    One Trainer takes one CyclicalCallback, because Lightning rejects a second stateful callback
    with the same ``state_key``, which is the class name here.

    The clock's position is always read from ``trainer.current_epoch`` and ``trainer.global_step``,
    which a resumed ``fit(ckpt_path=...)`` restores. ``state_dict`` stores that position and the
    schedule length, and a resumed run with a different length raises CheckpointError.

    The callback reads no device tensor. Lightning 2.6.6 copies every logged number to the
    module's device and reads logged values back every ``log_every_n_steps``, as for a logged loss.

    Raises:
        ConfigError: an option or knob is invalid here, or when fitting starts, the Trainer
            or the module does not fit the schedule (see ``on_fit_start``, ``on_train_start``).
        CheckpointError: a resumed run has a different schedule length than the checkpoint.
        TrainingError: the number of training batches changed between epochs.
    """

    def __init__(
        self,
        *,
        peak: float = 0.5,
        shape: str = "linear",
        cycles: int = 1,
        unit: str = "epoch",
        lr: Schedule | float | None = None,
        momentum: Schedule | float | None = None,
        weight_decay: Schedule | float | None = None,
        temperature: Schedule | float | None = None,
        clip_norm: Schedule | float | None = None,
        log_prefix: str = "cyclical/",
        **knobs: Schedule | float | None,
    ) -> None:
        super().__init__()
        validate_clock_options(peak, shape, cycles)
        check_choice("unit", unit, UNITS)
        if not isinstance(log_prefix, str):
            raise ConfigError(f"log_prefix must be a string, got {log_prefix!r}")
        self.peak, self.shape, self.cycles, self.unit = peak, shape, cycles, unit
        self.log_prefix = log_prefix

        named = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "temperature": temperature,
            "clip_norm": clip_norm,
        }
        named.update(knobs)
        self.schedules: dict[str, Schedule] = {
            name: _as_schedule(name, value) for name, value in named.items() if value is not None
        }

        self.clock: Clock | None = None
        self.knobs: KnobSet | None = None
        self.values: dict[str, float] = {}
        self.steps_per_epoch: list[int] = []
        self._batches_per_epoch = 0
        self._loaded_state: dict[str, Any] = {}

    @property
    def _uses_optimizer(self) -> bool:
        return any(name in self.schedules for name in (*OPTIMIZER_FIELDS, "clip_norm"))

    # Checks when fitting starts --------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise ConfigError for a Trainer setup that would fight the scheduled values."""
        strategy_name = type(trainer.strategy).__name__
        if isinstance(trainer.strategy, _strategy_classes("DeepSpeedStrategy")):
            raise ConfigError(
                f"CyclicalCallback does not support {strategy_name}, because DeepSpeed accumulates and "
                "clips gradients inside its engine. Use a single-device or DDP strategy"
            )
        if "clip_norm" in self.schedules:
            self._check_clipping_setup(trainer, pl_module, strategy_name)

    def _check_clipping_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy_name: str) -> None:
        if trainer.gradient_clip_val:
            raise ConfigError(
                f"CyclicalCallback(clip_norm=...) and Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) "
                "would both clip the gradients. Remove gradient_clip_val from the Trainer"
            )
        if is_overridden("configure_gradient_clipping", pl_module):
            raise ConfigError(
                f"CyclicalCallback(clip_norm=...) and {type(pl_module).__name__}.configure_gradient_clipping "
                "would both clip the gradients. Remove one of them"
            )
        if isinstance(trainer.strategy, _strategy_classes(*_SHARDING_STRATEGY_NAMES)):
            raise ConfigError(
                f"CyclicalCallback(clip_norm=...) does not support {strategy_name}, which shards gradients "
                "across ranks, while the callback clips unsharded gradients only. "
                "Use a single-device or DDP strategy"
            )

    # Clock and knobs -------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the clock and knobs for this run, and set the values at its current position.

        Raises:
            ConfigError: the run length is unknown, ``max_steps`` would end it before the
                schedule does, or the optimizer setup does not fit the knobs.
            CheckpointError: the run resumes from a checkpoint with a different schedule length.
        """
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ConfigError(
                f"CyclicalCallback needs Trainer(max_epochs=N) with N >= 1 to plan the schedule, "
                f"got max_epochs={epochs!r}"
            )
        self._batches_per_epoch = _count_training_batches(trainer)
        self.steps_per_epoch = _plan_steps_per_epoch(trainer, epochs, self._batches_per_epoch)
        total_steps = sum(self.steps_per_epoch)
        if trainer.max_steps is not None and 0 <= trainer.max_steps < total_steps:
            raise ConfigError(
                f"Trainer(max_steps={trainer.max_steps}) would stop before the schedule ends at step {total_steps} "
                f"({epochs} epochs). Remove max_steps and set the run length with max_epochs"
            )
        self.clock = Clock(
            epochs=epochs,
            steps_per_epoch=self.steps_per_epoch,
            peak=self.peak,
            shape=self.shape,
            cycles=self.cycles,
            unit=self.unit,
        )
        if self._loaded_state:
            self._check_resumed_schedule(self._loaded_state)
            self.clock.load_state_dict(self._loaded_state["clock"])
            self._loaded_state = {}

        optimizer = self._schedule_optimizer(trainer) if self._uses_optimizer else None
        self._check_temperature_attribute(pl_module)
        self.knobs = KnobSet(optimizer, **self.schedules)
        self._update(trainer, pl_module)

    def _schedule_optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ConfigError(
                f"CyclicalCallback with lr, momentum, weight_decay or clip_norm needs exactly one optimizer, "
                f"got {len(optimizers)} from configure_optimizers"
            )
        optimizer = optimizers[0]
        if "lr" in self.schedules and trainer.lr_scheduler_configs:
            raise ConfigError(
                "CyclicalCallback(lr=...) and the learning-rate scheduler from configure_optimizers would both "
                "set the learning rate. Remove one of them"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # A fused optimizer unscales inside step(), so its gradients are still scaled when clipping runs.
        # Lightning 2.6.6 reads the same private torch flag for its own clipping.
        unscales_in_step = getattr(optimizer, "_step_supports_amp_scaling", False)
        if "clip_norm" in self.schedules and scaler is not None and unscales_in_step:
            raise ConfigError(
                f"CyclicalCallback(clip_norm=...) cannot clip {type(optimizer).__name__} under float16 AMP, "
                "because it unscales gradients inside step(). Build it without fused=True"
            )
        return optimizer

    def _check_temperature_attribute(self, pl_module: pl.LightningModule) -> None:
        if "temperature" not in self.schedules:
            return
        current = getattr(pl_module, "temperature", None)
        if isinstance(current, (torch.Tensor, torch.nn.Module)):
            raise ConfigError(
                f"{type(pl_module).__name__}.temperature is a {type(current).__name__}, but CyclicalCallback sets "
                "it to a float before every training batch. Rename the module's attribute"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the values of the new epoch, so the module's own ``on_train_epoch_start`` can read them."""
        batches = trainer.num_training_batches
        if batches != self._batches_per_epoch:
            raise TrainingError(
                f"the training dataloader has {batches} batches in epoch {trainer.current_epoch}, but the schedule "
                f"was planned with {self._batches_per_epoch}. CyclicalCallback needs the same number of batches "
                "in every epoch"
            )
        self._update(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, pl_module)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the clock to Lightning's position, apply the knobs and hand the values to the module."""
        clock = self.clock
        # Lightning's counters are restored on resume and count only the steps actually taken.
        # At a batch start, global_step is the index of the optimizer step that this batch feeds.
        epoch = min(trainer.current_epoch, clock.epochs - 1)
        step = min(trainer.global_step, clock.total_steps - 1)
        clock.load_state_dict({"epoch": epoch, "global_step": step})

        values = {DIFFICULTY_KEY: clock.difficulty}
        values.update(self.knobs.apply(clock))
        self.values = values
        pl_module.cyclical_values = dict(values)
        if "temperature" in values:
            pl_module.temperature = values["temperature"]

    # Clipping and logging --------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Clip the gradients to the scheduled ``clip_norm`` and log every value of this step."""
        if not self.values:
            return
        for name, value in self.values.items():
            pl_module.log(self.log_prefix + name, value, on_step=True, on_epoch=False)

        clip_norm = self.values.get("clip_norm")
        if clip_norm is None:
            return
        parameters = [
            parameter
            for group in optimizer.param_groups
            for parameter in group["params"]
            if parameter.grad is not None
        ]
        # The norm stays on the device, and Lightning reads it back only when it writes the logs.
        # NOTE: tested with automatic optimization on one device only. Under DDP the gradients are
        # already all-reduced here, and manual optimization calls this hook from every opt.step().
        total_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm=clip_norm)
        pl_module.log(self.log_prefix + "grad_norm", total_norm, on_step=True, on_epoch=False)

    # Checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the clock position and the schedule length, or the loaded state before training starts."""
        if self.clock is None:
            return dict(self._loaded_state)
        return {"clock": self.clock.state_dict(), "schedule": self._schedule_description()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state until ``on_train_start`` can check it against the new run."""
        if state_dict and "clock" not in state_dict:
            raise CheckpointError(
                f"CyclicalCallback state in the checkpoint must contain 'clock', got keys {sorted(state_dict)}"
            )
        self._loaded_state = dict(state_dict)

    def _schedule_description(self) -> dict[str, Any]:
        return {
            "epochs": self.clock.epochs,
            "steps_per_epoch": list(self.steps_per_epoch),
            "peak": self.peak,
            "shape": self.shape,
            "cycles": self.cycles,
            "unit": self.unit,
        }

    def _check_resumed_schedule(self, state: dict[str, Any]) -> None:
        saved = state.get("schedule")
        current = self._schedule_description()
        if saved is not None and saved != current:
            raise CheckpointError(
                f"the checkpoint's schedule {saved} differs from this run's schedule {current}, so the knob "
                "values would not continue. Resume with the same max_epochs, batches per epoch, "
                "accumulate_grad_batches and clock options"
            )


def _as_schedule(name: str, value: object) -> Schedule:
    """Return a knob for ``value``, checked against the bounds of a known setting."""
    if name == DIFFICULTY_KEY:
        raise ConfigError(
            f"{DIFFICULTY_KEY!r} is the clock's own value in cyclical_values and cannot be a knob name. "
            "Choose another name"
        )
    if isinstance(value, WarmupCosine):
        return value
    if isinstance(value, Knob):
        # Raises ConfigError if either end breaks the bounds of a known setting such as lr > 0.
        make_knob(name, value.easy, value.hard, value.interpolation)
        return value
    if isinstance(value, Real) and not isinstance(value, bool):
        return make_knob(name, float(value), float(value))
    raise ConfigError(f"{name} must be a Knob, a WarmupCosine or a number, got {value!r}")


def _count_training_batches(trainer: pl.Trainer) -> int:
    batches = trainer.num_training_batches
    if batches == float("inf"):
        raise ConfigError(
            "CyclicalCallback needs a training dataloader with a known length (len()), because the schedule "
            "is planned over the whole run. Got an iterable without a length"
        )
    if batches < 1:
        raise ConfigError(f"CyclicalCallback needs at least one training batch per epoch, got {batches}")
    return int(batches)


def _plan_steps_per_epoch(trainer: pl.Trainer, epochs: int, batches: int) -> list[int]:
    """Return the number of optimizer steps in each epoch, counting the step on an epoch's last batch."""
    scheduler = next(
        (callback for callback in trainer.callbacks if isinstance(callback, GradientAccumulationScheduler)),
        None,
    )
    counts = []
    for epoch in range(epochs):
        if scheduler is not None:
            accumulate = scheduler.get_accumulate_grad_batches(epoch)
        else:
            accumulate = trainer.accumulate_grad_batches
        counts.append(math.ceil(batches / accumulate))
    return counts


def _strategy_classes(*names: str) -> tuple[type, ...]:
    # Older lightning releases lack some of these strategies.
    return tuple(getattr(lightning_strategies, name) for name in names if hasattr(lightning_strategies, name))
