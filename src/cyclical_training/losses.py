"""Classification losses whose shape follows the training clock's difficulty.

Every function takes logits of shape (N, K) and a target. The target is either class indices,
an integer tensor of shape (N,), or class probabilities, a floating-point tensor of shape (N, K).
Soft targets such as mixup's are used as given. The functions are vectorised over the batch and
never read a tensor's value on the host, so they add no device synchronisation. For the same
reason an argument passed as a 0-dim tensor is not range-checked, while Python numbers are.

Logits in float16 or bfloat16 are computed in float32, and the loss is returned in the dtype of
the input logits.

The cyclical focal loss is from L. N. Smith, "Cyclical Focal Loss", arXiv:2202.08978 (2022). At
d = 0 it up-weights confident predictions of the target class, and at d = 1 it is an asymmetric
focal loss that down-weights easy examples. The paper's code (github.com/lnsmith54/CFL) replaces
a soft target by its argmax class, but this module applies the formula to the soft target itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError, check_choice, check_finite

LOSS_NAMES = ("ce", "focal", "cyclical-focal")
REDUCTIONS = ("mean", "sum", "none")

Number = float | int
Scalar = Number | torch.Tensor


def cyclical_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    difficulty: Scalar,
    gamma_hc: float = 2.0,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Compute the cyclical focal loss, a blend of two class weightings set by the difficulty d.

    With p = softmax(logits), t the target distribution and y = (1 - s) * t + s / K for
    ``label_smoothing`` s, the loss of sample i is ``-sum_c y_c * w_c * log p_c`` with

    - ``w_c = d * F_c + (1 - d) * H_c``,
    - ``F_c = (p_c * (1 - t_c) + t_c * (1 - p_c)) ** (gamma_pos * t_c + gamma_neg * (1 - t_c))``,
    - ``H_c = (1 + p_c * t_c) ** (gamma_hc * t_c)``.

    Gradients flow through the weights as well as through ``log p``. ``difficulty`` is a number
    in [0, 1] or a 0-dim tensor. Index targets must lie in [0, K). A CPU tensor with an index
    outside that range raises RuntimeError, and on CUDA it triggers a device-side assert.
    ``reduction`` is ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for a loss per sample.

    Raises:
        ConfigError: an argument is out of range or a tensor has the wrong shape or dtype.
    """
    _check_logits("logits", logits)
    _check_target(target, logits)
    difficulty = _check_unit_interval("difficulty", difficulty)
    for name, gamma in (("gamma_hc", gamma_hc), ("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg)):
        _check_non_negative(name, gamma)
    label_smoothing = _check_label_smoothing(label_smoothing)
    check_choice("reduction", reduction, REDUCTIONS)

    compute_dtype = _compute_dtype(logits)
    log_probs = F.log_softmax(logits.to(compute_dtype), dim=1)
    probs = log_probs.exp()
    target_probs = _target_distribution(target, logits, compute_dtype)
    if isinstance(difficulty, torch.Tensor):
        difficulty = difficulty.to(compute_dtype)

    focal = _focal_weight(probs, log_probs, target_probs, gamma_pos, gamma_neg)
    confidence = torch.pow(1.0 + probs * target_probs, gamma_hc * target_probs)
    weight = difficulty * focal + (1.0 - difficulty) * confidence

    num_classes = logits.shape[1]
    smoothed = target_probs * (1.0 - label_smoothing) + label_smoothing / num_classes
    loss = -(smoothed * weight * log_probs).sum(dim=1)
    return _reduce(loss, reduction).to(logits.dtype)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Compute the asymmetric focal loss: ``cyclical_focal_loss`` at difficulty 1."""
    return cyclical_focal_loss(
        logits,
        target,
        1.0,
        gamma_pos=gamma_pos,
        gamma_neg=gamma_neg,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: Scalar = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Compute the cross entropy of ``logits / temperature`` against the target.

    ``temperature`` is a number > 0 or a 0-dim tensor, and ``label_smoothing`` is in [0, 1).
    Label smoothing and the reductions are those of ``torch.nn.functional.cross_entropy``.

    Raises:
        ConfigError: an argument is out of range or a tensor has the wrong shape or dtype.
    """
    _check_logits("logits", logits)
    soft_target = _check_target(target, logits)
    temperature = _check_temperature(temperature)
    label_smoothing = _check_label_smoothing(label_smoothing)
    check_choice("reduction", reduction, REDUCTIONS)

    compute_dtype = _compute_dtype(logits)
    scaled = logits.to(compute_dtype) / temperature
    if soft_target:
        target = target.to(compute_dtype)
    else:
        target = target.long()
    loss = F.cross_entropy(scaled, target, label_smoothing=label_smoothing, reduction=reduction)
    return loss.to(logits.dtype)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: Scalar,
    temperature: Scalar,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Compute the knowledge-distillation loss, averaged over the batch.

    The loss is ``(1 - alpha) * CE(student, target) + alpha * T**2 * KL(q_teacher || q_student)``
    with ``q = softmax(logits / T)``. The cross entropy uses the unscaled student logits and
    ``label_smoothing``. The KL term is summed over classes and divided by the batch size. Its
    gradient shrinks as 1 / T**2 for large T, and the T**2 factor cancels that. The teacher
    logits are detached, so no gradient reaches the teacher. ``alpha`` is a number in [0, 1] and
    ``temperature`` a number > 0, and either may be a 0-dim tensor.

    Raises:
        ConfigError: an argument is out of range or a tensor has the wrong shape or dtype.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ConfigError(
            f"teacher_logits must be of shape {tuple(student_logits.shape)} like student_logits, "
            f"got shape {tuple(teacher_logits.shape)}"
        )
    alpha = _check_unit_interval("alpha", alpha)
    temperature = _check_temperature(temperature)

    compute_dtype = _compute_dtype(student_logits)
    student = student_logits.to(compute_dtype)
    teacher = teacher_logits.detach().to(compute_dtype)

    hard_loss = cross_entropy(student, target, label_smoothing=label_smoothing)
    soft_loss = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    loss = (1.0 - alpha) * hard_loss + alpha * temperature**2 * soft_loss
    return loss.to(student_logits.dtype)


def _focal_weight(
    probs: torch.Tensor,
    log_probs: torch.Tensor,
    target_probs: torch.Tensor,
    gamma_pos: float,
    gamma_neg: float,
) -> torch.Tensor:
    """Compute the focal weight F_c = base ** exponent with a finite value and gradient.

    The power is computed as exp(exponent * log(base)). Where t_c = 0 the base is p_c, and
    log p_c comes exactly from log_softmax, so a p_c that underflows to 0 keeps its true weight.
    Elsewhere the base is clamped to the dtype's smallest normal number before the log. This
    keeps log and gradient finite where the base is 0, which the derivative of x ** g for
    g < 1 would otherwise make infinite, and exp(0 * log(tiny)) gives 0 ** 0 = 1. Finiteness
    is tested for exponents in [0, 5] and logits in [-100, 100].
    """
    base = probs * (1.0 - target_probs) + target_probs * (1.0 - probs)
    exponent = gamma_pos * target_probs + gamma_neg * (1.0 - target_probs)
    tiny = torch.finfo(base.dtype).tiny
    log_base = torch.where(target_probs == 0, log_probs, torch.log(base.clamp(min=tiny)))
    return torch.exp(exponent * log_base)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    if logits.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return logits.dtype


def _check_logits(name: str, logits: object) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"{name} must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ConfigError(
            f"{name} must be a 2-D tensor of shape (batch, classes), got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")


def _check_target(target: object, logits: torch.Tensor) -> bool:
    """Raise ConfigError unless target fits the logits; return whether it contains probabilities."""
    batch_size, num_classes = logits.shape
    allowed = (
        f"class indices of shape ({batch_size},) or class probabilities of shape "
        f"({batch_size}, {num_classes})"
    )
    if not isinstance(target, torch.Tensor):
        raise ConfigError(f"target must be a tensor of {allowed}, got {type(target).__name__}")
    if target.is_floating_point():
        expected_shape = (batch_size, num_classes)
    elif target.dtype == torch.bool or target.is_complex():
        raise ConfigError(f"target must be an integer or floating-point tensor, got dtype {target.dtype}")
    else:
        expected_shape = (batch_size,)
    if tuple(target.shape) != expected_shape:
        raise ConfigError(
            f"target must be {allowed}, got shape {tuple(target.shape)} and dtype {target.dtype}"
        )
    return target.is_floating_point()


def _target_distribution(
    target: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Return the target as class probabilities of shape (N, K), one-hot for class indices."""
    if target.is_floating_point():
        return target.to(dtype)
    one_hot = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
    return one_hot.scatter_(1, target.long().unsqueeze(1), 1.0)


def _check_unit_interval(name: str, value: object) -> Scalar:
    if isinstance(value, torch.Tensor):
        _check_scalar_tensor(name, value)
        return value
    number = check_finite(name, value)
    if not 0.0 <= number <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return number


def _check_temperature(value: object) -> Scalar:
    if isinstance(value, torch.Tensor):
        _check_scalar_tensor("temperature", value)
        return value
    number = check_finite("temperature", value)
    if number <= 0.0:
        raise ConfigError(f"temperature must be > 0, got {value!r}")
    return number


def _check_non_negative(name: str, value: object) -> float:
    number = check_finite(name, value)
    if number < 0.0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
    return number


def _check_label_smoothing(value: object) -> float:
    number = check_finite("label_smoothing", value)
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {value!r}")
    return number


def _check_scalar_tensor(name: str, value: torch.Tensor) -> None:
    # The value itself is not checked, because reading it would synchronise with the device.
    if value.dim() != 0:
        raise ConfigError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
