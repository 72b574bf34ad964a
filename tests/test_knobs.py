"""Tests for knobs, the warm-up cosine schedule and KnobSet on real torch optimizers."""

from __future__ import annotations

import doctest
import math
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cyclical_training import knobs as knobs_module
from cyclical_training.clock import Clock, difficulty
from cyclical_training.errors import ConfigError
from cyclical_training.knobs import EpochKnob, Knob, KnobSet, WarmupCosine, make_knob

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

EPSILON = sys.float_info.epsilon

unit_values = st.floats(min_value=0.0, max_value=1.0)
linear_ends = st.floats(min_value=-1e6, max_value=1e6)
log_ends = st.floats(min_value=1e-12, max_value=1e6)


def epoch_start(clock: Clock, epoch: int) -> int:
    return sum(clock.steps_in_epoch(index) for index in range(epoch))


def advance(clock: Clock) -> None:
    """Take one step, and start the next epoch when the step crosses into it."""
    clock.step()
    next_epoch = clock.epoch + 1
    if next_epoch < clock.epochs and clock.global_step == epoch_start(clock, next_epoch):
        clock.start_epoch(next_epoch)


def clock_at(epochs: int, epoch: int, **options) -> Clock:
    clock = Clock(epochs=epochs, **options)
    clock.start_epoch(epoch)
    return clock


def schedule_values(schedule: WarmupCosine, clock: Clock) -> list[float]:
    """Return the schedule's value at every step of the run."""
    values = []
    for _ in range(clock.total_steps):
        values.append(schedule.at(clock))
        advance(clock)
    return values


def two_group_sgd(decay: float = 5e-4, **options) -> tuple[torch.nn.Linear, torch.optim.SGD]:
    """Build a small model and SGD with a decay group (weights) and a no-decay group (bias)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    groups = [
        {"params": [model.weight], "weight_decay": decay},
        {"params": [model.bias], "weight_decay": 0.0},
    ]
    return model, torch.optim.SGD(groups, lr=0.1, momentum=0.9, **options)


def group_settings(optimizer: torch.optim.Optimizer) -> list[tuple[float, float, float]]:
    return [(group["lr"], group["momentum"], group["weight_decay"]) for group in optimizer.param_groups]


def train_steps(model, optimizer, knob_set: KnobSet, clock: Clock, steps: int) -> list:
    """Run ``steps`` optimizer steps on fixed data and return the group settings used at each."""
    inputs = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)
    targets = torch.linspace(0.5, -0.5, 8).reshape(4, 2)
    seen = []
    for _ in range(steps):
        knob_set.apply(clock)
        seen.append(group_settings(optimizer))
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        advance(clock)
    return seen


# Knob values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [(0.0, 2.0), (0.25, 4.0), (0.5, 6.0), (1.0, 10.0)],
)
def test_linear_exact_values(level, expected):
    knob = Knob(2.0, 10.0)

    assert knob.value(level) == expected


@pytest.mark.parametrize("level", [0.0, 0.25, 0.5, 1.0])
def test_linear_formula(level):
    knob = Knob(5e-4, 5e-3, name="weight_decay")

    assert knob.value(level) == pytest.approx(5e-4 + level * (5e-3 - 5e-4), rel=1e-15, abs=0)


def test_linear_falling_knob():
    knob = Knob(1.0, 0.5, name="temperature")

    assert knob.value(0.5) == 0.75


@pytest.mark.parametrize(("easy", "hard"), [(1e-4, 1e-2), (5e-4, 5e-3), (0.1, 10.0), (3.0, 0.5)])
def test_log_midpoint_geometric_mean(easy, hard):
    knob = Knob(easy, hard, interpolation="log")

    assert knob.value(0.5) == pytest.approx(math.sqrt(easy * hard), rel=1e-15)


@pytest.mark.parametrize(("easy", "hard"), [(1e-3, 1e-1), (5e-4, 5e-3), (0.5, 2.0)])
def test_log_ends_approximate(easy, hard):
    knob = Knob(easy, hard, interpolation="log")

    assert knob.value(0.0) == pytest.approx(easy, rel=1e-15)
    assert knob.value(1.0) == pytest.approx(hard, rel=1e-15)


def test_log_easy_end_exact():
    knob = Knob(5e-4, 5e-3, interpolation="log")

    assert knob.value(0.0) == 5e-4


def test_linear_hard_end_exact():
    knob = Knob(5e-4, 5e-3, name="weight_decay")

    assert knob.value(1.0) == 5e-3


def test_positive_knob_stays_positive():
    knob = make_knob("temperature", 1.0, 1e-17)

    assert knob.value(1.0) > 0.0


@pytest.mark.parametrize("interpolation", ["linear", "log"])
def test_constant_knob(interpolation):
    knob = Knob(0.3, 0.3, interpolation=interpolation)

    assert knob.is_constant
    for level in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert knob.value(level) == 0.3, level


@PROPERTY_SETTINGS
@given(easy=linear_ends, hard=linear_ends, level=unit_values)
@example(easy=5e-4, hard=5e-3, level=1.0)
@example(easy=1.0, hard=1e-17, level=1.0)
def test_value_between_ends(easy, hard, level):
    value = Knob(easy, hard).value(level)

    assert min(easy, hard) <= value
    assert value <= max(easy, hard)


@PROPERTY_SETTINGS
@given(easy=linear_ends, hard=linear_ends, level=unit_values)
def test_linear_value_near_ends(easy, hard, level):
    # Rounding of easy + d * (hard - easy) is bounded by a few ulps of the larger end.
    tolerance = 4 * EPSILON * max(abs(easy), abs(hard))

    value = Knob(easy, hard).value(level)

    assert min(easy, hard) - tolerance <= value
    assert value <= max(easy, hard) + tolerance


@PROPERTY_SETTINGS
@given(easy=log_ends, hard=log_ends, level=unit_values)
def test_log_value_near_ends(easy, hard, level):
    # The exponent reaches about 28 in magnitude here, so its rounding error of a few ulps
    # becomes a relative error near 1e-14 after exp().
    relative = 1e-13

    value = Knob(easy, hard, interpolation="log").value(level)

    assert min(easy, hard) * (1 - relative) <= value
    assert value <= max(easy, hard) * (1 + relative)


def test_knob_at_reads_clock():
    knob = Knob(1.0, 3.0)
    clock = clock_at(5, 1, peak=0.5)

    assert knob.at(clock) == 2.0


def test_describe():
    assert Knob(0.5, 0.5).describe() == "0.5"
    assert Knob(5e-4, 5e-3).describe() == "0.0005:0.005"


# Knob validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "name", "value"),
    [
        (lambda: Knob(math.nan, 1.0, name="lr"), "lr", "nan"),
        (lambda: Knob(0.1, math.inf, name="lr"), "lr", "inf"),
        (lambda: Knob(0.1, -math.inf, name="lr"), "lr", "-inf"),
        (lambda: Knob("0.1", 0.2, name="lr"), "lr", "'0.1'"),
        (lambda: make_knob("weight_decay", -1, 1), "weight_decay", "-1"),
        (lambda: make_knob("temperature", 0, 1), "temperature", "got 0"),
        (lambda: make_knob("clip_norm", 0.0, 1.0), "clip_norm", "must be > 0, got 0"),
        (lambda: make_knob("clip_norm", 1.0, -2.0), "clip_norm", "must be > 0, got -2"),
        (lambda: make_knob("lr", 0.1, 0.0), "lr", "must be > 0, got 0"),
        (lambda: make_knob("momentum", 0.9, 1.5), "momentum", "1.5"),
        (lambda: make_knob("weight_decay", 0.0, 1e-3, "log"), "weight_decay", "got 0:0.001"),
        (lambda: Knob(-1.0, 1.0, interpolation="log", name="scale"), "scale", "got -1:1"),
        (lambda: make_knob("lr", 0.1, 0.01, "cubic"), "lr", "'cubic'"),
    ],
)
def test_knob_rejects_invalid(build, name, value):
    with pytest.raises(ConfigError) as error:
        build()

    assert name in str(error.value)
    assert value in str(error.value)


def test_bounds_accept_edges():
    assert make_knob("weight_decay", 0.0, 1e-3).value(0.0) == 0.0
    assert make_knob("momentum", 0.0, 1.0).value(1.0) == 1.0


def test_make_knob_epoch_factory():
    knob = make_knob("batch_size", 32, 128, factory=EpochKnob)

    assert isinstance(knob, EpochKnob)
    assert knob.name == "batch_size"


# WarmupCosine ------------------------------------------------------------------------------


def test_warmup_values():
    schedule = WarmupCosine(0.1, warmup_steps=4)

    values = schedule_values(schedule, Clock(epochs=2, steps_per_epoch=10, unit="step"))

    for step in range(4):
        assert values[step] == 0.1 * (step + 1) / 4, step


def test_warmup_first_cosine_step_is_peak():
    schedule = WarmupCosine(0.1, warmup_steps=4)

    values = schedule_values(schedule, Clock(epochs=2, steps_per_epoch=10, unit="step"))

    assert values[4] == 0.1


def test_warmup_peak_with_final_value():
    # final + (peak - final) can differ from peak by one ulp, so this check is approximate.
    schedule = WarmupCosine(0.1, warmup_steps=4, final_value=1e-3)

    values = schedule_values(schedule, Clock(epochs=2, steps_per_epoch=10, unit="step"))

    assert values[4] == pytest.approx(0.1, rel=1e-15)


@pytest.mark.parametrize("final_value", [0.0, 1e-3])
def test_cosine_last_step(final_value):
    schedule = WarmupCosine(0.1, warmup_steps=4, final_value=final_value)
    clock = Clock(epochs=2, steps_per_epoch=10, unit="step")
    expected = final_value + (0.1 - final_value) * 0.5 * (1.0 + math.cos(math.pi * 15 / 16))

    values = schedule_values(schedule, clock)

    assert values[19] == expected
    assert values[19] > final_value


def test_cosine_decreases_after_warmup():
    schedule = WarmupCosine(0.1, warmup_steps=4, final_value=1e-3)

    values = schedule_values(schedule, Clock(epochs=2, steps_per_epoch=10, unit="step"))

    for step in range(4, 19):
        assert values[step + 1] < values[step], step


def test_warmup_rises():
    schedule = WarmupCosine(0.1, warmup_steps=4)

    values = schedule_values(schedule, Clock(epochs=2, steps_per_epoch=10, unit="step"))

    for step in range(3):
        assert values[step] < values[step + 1], step
    assert values[3] == 0.1


def test_no_warmup_starts_at_peak():
    schedule = WarmupCosine(0.1)

    values = schedule_values(schedule, Clock(epochs=1, steps_per_epoch=5, unit="step"))

    assert values[0] == 0.1


def test_warmup_ignores_clock_unit():
    schedule = WarmupCosine(0.1, warmup_steps=2)
    step_values = schedule_values(schedule, Clock(epochs=2, steps_per_epoch=5, unit="step"))

    epoch_values = schedule_values(schedule, Clock(epochs=2, steps_per_epoch=5, unit="epoch"))

    assert epoch_values == step_values


@pytest.mark.parametrize(
    ("options", "name", "value"),
    [
        ({"peak_value": 0.0}, "lr", "must be > 0, got 0"),
        ({"peak_value": -0.1}, "lr", "-0.1"),
        ({"peak_value": math.nan}, "lr", "nan"),
        ({"peak_value": math.inf}, "lr", "inf"),
        ({"peak_value": 0.1, "warmup_steps": -1}, "warmup_steps", "-1"),
        ({"peak_value": 0.1, "warmup_steps": 1.5}, "warmup_steps", "1.5"),
        ({"peak_value": 0.1, "warmup_steps": True}, "warmup_steps", "True"),
        ({"peak_value": 0.1, "final_value": -0.01}, "final_value", "-0.01"),
        ({"peak_value": 0.1, "final_value": 0.2}, "final_value", "0.2"),
        ({"peak_value": 0.1, "final_value": math.nan}, "final_value", "nan"),
    ],
)
def test_warmup_cosine_rejects_invalid(options, name, value):
    with pytest.raises(ConfigError) as error:
        WarmupCosine(**options)

    assert name in str(error.value)
    assert value in str(error.value)


# KnobSet on torch optimizers ---------------------------------------------------------------


def test_weight_decay_two_groups():
    _, optimizer = two_group_sgd()
    knob = make_knob("weight_decay", 5e-4, 5e-3)
    knob_set = KnobSet(optimizer, weight_decay=knob)

    for epoch in range(5):
        clock = clock_at(5, epoch, peak=0.5)

        values = knob_set.apply(clock)

        assert values["weight_decay"] == knob.value(clock.difficulty)
        assert optimizer.param_groups[0]["weight_decay"] == values["weight_decay"]
        assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_weight_decay_three_groups():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    groups = [
        {"params": layers[0].parameters(), "weight_decay": 1e-3},
        {"params": layers[1].parameters(), "weight_decay": 5e-4},
        {"params": layers[2].parameters(), "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    knob_set = KnobSet(optimizer, weight_decay=make_knob("weight_decay", 1e-3, 1e-2))

    for epoch in range(5):
        value = knob_set.apply(clock_at(5, epoch, peak=0.5))["weight_decay"]

        assert optimizer.param_groups[0]["weight_decay"] == value
        assert optimizer.param_groups[1]["weight_decay"] == value / 2
        assert optimizer.param_groups[2]["weight_decay"] == 0.0


def test_lr_groups_scale():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    groups = [{"params": [model.weight], "lr": 0.2}, {"params": [model.bias], "lr": 0.1}]
    optimizer = torch.optim.SGD(groups)
    knob_set = KnobSet(optimizer, lr=make_knob("lr", 0.2, 0.02))

    for epoch in range(4):
        value = knob_set.apply(clock_at(4, epoch, peak=0.5))["lr"]

        assert optimizer.param_groups[0]["lr"] == value
        assert optimizer.param_groups[1]["lr"] == value / 2
        assert optimizer.param_groups[0]["initial_lr"] == 0.2
        assert optimizer.param_groups[1]["initial_lr"] == 0.1


def test_warmup_cosine_writes_lr():
    _, optimizer = two_group_sgd()
    schedule = WarmupCosine(0.1, warmup_steps=3)
    knob_set = KnobSet(optimizer, lr=schedule)
    clock = Clock(epochs=2, steps_per_epoch=5, unit="step")

    for _ in range(clock.total_steps):
        value = knob_set.apply(clock)["lr"]

        assert value == schedule.at(clock)
        assert optimizer.param_groups[0]["lr"] == value
        assert optimizer.param_groups[1]["lr"] == value
        advance(clock)


def test_momentum_sgd():
    _, optimizer = two_group_sgd()
    knob = make_knob("momentum", 0.95, 0.85)
    knob_set = KnobSet(optimizer, momentum=knob)

    for epoch in range(3):
        value = knob_set.apply(clock_at(3, epoch, peak=0.5))["momentum"]

        assert value == knob.value(difficulty(epoch / 2, peak=0.5))
        assert optimizer.param_groups[0]["momentum"] == value
        assert optimizer.param_groups[1]["momentum"] == value


def test_momentum_adamw_betas():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    knob = make_knob("momentum", 0.9, 0.8)
    knob_set = KnobSet(optimizer, momentum=knob)

    for epoch in range(3):
        value = knob_set.apply(clock_at(3, epoch, peak=0.5))["momentum"]
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

        assert optimizer.param_groups[0]["betas"][0] == value
        assert optimizer.param_groups[0]["betas"][1] == 0.999
        assert "momentum" not in optimizer.param_groups[0]
        assert optimizer.param_groups[0]["initial_momentum"] == 0.9


def test_all_zero_weight_decay_rejected():
    _, optimizer = two_group_sgd(decay=0.0)

    with pytest.raises(ConfigError) as error:
        KnobSet(optimizer, weight_decay=make_knob("weight_decay", 5e-4, 5e-3))

    assert "the weight_decay knob" in str(error.value)
    assert "weight_decay 0" in str(error.value)


def test_zero_momentum_rejected():
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.0)

    with pytest.raises(ConfigError) as error:
        KnobSet(optimizer, momentum=make_knob("momentum", 0.9, 0.8))

    assert "the momentum knob" in str(error.value)
    assert "momentum 0" in str(error.value)


def test_optimizer_knob_without_optimizer():
    with pytest.raises(ConfigError) as error:
        KnobSet(lr=make_knob("lr", 0.1, 0.01))

    assert "lr" in str(error.value)
    assert "optimizer=None" in str(error.value)


def test_missing_optimizer_field():
    torch.manual_seed(0)
    optimizer = torch.optim.Adagrad(torch.nn.Linear(2, 2).parameters(), lr=0.1)

    with pytest.raises(ConfigError) as error:
        KnobSet(optimizer, momentum=make_knob("momentum", 0.9, 0.8))

    assert "'momentum'" in str(error.value)


def test_initial_values_in_state_dict():
    _, optimizer = two_group_sgd()
    knob = make_knob("weight_decay", 5e-4, 5e-3)
    knob_set = KnobSet(optimizer, weight_decay=knob)
    knob_set.apply(clock_at(3, 1, peak=0.5))

    groups = optimizer.state_dict()["param_groups"]

    assert groups[0]["initial_weight_decay"] == 5e-4
    assert groups[1]["initial_weight_decay"] == 0.0
    assert groups[0]["weight_decay"] == knob.value(1.0)
    assert groups[1]["weight_decay"] == 0.0


def build_knob_set(optimizer: torch.optim.Optimizer) -> KnobSet:
    return KnobSet(
        optimizer,
        lr=WarmupCosine(0.1, warmup_steps=2),
        momentum=make_knob("momentum", 0.95, 0.85),
        weight_decay=make_knob("weight_decay", 5e-4, 5e-3),
    )


def test_resume_matches_uninterrupted():
    clock_options = {"epochs": 4, "steps_per_epoch": [3, 2, 4, 3], "peak": 0.5, "unit": "step"}
    split = 7

    model, optimizer = two_group_sgd()
    clock = Clock(**clock_options)
    uninterrupted = train_steps(model, optimizer, build_knob_set(optimizer), clock, clock.total_steps)
    final_weights = model.weight.detach().clone()

    first_model, first_optimizer = two_group_sgd()
    first_clock = Clock(**clock_options)
    before = train_steps(first_model, first_optimizer, build_knob_set(first_optimizer), first_clock, split)

    # Build everything again from the constructors, then load the saved states.
    resumed_model, resumed_optimizer = two_group_sgd()
    resumed_model.load_state_dict(first_model.state_dict())
    resumed_optimizer.load_state_dict(first_optimizer.state_dict())
    resumed_clock = Clock(**clock_options)
    resumed_clock.load_state_dict(first_clock.state_dict())
    resumed_knob_set = build_knob_set(resumed_optimizer)
    remaining = resumed_clock.total_steps - split
    after = train_steps(resumed_model, resumed_optimizer, resumed_knob_set, resumed_clock, remaining)

    assert resumed_optimizer.param_groups[0]["initial_weight_decay"] == 5e-4
    assert resumed_optimizer.param_groups[1]["initial_weight_decay"] == 0.0
    assert before + after == uninterrupted
    assert torch.equal(resumed_model.weight, final_weights)


def test_epoch_knob_with_step_unit():
    epoch_knob = make_knob("batch_size", 32, 128, factory=EpochKnob)
    step_knob = make_knob("batch_size", 32, 128)
    clock = Clock(epochs=3, steps_per_epoch=4, peak=0.5, unit="step")
    step_values = []

    for epoch in range(3):
        clock.start_epoch(epoch)
        expected = epoch_knob.value(difficulty(epoch / 2, peak=0.5))
        for _ in range(4):
            assert epoch_knob.at(clock) == expected, (epoch, clock.global_step)
            step_values.append(step_knob.at(clock))
            clock.step()

    assert len(set(step_values)) > 3


def test_other_knobs_in_apply():
    knob_set = KnobSet(
        temperature=make_knob("temperature", 1.0, 0.5),
        clip_norm=make_knob("clip_norm", 1.0, 0.25),
        label_smoothing=None,
    )

    middle = knob_set.apply(clock_at(5, 1, peak=0.5))
    hardest = knob_set.apply(clock_at(5, 2, peak=0.5))

    assert middle == {"temperature": 0.75, "clip_norm": 0.625}
    assert hardest == {"temperature": 0.5, "clip_norm": 0.25}


def test_apply_returns_every_knob():
    _, optimizer = two_group_sgd()
    knob_set = KnobSet(
        optimizer,
        weight_decay=make_knob("weight_decay", 5e-4, 5e-3),
        temperature=make_knob("temperature", 1.0, 0.5),
    )

    values = knob_set.apply(clock_at(3, 0, peak=0.5))

    assert values == {"weight_decay": 5e-4, "temperature": 1.0}
    assert knob_set.describe() == {"weight_decay": "0.0005:0.005", "temperature": "1:0.5"}


# Documentation -----------------------------------------------------------------------------


def test_module_doctests():
    result = doctest.testmod(knobs_module)

    assert result.attempted > 0
    assert result.failed == 0
