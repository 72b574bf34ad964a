"""Tests for the training clock and its difficulty curve."""

from __future__ import annotations

import csv
import doctest
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclical_training import clock as clock_module
from cyclical_training.clock import Clock, difficulty, peak_from_factor, validate_clock_options
from cyclical_training.errors import ConfigError

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

progress_values = st.floats(min_value=0.0, max_value=1.0)
peak_values = st.floats(min_value=0.0, max_value=1.0, exclude_min=True)
shapes = st.sampled_from(["linear", "cosine"])
cycle_counts = st.integers(min_value=1, max_value=5)


def reference_eta(epoch: int, epochs: int, factor: int) -> float:
    """Return eta (1 = easy, 0 = hard) of the published per-epoch schedule for cyclical factor f.

    eta falls as 1 - f e / (E - 1) while f e < E, then rises back as (f e / (E - 1) - 1) / (f - 1).
    """
    if factor * epoch < epochs:
        return 1.0 - factor * epoch / (epochs - 1)
    if factor == 1:
        return 0.0
    return (factor * epoch / (epochs - 1) - 1.0) / (factor - 1)


def load_published_schedule() -> list[dict[str, str]]:
    path = REFERENCE_DIR / "paper-schedule.csv"
    if not path.is_file():
        pytest.skip("published schedule values are not available in this checkout")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def epoch_start(clock: Clock, epoch: int) -> int:
    return sum(clock.steps_in_epoch(index) for index in range(epoch))


def advance(clock: Clock) -> None:
    """Take one step, and start the next epoch when the step crosses into it."""
    clock.step()
    next_epoch = clock.epoch + 1
    if next_epoch < clock.epochs and clock.global_step == epoch_start(clock, next_epoch):
        clock.start_epoch(next_epoch)


def remaining_difficulties(clock: Clock) -> list[float]:
    """Run the clock from its position to the last step and return the difficulty at each step."""
    remaining = clock.total_steps - clock.global_step
    values = []
    for _ in range(remaining):
        values.append(clock.difficulty)
        advance(clock)
    return values


# Agreement with the published schedule -----------------------------------------------------


def test_difficulty_matches_published_schedule():
    rows = load_published_schedule()
    assert len(rows) > 0

    for row in rows:
        epochs, factor, epoch = int(row["epochs"]), int(row["factor"]), int(row["epoch"])
        expected = 1.0 - float(row["eta"])

        actual = difficulty(epoch / (epochs - 1), peak=peak_from_factor(factor))

        assert actual == pytest.approx(expected, abs=1e-12), row


def test_difficulty_matches_reference_formula():
    for factor in range(1, 5):
        for epochs in range(2, 301):
            for epoch in range(epochs):
                expected = 1.0 - reference_eta(epoch, epochs, factor)

                actual = difficulty(epoch / (epochs - 1), peak=1 / factor)

                assert actual == pytest.approx(expected, abs=1e-12), (epochs, factor, epoch)


def test_clock_matches_reference_formula():
    for factor in range(1, 5):
        for epochs in (2, 3, 7, 10, 31):
            clock = Clock(epochs=epochs, steps_per_epoch=2, peak=peak_from_factor(factor))
            for epoch in range(epochs):
                clock.start_epoch(epoch)
                expected = 1.0 - reference_eta(epoch, epochs, factor)

                assert clock.difficulty == pytest.approx(expected, abs=1e-12), (epochs, factor, epoch)


# Exact values ------------------------------------------------------------------------------


def test_linear_peak_half_values():
    values = [difficulty(epoch / 4, peak=0.5) for epoch in range(5)]

    assert values == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_linear_peak_one_ramp():
    values = [difficulty(epoch / 4, peak=1.0) for epoch in range(5)]

    assert values == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (0.0, 0.0),
        # Linear value 1/4, so (1 - cos(pi / 4)) / 2 = (1 - sqrt(2) / 2) / 2.
        (0.125, (1.0 - math.sqrt(2.0) / 2.0) / 2.0),
        # Linear value 1/3, so (1 - cos(pi / 3)) / 2 = 1/4.
        (1.0 / 6.0, 0.25),
        # Linear value 1/2, so (1 - cos(pi / 2)) / 2 = 1/2.
        (0.25, 0.5),
        # Linear value 2/3, so (1 - cos(2 pi / 3)) / 2 = 3/4.
        (1.0 / 3.0, 0.75),
        (0.5, 1.0),
        # Falling side: linear value 1/2 again.
        (0.75, 0.5),
        (1.0, 0.0),
    ],
)
def test_cosine_values(progress, expected):
    actual = difficulty(progress, peak=0.5, shape="cosine")

    assert actual == pytest.approx(expected, abs=1e-15)


def test_two_cycles_over_nine_epochs():
    # Progress e / 8 scaled by 2 cycles puts epochs 0-3 in the first cycle at local progress
    # e / 4, and epochs 4-8 in the second at (e - 4) / 4. Epoch 8 is the end of the second cycle.
    values = [difficulty(epoch / 8, peak=0.5, cycles=2) for epoch in range(9)]

    assert values == [0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0]


def test_two_cycles_clock_values():
    clock = Clock(epochs=9, peak=0.5, cycles=2)
    values = []
    for epoch in range(9):
        clock.start_epoch(epoch)
        values.append(clock.difficulty)

    assert values == [0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0]


def test_difficulty_rejects_progress_outside_range():
    for progress in (-0.1, 1.1, math.nan):
        with pytest.raises(ConfigError) as error:
            difficulty(progress)

        assert "progress" in str(error.value)


@pytest.mark.parametrize(
    "options",
    [
        {"shape": "square"},
        {"peak": 0.0},
        {"peak": 1.5},
        {"cycles": 0},
    ],
)
def test_difficulty_rejects_invalid_options(options):
    with pytest.raises(ConfigError):
        difficulty(0.25, **options)


# Properties --------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(progress=progress_values, peak=peak_values, shape=shapes, cycles=cycle_counts)
def test_difficulty_within_unit_interval(progress, peak, shape, cycles):
    value = difficulty(progress, peak, shape, cycles)

    assert 0.0 <= value
    assert value <= 1.0


@PROPERTY_SETTINGS
@given(peak=peak_values, shape=shapes, cycles=cycle_counts)
def test_difficulty_zero_at_start(peak, shape, cycles):
    assert difficulty(0.0, peak, shape, cycles) == 0.0


@PROPERTY_SETTINGS
@given(peak=peak_values, shape=shapes)
def test_difficulty_one_at_peak(peak, shape):
    assert difficulty(peak, peak, shape) == 1.0


@PROPERTY_SETTINGS
@given(peak=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
       shape=shapes, cycles=cycle_counts)
def test_difficulty_zero_at_end(peak, shape, cycles):
    assert difficulty(1.0, peak, shape, cycles) == 0.0


@PROPERTY_SETTINGS
@given(shape=shapes, cycles=cycle_counts)
def test_ramp_one_at_end(shape, cycles):
    assert difficulty(1.0, 1.0, shape, cycles) == 1.0


@PROPERTY_SETTINGS
@given(first=progress_values, second=progress_values, peak=peak_values)
def test_linear_rises_before_peak(first, second, peak):
    low, high = sorted((first * peak, second * peak))

    assert difficulty(low, peak) <= difficulty(high, peak)


@PROPERTY_SETTINGS
@given(first=progress_values, second=progress_values, peak=peak_values)
def test_linear_falls_after_peak(first, second, peak):
    low, high = sorted((peak + first * (1.0 - peak), peak + second * (1.0 - peak)))
    low, high = min(low, 1.0), min(high, 1.0)

    assert difficulty(low, peak) >= difficulty(high, peak)


@PROPERTY_SETTINGS
@given(peak=peak_values)
def test_cosine_agrees_at_turns(peak):
    for progress in (0.0, peak, 1.0):
        linear = difficulty(progress, peak, "linear")
        cosine = difficulty(progress, peak, "cosine")

        assert cosine == linear, progress


@PROPERTY_SETTINGS
@given(peak=peak_values, cycles=cycle_counts)
def test_cosine_agrees_at_ends(peak, cycles):
    for progress in (0.0, 1.0):
        linear = difficulty(progress, peak, "linear", cycles)
        cosine = difficulty(progress, peak, "cosine", cycles)

        assert cosine == linear, progress


# Clock position ----------------------------------------------------------------------------


def test_epoch_unit_constant_within_epoch():
    clock = Clock(epochs=4, steps_per_epoch=5, peak=0.5, unit="epoch")
    for epoch in range(4):
        clock.start_epoch(epoch)
        expected = difficulty(epoch / 3, peak=0.5)
        for _ in range(5):
            assert clock.difficulty == expected, (epoch, clock.global_step)
            clock.step()


def test_step_unit_progress():
    clock = Clock(epochs=3, steps_per_epoch=4, unit="step")

    for step in range(clock.total_steps):
        assert clock.global_step == step
        assert clock.progress == step / (clock.total_steps - 1)
        advance(clock)


def test_step_unit_difficulty_changes_each_step():
    clock = Clock(epochs=2, steps_per_epoch=3, peak=1.0, unit="step")

    values = remaining_difficulties(clock)

    assert values == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_single_step_run(unit):
    clock = Clock(epochs=1, steps_per_epoch=1, unit=unit)

    clock.step()

    assert clock.total_steps == 1
    assert clock.global_step == 0
    assert clock.progress == 0.0
    assert clock.difficulty == 0.0


def test_single_epoch_progress_zero():
    clock = Clock(epochs=1, steps_per_epoch=3, unit="epoch")

    assert clock.progress == 0.0
    assert clock.epoch_progress == 0.0


def test_steps_per_epoch_list():
    clock = Clock(epochs=3, steps_per_epoch=[3, 2, 4], unit="step")

    clock.start_epoch(2)

    assert clock.total_steps == 9
    assert clock.global_step == 5
    assert clock.epoch == 2
    assert clock.steps_in_epoch(1) == 2


def test_step_stays_at_last_step():
    clock = Clock(epochs=2, steps_per_epoch=3, unit="step")
    clock.start_epoch(1)
    for _ in range(10):
        clock.step()

    assert clock.global_step == clock.total_steps - 1
    assert clock.progress == 1.0


def test_start_epoch_out_of_range():
    clock = Clock(epochs=3)
    for epoch in (-1, 3):
        with pytest.raises(ConfigError) as error:
            clock.start_epoch(epoch)

        assert "epoch" in str(error.value)
        assert repr(epoch) in str(error.value)


def test_epoch_progress_ignores_step_unit():
    clock = Clock(epochs=3, steps_per_epoch=4, peak=0.5, unit="step")
    clock.start_epoch(1)
    clock.step()

    assert clock.epoch_progress == 0.5
    assert clock.epoch_difficulty == 1.0
    assert clock.difficulty == difficulty(5 / 11, peak=0.5)


# Checkpointing -----------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["epoch", "step"])
@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_state_round_trip(unit, shape):
    options = {"epochs": 5, "steps_per_epoch": [3, 2, 4, 5, 1], "peak": 0.4, "shape": shape, "unit": unit}
    original = Clock(**options)
    for _ in range(7):
        advance(original)
    state = original.state_dict()

    resumed = Clock(**options)
    resumed.load_state_dict(state)

    assert resumed.epoch == original.epoch
    assert resumed.global_step == original.global_step
    assert remaining_difficulties(resumed) == remaining_difficulties(original)


def test_state_round_trip_continues_run():
    options = {"epochs": 4, "steps_per_epoch": 3, "peak": 0.5, "unit": "step"}
    uninterrupted = remaining_difficulties(Clock(**options))

    first = Clock(**options)
    before = []
    for _ in range(4):
        before.append(first.difficulty)
        advance(first)
    resumed = Clock(**options)
    resumed.load_state_dict(first.state_dict())

    assert before + remaining_difficulties(resumed) == uninterrupted


@pytest.mark.parametrize(
    "state",
    [
        {"epoch": 3, "global_step": 0},
        {"epoch": -1, "global_step": 0},
        {"epoch": 0, "global_step": 6},
        {"epoch": 0, "global_step": -1},
    ],
)
def test_load_state_out_of_range(state):
    clock = Clock(epochs=3, steps_per_epoch=2)

    with pytest.raises(ConfigError) as error:
        clock.load_state_dict(state)

    assert f"epoch {state['epoch']}" in str(error.value)
    assert f"global_step {state['global_step']}" in str(error.value)


def test_load_state_rejected_keeps_position():
    clock = Clock(epochs=3, steps_per_epoch=2)
    clock.start_epoch(1)

    with pytest.raises(ConfigError):
        clock.load_state_dict({"epoch": 9, "global_step": 0})

    assert clock.epoch == 1
    assert clock.global_step == 2


# Validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name", "value"),
    [
        ({"peak": 0.0}, "peak", "0.0"),
        ({"peak": 1.5}, "peak", "1.5"),
        ({"peak": math.nan}, "peak", "nan"),
        ({"peak": "0.5"}, "peak", "'0.5'"),
        ({"shape": "square"}, "shape", "'square'"),
        ({"cycles": 0}, "cycles", "0"),
        ({"cycles": 1.5}, "cycles", "1.5"),
        ({"cycles": True}, "cycles", "True"),
        ({"epochs": 0}, "epochs", "0"),
        ({"epochs": 2.0}, "epochs", "2.0"),
        # The message reports the length of the list, not the list.
        ({"epochs": 3, "steps_per_epoch": [3, 2]}, "steps_per_epoch", "got 2"),
        ({"epochs": 2, "steps_per_epoch": [3, 0]}, "steps_per_epoch", "got 0"),
        ({"epochs": 2, "steps_per_epoch": 0}, "steps_per_epoch", "got 0"),
        # The message uses the command-line option name, cycle_unit.
        ({"unit": "batch"}, "cycle_unit", "'batch'"),
    ],
)
def test_clock_rejects_invalid_option(options, name, value):
    arguments = {"epochs": 4, **options}

    with pytest.raises(ConfigError) as error:
        Clock(**arguments)

    assert name in str(error.value)
    assert value in str(error.value)


def test_validate_options_accepts_valid():
    validate_clock_options(1.0, "cosine", 5)


@pytest.mark.parametrize(("factor", "value"), [(0.5, "0.5"), (0, "0"), (math.inf, "inf"), (True, "True")])
def test_peak_from_factor_rejects_invalid(factor, value):
    with pytest.raises(ConfigError) as error:
        peak_from_factor(factor)

    # The message uses the command-line option name, cycle_factor.
    assert "cycle_factor" in str(error.value)
    assert value in str(error.value)


def test_peak_from_factor_values():
    assert peak_from_factor(1) == 1.0
    assert peak_from_factor(2) == 0.5
    assert peak_from_factor(4.0) == 0.25


# Documentation -----------------------------------------------------------------------------


def test_module_doctests():
    result = doctest.testmod(clock_module)

    assert result.attempted > 0
    assert result.failed == 0
