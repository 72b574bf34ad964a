"""Models built from ``gct train`` checkpoints: fine-tuning with cyclical unfreezing, and teachers.

``--unfreeze`` is a knob u in [0, 1] read once per epoch: the top ``round(u * B)`` of the B body
blocks train (Python's round, halves to even), the head always trains, and the lower blocks are
frozen. So ``--unfreeze 0:1`` trains only the head at the start and the end and every block at
the hardest point. A frozen block has ``requires_grad=False``, so its gradients stay None and
SGD and AdamW skip its parameters entirely: no weight decay, no momentum, no step. It is also
put in eval mode, so its BatchNorm running statistics stay as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import CheckpointError, ConfigError
from .models import StagedClassifier, build_model

# Entries a checkpoint needs to rebuild its model.
MODEL_KEYS = ("model", "model_name", "num_classes")


def load_model_checkpoint(
    path: str | Path, option: str, in_channels: int, image_size: int
) -> tuple[StagedClassifier, dict]:
    """Build the model that the checkpoint at ``path`` (a file or a run folder) describes, with its weights.

    ``option`` names the command-line option in error messages. Returns the model on the CPU and
    the checkpoint's entries. Raises CheckpointError when the weights do not fit a model of
    ``in_channels`` channels and ``image_size`` pixels.
    """
    state = load_checkpoint(Path(path), required=MODEL_KEYS)
    name, classes = state["model_name"], int(state["num_classes"])
    model = build_model(name, classes, in_channels, image_size)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{option} {path} does not fit model {name} with {classes} classes on {in_channels}x{image_size}x"
            f"{image_size} images: {first_line}"
        ) from None
    return model, state


def pretrained_model(
    path: str | Path, model_option: str, num_classes: int, in_channels: int, image_size: int
) -> tuple[StagedClassifier, str]:
    """Return the ``--finetune`` model and its name, with a new head when the class count differs.

    The new head is drawn from the global torch random state. Raises ConfigError when
    ``model_option`` is neither auto nor the checkpoint's model.
    """
    model, state = load_model_checkpoint(path, "--finetune", in_channels, image_size)
    name = state["model_name"]
    if model_option not in ("auto", name):
        raise ConfigError(f"--model must be auto or {name} (the model of --finetune {path}), got {model_option!r}")
    if model.num_classes != num_classes:
        model.reset_head(num_classes)
    return model, name


def load_teacher(path: str | Path, num_classes: int, in_channels: int, image_size: int) -> StagedClassifier:
    """Return the ``--teacher`` model in eval mode with every parameter frozen.

    Raises ConfigError when its class count differs from the data's.
    """
    model, state = load_model_checkpoint(path, "--teacher", in_channels, image_size)
    if model.num_classes != num_classes:
        raise ConfigError(
            f"--teacher {path} must predict the data's {num_classes} classes, got a model with {model.num_classes}"
        )
    model.eval()
    model.requires_grad_(False)
    return model


def trainable_block_count(unfreeze: float, block_count: int) -> int:
    """Return how many top blocks train at knob value ``unfreeze``: round(unfreeze * block_count)."""
    return round(unfreeze * block_count)


def apply_unfreeze(model: StagedClassifier, unfreeze: float) -> int:
    """Freeze all but the top ``round(unfreeze * B)`` blocks and return that count.

    Call it after ``model.train()``, because it puts the frozen blocks back in eval mode.
    """
    blocks = list(model.blocks)
    trainable = trainable_block_count(unfreeze, len(blocks))
    first_trainable = len(blocks) - trainable
    for index, block in enumerate(blocks):
        frozen = index < first_trainable
        block.requires_grad_(not frozen)
        if frozen:
            block.eval()
    model.head.requires_grad_(True)
    return trainable
