"""Optimizer construction with one visible rule for which parameters get weight decay.

Weight decay pulls weights toward zero to limit the scale of the function a layer computes.
Biases and normalisation parameters (BatchNorm/LayerNorm/GroupNorm weight and bias) only shift
or rescale activations, and decaying them hurts accuracy, so the default grouping puts every
parameter with fewer than two dimensions into a group built with ``weight_decay=0``. A weight
decay knob later leaves that group at 0.

SGD applies weight decay as L2 regularisation coupled to the gradient (``g + wd * w``, then
momentum and learning rate act on the sum), so its effect scales with the learning rate and the
momentum. AdamW decouples it: the weights shrink by ``lr * wd * w`` each step, outside the
adaptive moment estimates, so the same number means a much weaker pull than under SGD. Typical
values are about 5e-4 for SGD and 5e-2 for AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import check_choice

OPTIMIZER_NAMES = ("sgd", "adamw")


@dataclass(frozen=True)
class GroupCounts:
    """How many tensors and scalars ended up in the decayed and the non-decayed group."""

    decay_tensors: int
    decay_parameters: int
    no_decay_tensors: int
    no_decay_parameters: int

    def describe(self) -> str:
        return (
            f"weight decay on {self.decay_tensors} tensors ({self.decay_parameters:,} parameters), "
            f"none on {self.no_decay_tensors} tensors ({self.no_decay_parameters:,} parameters: "
            "biases and normalisation)"
        )


def split_decay_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], GroupCounts]:
    """Split trainable parameters into a group with ``weight_decay`` and one with 0.

    Parameters of dimension >= 2 (convolution and linear weights) are decayed; biases and
    normalisation parameters (dimension < 2) are not. Frozen parameters
    (``requires_grad=False``) are still included, so the groups stay fixed when layers are
    frozen and unfrozen during training.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    counts = GroupCounts(
        decay_tensors=len(decay),
        decay_parameters=sum(p.numel() for p in decay),
        no_decay_tensors=len(no_decay),
        no_decay_parameters=sum(p.numel() for p in no_decay),
    )
    groups = [
        {"params": decay, "weight_decay": weight_decay, "group_name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"},
    ]
    return [group for group in groups if group["params"]], counts


def build_optimizer(
    name: str,
    param_groups: list[dict],
    lr: float,
    momentum: float,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """Build SGD (Nesterov momentum when ``nesterov`` and momentum > 0) or AdamW over ``param_groups``.

    For AdamW ``momentum`` is beta1; beta2 stays at 0.999.
    """
    check_choice("optimizer", name, OPTIMIZER_NAMES)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    return torch.optim.AdamW(param_groups, lr=lr, betas=(momentum, 0.999))
