"""Tests for the cyclical focal, focal, cross-entropy and distillation losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclical_training.errors import ConfigError
from cyclical_training.losses import (
    LOSS_NAMES,
    cross_entropy,
    cyclical_focal_loss,
    distillation_loss,
    focal_loss,
)

REFERENCE_CASES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cyclical-focal-loss-cases.json"

# Two samples, three classes: small enough to compute the loss by hand below.
SMALL_LOGITS = [[1.0, -0.5, 0.25], [0.2, 0.8, -1.0]]
SMALL_TARGET = [0, 2]
SMALL_GAMMAS = {"gamma_hc": 2.0, "gamma_pos": 0.5, "gamma_neg": 3.0}


def hand_cyclical_focal_loss(logits, target_probs, difficulty, gamma_hc, gamma_pos, gamma_neg, smoothing):
    """Compute the mean cyclical focal loss with plain Python floats, one term at a time."""
    losses = []
    for row, targets in zip(logits, target_probs):
        max_logit = max(row)
        log_total = math.log(sum(math.exp(z - max_logit) for z in row))
        num_classes = len(row)

        sample_loss = 0.0
        for z, t in zip(row, targets):
            log_p = z - max_logit - log_total
            p = math.exp(log_p)
            focal = (p * (1 - t) + t * (1 - p)) ** (gamma_pos * t + gamma_neg * (1 - t))
            confidence = (1 + p * t) ** (gamma_hc * t)
            weight = difficulty * focal + (1 - difficulty) * confidence
            smoothed = (1 - smoothing) * t + smoothing / num_classes
            sample_loss -= smoothed * weight * log_p
        losses.append(sample_loss)
    return sum(losses) / len(losses)


def one_hot_rows(indices, num_classes):
    return [[1.0 if c == index else 0.0 for c in range(num_classes)] for index in indices]


def load_reference_cases():
    if not REFERENCE_CASES.is_file():
        pytest.skip(f"reference loss values not found at {REFERENCE_CASES}")
    return json.loads(REFERENCE_CASES.read_text())


# Reference values --------------------------------------------------------------------------------


def test_cyclical_focal_reference_values():
    # The expected values are outputs of Cyclical_FocalLoss from the paper's code,
    # github.com/lnsmith54/CFL, computed in float64.
    cases = load_reference_cases()
    assert len(cases) == 5
    for index, case in enumerate(cases):
        loss = cyclical_focal_loss(
            torch.tensor(case["logits"], dtype=torch.float64),
            torch.tensor(case["target"], dtype=torch.int64),
            case["difficulty"],
            gamma_hc=case["gamma_hc"],
            gamma_pos=case["gamma_pos"],
            gamma_neg=case["gamma_neg"],
            label_smoothing=case["label_smoothing"],
        )
        assert loss.dtype == torch.float64
        assert math.isclose(loss.item(), case["loss"], rel_tol=1e-12, abs_tol=0.0), f"case {index}"


# Hand-computed values and special cases ----------------------------------------------------------


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_cyclical_focal_by_hand(difficulty):
    expected = hand_cyclical_focal_loss(
        SMALL_LOGITS, one_hot_rows(SMALL_TARGET, 3), difficulty, smoothing=0.1, **SMALL_GAMMAS
    )
    loss = cyclical_focal_loss(
        torch.tensor(SMALL_LOGITS, dtype=torch.float64),
        torch.tensor(SMALL_TARGET),
        difficulty,
        label_smoothing=0.1,
        **SMALL_GAMMAS,
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


def test_cyclical_focal_tensor_difficulty():
    logits = torch.tensor(SMALL_LOGITS, dtype=torch.float64)
    target = torch.tensor(SMALL_TARGET)
    from_tensor = cyclical_focal_loss(logits, target, torch.tensor(0.25), **SMALL_GAMMAS)
    from_float = cyclical_focal_loss(logits, target, 0.25, **SMALL_GAMMAS)
    torch.testing.assert_close(from_tensor, from_float, rtol=1e-12, atol=0.0)


def test_cyclical_focal_hard_end_is_focal():
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    cyclical = cyclical_focal_loss(logits, target, 1.0, gamma_hc=3.0, gamma_pos=0.5, gamma_neg=2.0)
    focal = focal_loss(logits, target, gamma_pos=0.5, gamma_neg=2.0)
    torch.testing.assert_close(cyclical, focal, rtol=1e-14, atol=0.0)


def test_focal_without_smoothing_is_cross_entropy():
    # With one-hot targets and no smoothing only the true class enters, with exponent gamma_pos = 0.
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    plain = F.cross_entropy(logits, target)
    for gamma_neg in (0.5, 4.0):
        focal = focal_loss(logits, target, gamma_pos=0.0, gamma_neg=gamma_neg, label_smoothing=0.0)
        torch.testing.assert_close(focal, plain, rtol=1e-14, atol=0.0)
    smoothed = focal_loss(logits, target, gamma_pos=0.0, gamma_neg=4.0, label_smoothing=0.1)
    assert not torch.allclose(smoothed, F.cross_entropy(logits, target, label_smoothing=0.1))


@pytest.mark.parametrize(
    ("difficulty", "gammas"),
    [
        (1.0, {"gamma_hc": 2.0, "gamma_pos": 0.0, "gamma_neg": 0.0}),
        (0.0, {"gamma_hc": 0.0, "gamma_pos": 1.0, "gamma_neg": 4.0}),
    ],
    ids=["focal-gammas-zero", "confidence-gamma-zero"],
)
def test_cyclical_focal_unit_weights_is_cross_entropy(difficulty, gammas):
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3, 3, 2])
    loss = cyclical_focal_loss(logits, target, difficulty, label_smoothing=0.2, **gammas)
    expected = F.cross_entropy(logits, target, label_smoothing=0.2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0.0)


# Soft targets ------------------------------------------------------------------------------------


def test_cyclical_focal_one_hot_probabilities():
    logits = torch.tensor(SMALL_LOGITS, dtype=torch.float64)
    indices = torch.tensor(SMALL_TARGET)
    probabilities = F.one_hot(indices, 3).to(torch.float64)
    for difficulty in (0.0, 0.3, 1.0):
        from_indices = cyclical_focal_loss(logits, indices, difficulty, **SMALL_GAMMAS)
        from_probabilities = cyclical_focal_loss(logits, probabilities, difficulty, **SMALL_GAMMAS)
        torch.testing.assert_close(from_probabilities, from_indices, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_cyclical_focal_mixup_target_by_hand(difficulty):
    # Mixup with weight 0.7 of sample 0's one-hot target and 0.3 of sample 1's, and the reverse.
    first, second = one_hot_rows(SMALL_TARGET, 3)
    mixed = [
        [0.7 * a + 0.3 * b for a, b in zip(first, second)],
        [0.3 * a + 0.7 * b for a, b in zip(first, second)],
    ]
    expected = hand_cyclical_focal_loss(SMALL_LOGITS, mixed, difficulty, smoothing=0.1, **SMALL_GAMMAS)
    loss = cyclical_focal_loss(
        torch.tensor(SMALL_LOGITS, dtype=torch.float64),
        torch.tensor(mixed, dtype=torch.float64),
        difficulty,
        label_smoothing=0.1,
        **SMALL_GAMMAS,
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


# Gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("difficulty", [0.0, 0.6, 1.0])
def test_cyclical_focal_gradcheck(difficulty, soft):
    # Finite differences see how the weights w_c change with the logits, so an implementation
    # that detached the weights would fail this check.
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    if soft:
        target = torch.softmax(torch.randn(4, 5, dtype=torch.float64, generator=generator), dim=1)
    else:
        target = torch.tensor([0, 4, 2, 2])

    def per_sample_loss(x):
        return cyclical_focal_loss(
            x, target, difficulty, gamma_hc=2.0, gamma_pos=0.5, gamma_neg=3.0, reduction="none"
        )

    assert torch.autograd.gradcheck(per_sample_loss, (logits,))


# Numerical range ---------------------------------------------------------------------------------

GAMMAS = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 5.0))
LOGIT_VALUES = st.one_of(st.sampled_from([-100.0, 0.0, 100.0]), st.floats(-100.0, 100.0))


@settings(max_examples=80, deadline=None)
@given(
    logit_values=st.lists(LOGIT_VALUES, min_size=12, max_size=12),
    difficulty=st.floats(0.0, 1.0),
    gamma_hc=GAMMAS,
    gamma_pos=GAMMAS,
    gamma_neg=GAMMAS,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_cyclical_focal_finite_property(
    logit_values, difficulty, gamma_hc, gamma_pos, gamma_neg, dtype
):
    logits = torch.tensor(logit_values, dtype=dtype).reshape(3, 4).requires_grad_()
    target = torch.tensor([0, 1, 3])

    loss = cyclical_focal_loss(
        logits, target, difficulty, gamma_hc=gamma_hc, gamma_pos=gamma_pos, gamma_neg=gamma_neg
    )
    loss.backward()

    assert loss.dtype == dtype
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 2.0])
def test_cyclical_focal_saturated_logits_finite(gamma, dtype):
    # Row 0: the target has probability 1, so the target's focal base 1 - p is exactly 0.
    # Row 1: the target has probability 0. Row 2: a soft target on two saturated classes.
    logits = torch.tensor(
        [[100.0, -100.0, -100.0], [-100.0, 100.0, -100.0], [100.0, -100.0, 0.0]], dtype=dtype
    ).requires_grad_()
    indices = torch.tensor([0, 0, 0])
    soft = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=dtype)

    for target in (indices, soft):
        logits.grad = None
        loss = cyclical_focal_loss(
            logits, target, 0.5, gamma_hc=gamma, gamma_pos=gamma, gamma_neg=gamma, reduction="none"
        )
        loss.sum().backward()
        assert torch.isfinite(loss).all()
        assert torch.isfinite(logits.grad).all()


def test_cyclical_focal_zero_power_zero():
    # With gamma_pos = 0 the target weight F_t = (1 - p_t) ** 0 must be 1 even where p_t = 1, so
    # at d = 1 the loss equals the label-smoothed cross entropy.
    logits = torch.tensor([[100.0, -100.0, -100.0]], dtype=torch.float64)
    target = torch.tensor([0])
    loss = cyclical_focal_loss(logits, target, 1.0, gamma_pos=0.0, gamma_neg=0.0, label_smoothing=0.1)
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0.0)


def test_cyclical_focal_underflowed_probability_weight():
    # exp(-200) underflows to 0 in float32, but the weight p ** 0.01 = exp(-2) stays exact
    # because it is computed from log p.
    logits = torch.tensor([[100.0, -100.0]], dtype=torch.float32)
    per_sample = cyclical_focal_loss(
        logits, torch.tensor([0]), 1.0, gamma_neg=0.01, label_smoothing=0.5, reduction="none"
    )
    # The target term is 0 because log p_0 rounds to 0. The other class contributes
    # y_1 * w_1 * 200 with y_1 = 0.5 / 2.
    expected = 0.25 * math.exp(-2.0) * 200.0
    assert math.isclose(per_sample.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computed_in_float32(dtype):
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(4)).to(dtype)
    target = torch.tensor([0, 1, 2, 3, 0])
    float32_logits = logits.float()

    focal = cyclical_focal_loss(logits, target, 0.4)
    assert focal.dtype == dtype
    assert focal == cyclical_focal_loss(float32_logits, target, 0.4).to(dtype)

    ce = cross_entropy(logits, target, temperature=2.0)
    assert ce.dtype == dtype
    assert ce == cross_entropy(float32_logits, target, temperature=2.0).to(dtype)

    distilled = distillation_loss(logits, logits.flip(0), target, alpha=0.5, temperature=3.0)
    assert distilled.dtype == dtype
    expected = distillation_loss(float32_logits, float32_logits.flip(0), target, alpha=0.5, temperature=3.0)
    assert distilled == expected.to(dtype)


# Reductions --------------------------------------------------------------------------------------


def test_reductions_agree():
    logits = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 1, 2, 2, 1, 0])

    for loss_function in (
        lambda reduction: cyclical_focal_loss(logits, target, 0.7, reduction=reduction),
        lambda reduction: focal_loss(logits, target, reduction=reduction),
        lambda reduction: cross_entropy(logits, target, temperature=1.5, reduction=reduction),
    ):
        per_sample = loss_function("none")
        assert per_sample.shape == (6,)
        torch.testing.assert_close(loss_function("sum"), per_sample.sum(), rtol=1e-14, atol=0.0)
        torch.testing.assert_close(loss_function("mean"), per_sample.mean(), rtol=1e-14, atol=0.0)


# Cross entropy and distillation ------------------------------------------------------------------


def test_cross_entropy_divides_logits_by_temperature():
    logits = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 1, 2, 3, 1])
    expected = F.cross_entropy(logits / 2.0, target)

    torch.testing.assert_close(cross_entropy(logits, target, temperature=2.0), expected)
    torch.testing.assert_close(cross_entropy(logits, target, temperature=torch.tensor(2.0)), expected)


def test_cross_entropy_accepts_probabilities():
    logits = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    target = torch.tensor([0, 1, 2, 3, 1])
    probabilities = F.one_hot(target, 4).to(torch.float64)

    from_indices = cross_entropy(logits, target, label_smoothing=0.1)
    from_probabilities = cross_entropy(logits, probabilities, label_smoothing=0.1)
    torch.testing.assert_close(from_probabilities, from_indices, rtol=1e-14, atol=0.0)


def test_distillation_alpha_zero_is_cross_entropy():
    generator = torch.Generator().manual_seed(8)
    student = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    teacher = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    target = torch.tensor([0, 1, 2, 3, 1])

    loss = distillation_loss(student, teacher, target, alpha=0.0, temperature=4.0, label_smoothing=0.1)
    expected = F.cross_entropy(student, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0.0)


def test_distillation_matches_hand_computation():
    student = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    teacher = [[2.0, -1.0, 0.0], [0.0, 1.0, 1.0]]
    target = [0, 2]
    temperature = 2.0
    alpha = 0.25

    def softmax(row):
        exps = [math.exp(z / temperature) for z in row]
        return [e / sum(exps) for e in exps]

    kl_total = 0.0
    for student_row, teacher_row in zip(student, teacher):
        q_student, q_teacher = softmax(student_row), softmax(teacher_row)
        kl_total += sum(qt * math.log(qt / qs) for qt, qs in zip(q_teacher, q_student))
    kl_batchmean = kl_total / 2

    ce_total = 0.0
    for row, label in zip(student, target):
        ce_total -= row[label] - math.log(sum(math.exp(z) for z in row))
    ce_mean = ce_total / 2

    expected = (1 - alpha) * ce_mean + alpha * temperature**2 * kl_batchmean
    loss = distillation_loss(
        torch.tensor(student, dtype=torch.float64),
        torch.tensor(teacher, dtype=torch.float64),
        torch.tensor(target),
        alpha=alpha,
        temperature=temperature,
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


def test_distillation_detaches_teacher():
    student = torch.randn(3, 4, requires_grad=True, generator=torch.Generator().manual_seed(9))
    teacher = torch.randn(3, 4, requires_grad=True, generator=torch.Generator().manual_seed(10))
    distillation_loss(student, teacher, torch.tensor([0, 1, 2]), alpha=0.5, temperature=2.0).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_distillation_gradient_scale_temperature_free():
    # The KL gradient with respect to the student logits shrinks as 1 / T**2 for large T, and the
    # T**2 factor cancels that. Checked: at alpha = 1 the gradient norms at T = 4 and T = 8 differ
    # by less than 20%, while the gradient norm of the unscaled KL differs by a factor near 4.
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(4, 10, dtype=torch.float64, generator=generator)
    teacher = torch.randn(4, 10, dtype=torch.float64, generator=generator)
    target = torch.tensor([0, 1, 2, 3])

    def soft_gradient_norm(temperature):
        logits = student.clone().requires_grad_()
        distillation_loss(logits, teacher, target, alpha=1.0, temperature=temperature).backward()
        return logits.grad.norm().item()

    scaled_ratio = soft_gradient_norm(4.0) / soft_gradient_norm(8.0)
    assert 1 / 1.2 < scaled_ratio < 1.2
    unscaled_ratio = (soft_gradient_norm(4.0) / 16.0) / (soft_gradient_norm(8.0) / 64.0)
    assert 3.0 < unscaled_ratio < 5.0


def test_loss_names():
    assert LOSS_NAMES == ("ce", "focal", "cyclical-focal")


# Validation --------------------------------------------------------------------------------------

LOGITS = torch.zeros(2, 3)
TARGET = torch.tensor([0, 1])

INVALID_CALLS = [
    (lambda: cyclical_focal_loss(LOGITS, TARGET, -0.1), "difficulty"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 1.5), "difficulty"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, float("nan")), "difficulty"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, "0.5"), "difficulty"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, torch.tensor([0.5])), "difficulty"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 0.5, gamma_hc=-1.0), "gamma_hc"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 0.5, gamma_pos=float("inf")), "gamma_pos"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 0.5, gamma_neg=float("nan")), "gamma_neg"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 0.5, gamma_neg=-0.5), "gamma_neg"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 0.5, label_smoothing=1.0), "label_smoothing"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 0.5, label_smoothing=-0.1), "label_smoothing"),
    (lambda: cyclical_focal_loss(LOGITS, TARGET, 0.5, reduction="avg"), "reduction"),
    (lambda: cyclical_focal_loss(torch.zeros(3), TARGET, 0.5), "logits"),
    (lambda: cyclical_focal_loss(torch.zeros(2, 3, dtype=torch.int64), TARGET, 0.5), "logits"),
    (lambda: cyclical_focal_loss([[0.0, 1.0]], TARGET, 0.5), "logits"),
    (lambda: cyclical_focal_loss(LOGITS, torch.tensor([0, 1, 2]), 0.5), "target"),
    (lambda: cyclical_focal_loss(LOGITS, torch.zeros(2, 4), 0.5), "target"),
    (lambda: cyclical_focal_loss(LOGITS, torch.tensor([True, False]), 0.5), "target"),
    (lambda: cyclical_focal_loss(LOGITS, [0, 1], 0.5), "target"),
    (lambda: focal_loss(LOGITS, TARGET, gamma_pos=-1.0), "gamma_pos"),
    (lambda: cross_entropy(LOGITS, TARGET, temperature=0.0), "temperature"),
    (lambda: cross_entropy(LOGITS, TARGET, temperature=-1.0), "temperature"),
    (lambda: cross_entropy(LOGITS, TARGET, temperature=torch.ones(2)), "temperature"),
    (lambda: cross_entropy(LOGITS, TARGET, label_smoothing=1.0), "label_smoothing"),
    (lambda: cross_entropy(LOGITS, TARGET, reduction="batchmean"), "reduction"),
    (lambda: cross_entropy(LOGITS, torch.zeros(2, 2)), "target"),
    (lambda: distillation_loss(LOGITS, LOGITS, TARGET, alpha=1.5, temperature=2.0), "alpha"),
    (lambda: distillation_loss(LOGITS, LOGITS, TARGET, alpha=-0.1, temperature=2.0), "alpha"),
    (lambda: distillation_loss(LOGITS, LOGITS, TARGET, alpha=0.5, temperature=0.0), "temperature"),
    (lambda: distillation_loss(LOGITS, torch.zeros(2, 4), TARGET, 0.5, 2.0), "teacher_logits"),
    (lambda: distillation_loss(torch.zeros(3), LOGITS, TARGET, 0.5, 2.0), "student_logits"),
    (lambda: distillation_loss(LOGITS, LOGITS, TARGET, 0.5, 2.0, label_smoothing=2.0), "label_smoothing"),
]


@pytest.mark.parametrize(
    ("call", "name"),
    INVALID_CALLS,
    ids=[f"{name}-{index}" for index, (_, name) in enumerate(INVALID_CALLS)],
)
def test_invalid_argument_raises_config_error(call, name):
    with pytest.raises(ConfigError, match=rf"^{name} must be "):
        call()


# Device synchronisation --------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_no_cuda_synchronisation():
    # NOTE: written without access to a CUDA device, so this test has not run yet.
    device = torch.device("cuda")
    logits = torch.randn(8, 5, device=device, requires_grad=True)
    teacher = torch.randn(8, 5, device=device)
    target = torch.randint(0, 5, (8,), device=device)
    soft_target = torch.softmax(torch.randn(8, 5, device=device), dim=1)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [
            cyclical_focal_loss(logits, target, torch.tensor(0.3, device=device), gamma_pos=0.5),
            cyclical_focal_loss(logits, soft_target, 0.3),
            focal_loss(logits.bfloat16(), target),
            cross_entropy(logits, target, temperature=2.0, label_smoothing=0.1),
            distillation_loss(logits, teacher, target, alpha=0.5, temperature=4.0),
        ]
        torch.stack([loss.float() for loss in losses]).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
