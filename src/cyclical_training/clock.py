"""The training clock: progress through a run, turned into a difficulty between easy and hard.

Progress ``p`` is the position in training scaled to [0, 1]. At epoch granularity it is
``epoch / (epochs - 1)`` and stays constant within an epoch; at step granularity it is
``step / (total_steps - 1)``. A run of one epoch or one step has ``p = 0``.

The difficulty ``d(p)`` is 0 (easy) at the start and the end of training and 1 (hard) at the
fraction ``peak`` of training. With the linear shape and ``peak = 1 / f`` for an integer
cyclical factor ``f``, ``d`` at epoch granularity equals ``1 - eta`` of the schedule in
L. N. Smith, "General Cyclical Training of Neural Networks" (2022), to within float rounding:

>>> [round(difficulty(e / 9, peak=0.5), 4) for e in range(10)]
[0.0, 0.2222, 0.4444, 0.6667, 0.8889, 0.8889, 0.6667, 0.4444, 0.2222, 0.0]

This module needs no torch, so a schedule can be previewed and tested without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError, check_choice, check_finite

SHAPES = ("linear", "cosine")
UNITS = ("epoch", "step")


def validate_clock_options(peak: float, shape: str, cycles: int) -> None:
    """Raise ConfigError unless peak, shape and cycles describe a valid cycle."""
    check_finite("peak", peak)
    if not 0.0 < peak <= 1.0:
        raise ConfigError(f"peak must be in (0, 1], got {peak!r}")
    check_choice("shape", shape, SHAPES)
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
        raise ConfigError(f"cycles must be an integer >= 1, got {cycles!r}")


def peak_from_factor(factor: float) -> float:
    """Convert the paper's cyclical factor f (hardest point near epoch E / f) to ``peak = 1 / f``."""
    check_finite("cycle_factor", factor)
    if factor < 1.0:
        raise ConfigError(f"cycle_factor must be >= 1, got {factor!r}")
    return 1.0 / factor


def difficulty(progress: float, peak: float = 0.5, shape: str = "linear", cycles: int = 1) -> float:
    """Return the difficulty in [0, 1] at ``progress`` in [0, 1].

    The linear shape rises as ``p / peak`` and falls as ``(1 - p) / (1 - peak)``; ``peak = 1``
    gives a one-way ramp from easy to hard. The cosine shape passes the linear value through
    ``(1 - cos(pi * x)) / 2``, which keeps the ends and the peak but flattens both turns.
    With ``cycles = n`` the shape repeats n times over the run.
    """
    if not 0.0 <= progress <= 1.0:
        raise ConfigError(f"progress must be in [0, 1], got {progress!r}")
    validate_clock_options(peak, shape, cycles)

    if cycles > 1:
        scaled = progress * cycles
        index = min(math.floor(scaled), cycles - 1)
        progress = scaled - index

    if progress <= peak:
        linear = progress / peak
    else:
        linear = (1.0 - progress) / (1.0 - peak)
    # Rounding can push the ratio a hair outside [0, 1] near the ends; the contract is [0, 1].
    linear = min(1.0, max(0.0, linear))

    if shape == "linear":
        return linear
    return 0.5 * (1.0 - math.cos(math.pi * linear))


def progress_at(position: int, length: int) -> float:
    """Return ``position / (length - 1)``, or 0 for a run of one epoch or one step."""
    if length <= 1:
        return 0.0
    return position / (length - 1)


@dataclass
class Clock:
    """Position in a run of known length, and the difficulty that goes with it.

    ``steps_per_epoch`` is one count for every epoch, or a list with one count per epoch when
    the batch size changes between epochs. The clock only advances through ``step()`` and
    ``start_epoch()``, so its state is two integers and a resumed run continues exactly.
    """

    epochs: int
    steps_per_epoch: int | Sequence[int] = 1
    peak: float = 0.5
    shape: str = "linear"
    cycles: int = 1
    unit: str = "epoch"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        validate_clock_options(self.peak, self.shape, self.cycles)
        check_choice("cycle_unit", self.unit, UNITS)

        if isinstance(self.steps_per_epoch, int):
            counts = [self.steps_per_epoch] * self.epochs
        else:
            counts = list(self.steps_per_epoch)
        if len(counts) != self.epochs:
            raise ConfigError(
                f"steps_per_epoch must have one count per epoch ({self.epochs}), got {len(counts)}"
            )
        for count in counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"steps_per_epoch must be integers >= 1, got {count!r}")
        self._epoch_steps = counts
        # Global step index of each epoch's first step.
        self._epoch_starts = [0]
        for count in counts[:-1]:
            self._epoch_starts.append(self._epoch_starts[-1] + count)
        self.total_steps = sum(counts)
        self.epoch = 0
        self.global_step = 0
        self._cached_difficulty: tuple[float | None, float] = (None, 0.0)

    # Position ------------------------------------------------------------------------------

    def steps_in_epoch(self, epoch: int) -> int:
        return self._epoch_steps[epoch]

    def start_epoch(self, epoch: int) -> None:
        """Move to the first step of ``epoch``."""
        if not 0 <= epoch < self.epochs:
            raise ConfigError(f"epoch must be in [0, {self.epochs - 1}], got {epoch!r}")
        self.epoch = epoch
        self.global_step = self._epoch_starts[epoch]

    def step(self) -> None:
        """Advance one optimizer step; stays on the last step once the run is over."""
        self.global_step = min(self.global_step + 1, self.total_steps - 1)

    # Values --------------------------------------------------------------------------------

    @property
    def progress(self) -> float:
        if self.unit == "epoch":
            return progress_at(self.epoch, self.epochs)
        return progress_at(self.global_step, self.total_steps)

    @property
    def epoch_progress(self) -> float:
        """Progress at epoch granularity, whatever the unit (batch size can only change per epoch)."""
        return progress_at(self.epoch, self.epochs)

    @property
    def difficulty(self) -> float:
        # Every knob reads this once per step, so the value is kept until the clock moves.
        progress = self.progress
        if self._cached_difficulty[0] != progress:
            self._cached_difficulty = (progress, difficulty(progress, self.peak, self.shape, self.cycles))
        return self._cached_difficulty[1]

    @property
    def epoch_difficulty(self) -> float:
        return difficulty(self.epoch_progress, self.peak, self.shape, self.cycles)

    # Checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        epoch, step = int(state["epoch"]), int(state["global_step"])
        if not 0 <= epoch < self.epochs or not 0 <= step < self.total_steps:
            raise ConfigError(
                f"clock state must lie inside a run of {self.epochs} epochs and {self.total_steps} "
                f"steps, got epoch {epoch} and global_step {step}"
            )
        self.epoch, self.global_step = epoch, step
