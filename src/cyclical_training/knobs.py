"""Knobs: training settings whose value follows the clock.

A ``Knob`` maps the clock's difficulty d in [0, 1] to a value between its easy end (d = 0, the
start and the end of training) and its hard end (d = 1, the hardest point). ``WarmupCosine`` is
the usual learning-rate schedule, a function of the step. A ``KnobSet`` holds named knobs,
computes all their values from one clock, and writes the optimizer's ones into its parameter
groups.

>>> from cyclical_training.clock import Clock
>>> clock = Clock(epochs=5, peak=0.5)
>>> weight_decay = Knob(5e-4, 5e-3, name="weight_decay")
>>> values = []
>>> for epoch in range(5):
...     clock.start_epoch(epoch)
...     values.append(round(weight_decay.value(clock.difficulty), 6))
>>> values
[0.0005, 0.00275, 0.005, 0.00275, 0.0005]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from .clock import Clock
from .errors import ConfigError, check_choice, check_finite, check_positive_int, shown_number

INTERPOLATIONS = ("linear", "log")

# Optimizer hyper-parameters a KnobSet writes into parameter groups.
OPTIMIZER_FIELDS = ("lr", "momentum", "weight_decay")


@dataclass(frozen=True)
class Knob:
    """A setting that moves from ``easy`` (d = 0) to ``hard`` (d = 1) as the clock turns.

    ``linear`` gives ``easy + d * (hard - easy)`` (computed as ``(1 - d) * easy + d * hard``, which
    hits both ends exactly); ``log`` interpolates geometrically, for ranges
    that span orders of magnitude, and needs both ends > 0. Equal ends make a constant.
    ``minimum`` and ``maximum`` bound both ends; ``exclusive_minimum`` makes the lower bound
    strict (a temperature must be > 0, a weight decay may be 0).
    """

    easy: float
    hard: float
    interpolation: str = "linear"
    name: str = "knob"
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def __post_init__(self) -> None:
        check_finite(self.name, self.easy)
        check_finite(self.name, self.hard)
        check_choice(f"{self.name} interpolation", self.interpolation, INTERPOLATIONS)
        for end in (self.easy, self.hard):
            if self.minimum is not None:
                too_small = end <= self.minimum if self.exclusive_minimum else end < self.minimum
                if too_small:
                    relation = ">" if self.exclusive_minimum else ">="
                    raise ConfigError(f"{self.name} must be {relation} {self.minimum:g}, got {shown_number(end)}")
            if self.maximum is not None and end > self.maximum:
                raise ConfigError(f"{self.name} must be <= {self.maximum:g}, got {shown_number(end)}")
        if self.interpolation == "log" and (self.easy <= 0 or self.hard <= 0):
            raise ConfigError(
                f"{self.name} with log interpolation must have both ends > 0, "
                f"got {shown_number(self.easy)}:{shown_number(self.hard)}"
            )

    @property
    def is_constant(self) -> bool:
        return self.easy == self.hard

    @property
    def _low(self) -> float:
        return min(self.easy, self.hard)

    @property
    def _high(self) -> float:
        return max(self.easy, self.hard)

    def value(self, difficulty: float) -> float:
        if self.is_constant or difficulty == 0.0:
            return self.easy
        if difficulty == 1.0:
            return self.hard
        if self.interpolation == "linear":
            # Same value as easy + d * (hard - easy), with less cancellation between far-apart ends.
            value = (1.0 - difficulty) * self.easy + difficulty * self.hard
        else:
            log_easy, log_hard = math.log(self.easy), math.log(self.hard)
            value = math.exp((1.0 - difficulty) * log_easy + difficulty * log_hard)
        # Rounding may still land a hair outside the ends in between; the contract is [easy, hard].
        return min(max(value, self._low), self._high)

    def at(self, clock: Clock) -> float:
        return self.value(clock.difficulty)

    def describe(self) -> str:
        if self.is_constant:
            return f"{self.easy:g}"
        return f"{self.easy:g}:{self.hard:g}"


@dataclass(frozen=True)
class EpochKnob(Knob):
    """A knob read at epoch granularity whatever the clock's unit (batch size, data subset)."""

    def at(self, clock: Clock) -> float:
        return self.value(clock.epoch_difficulty)


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate that rises linearly for ``warmup_steps``, then follows a half cosine.

    At step s < warmup_steps the value is ``peak_value * (s + 1) / warmup_steps``; after that it
    is ``final_value + (peak_value - final_value) * (1 + cos(pi * t)) / 2`` with
    ``t = (s - warmup_steps) / (total_steps - warmup_steps)``, so the last step keeps a small
    positive rate instead of a wasted step at exactly ``final_value``.
    """

    peak_value: float
    warmup_steps: int = 0
    final_value: float = 0.0
    name: str = "lr"

    def __post_init__(self) -> None:
        check_finite(self.name, self.peak_value)
        if self.peak_value <= 0:
            raise ConfigError(f"{self.name} must be > 0, got {self.peak_value!r}")
        check_positive_int("warmup_steps", self.warmup_steps, minimum=0)
        check_finite("final_value", self.final_value)
        if not 0 <= self.final_value <= self.peak_value:
            raise ConfigError(
                f"final_value must be in [0, {self.peak_value:g}], got {self.final_value!r}"
            )

    def at(self, clock: Clock) -> float:
        step = clock.global_step
        if step < self.warmup_steps:
            return self.peak_value * (step + 1) / self.warmup_steps
        span = max(clock.total_steps - self.warmup_steps, 1)
        t = (step - self.warmup_steps) / span
        return self.final_value + (self.peak_value - self.final_value) * 0.5 * (1.0 + math.cos(math.pi * t))

    def describe(self) -> str:
        return f"{self.peak_value:g} (warm-up {self.warmup_steps} steps, then cosine)"


Schedule = Knob | WarmupCosine


class KnobSet:
    """Named knobs on one clock, and the optimizer they write to.

    ``lr``, ``momentum`` and ``weight_decay`` go into every parameter group of ``optimizer``,
    scaled by the value that group was built with relative to the largest built value. So the
    knob's value is what the group with the largest built value receives, a group built with
    half of it receives half, and a group built with 0 (biases and normalisation weights in the
    usual grouping) stays at 0. The built values are stored in each group as ``initial_<field>``,
    which travels with ``optimizer.state_dict()``. For Adam-style optimizers, ``momentum`` is
    the first entry of ``betas``.

    Every other knob (temperature, clip_norm, batch_size, ...) is only computed; the training
    loop reads its value from the dict that ``apply`` returns.
    """

    def __init__(self, optimizer=None, **knobs: Schedule | None) -> None:
        self.knobs: dict[str, Schedule] = {name: knob for name, knob in knobs.items() if knob is not None}
        self.optimizer = optimizer
        self._group_scales: dict[str, list[float]] = {}
        for field in OPTIMIZER_FIELDS:
            if field in self.knobs:
                if optimizer is None:
                    raise ConfigError(f"the {field} knob needs an optimizer, got optimizer=None")
                self._group_scales[field] = self._built_scales(field)

    def _built_scales(self, field: str) -> list[float]:
        built = []
        for group in self.optimizer.param_groups:
            key = f"initial_{field}"
            if key not in group:
                group[key] = _read_group_field(group, field)
            built.append(float(group[key]))
        reference = max(built)
        if reference <= 0:
            raise ConfigError(
                f"the {field} knob has no effect: every parameter group was built with {field} 0; "
                f"build the optimizer with a non-zero {field}"
            )
        return [value / reference for value in built]

    def values(self, clock: Clock) -> dict[str, float]:
        return {name: knob.at(clock) for name, knob in self.knobs.items()}

    def apply(self, clock: Clock) -> dict[str, float]:
        """Compute every knob at the clock's position, write the optimizer's ones, and return all values."""
        values = self.values(clock)
        for field, scales in self._group_scales.items():
            value = values[field]
            for group, scale in zip(self.optimizer.param_groups, scales):
                _write_group_field(group, field, value * scale)
        return values

    def describe(self) -> dict[str, str]:
        return {name: knob.describe() for name, knob in self.knobs.items()}


def _read_group_field(group: dict, field: str) -> float:
    if field == "momentum" and "momentum" not in group and "betas" in group:
        return group["betas"][0]
    if field not in group:
        raise ConfigError(f"the {field} knob needs an optimizer with {field!r}, got groups with {sorted(group)}")
    return group[field]


def _write_group_field(group: dict, field: str, value: float) -> None:
    if field == "momentum" and "momentum" not in group and "betas" in group:
        group["betas"] = (value, group["betas"][1])
    else:
        group[field] = value


# Bounds of each setting that has a command-line option, shared by the CLI and the trainer.
KNOB_BOUNDS: Mapping[str, dict] = {
    "lr": {"minimum": 0.0, "exclusive_minimum": True},
    "momentum": {"minimum": 0.0, "maximum": 1.0},
    "weight_decay": {"minimum": 0.0},
    "temperature": {"minimum": 0.0, "exclusive_minimum": True},
    "clip_norm": {"minimum": 0.0, "exclusive_minimum": True},
}


def make_knob(name: str, easy: float, hard: float, interpolation: str = "linear",
              factory: Callable[..., Knob] = Knob) -> Knob:
    """Build a knob for a known setting with that setting's bounds (see ``KNOB_BOUNDS``)."""
    return factory(easy, hard, interpolation=interpolation, name=name, **KNOB_BOUNDS.get(name, {}))
