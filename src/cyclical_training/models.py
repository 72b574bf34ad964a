"""Image classifiers built by name, with their body split into stages for layer-wise freezing.

Every model returned by ``build_model`` is a ``StagedClassifier``. Its ``blocks`` list the
body's stages from input to output, stem first. ``pool`` turns the last feature map into a
vector, ``head`` is the final ``nn.Linear``, and ``reset_head`` swaps in a fresh head for a new
number of classes.

========== ======================================= =========================================
name       input                                   parameters (10 classes, 3 input channels)
========== ======================================= =========================================
fast-cnn   C x S x S, S >= 8 (made for 32 x 32)    295,480
fast-cnn-wide  as fast-cnn                         1,978,016
resnet18   C x S x S (CIFAR variant, for 32 x 32)  11,173,962
digits-net C x S x S, S >= 2 (made for 1 x 8 x 8)  151,402 (1 channel, 8 x 8)
resnet50   C x S x S (ImageNet layout, for 224)    23,528,522 (25,557,032 for 1000)
========== ======================================= =========================================

Only digits-net's parameter count depends on ``image_size``, because its first linear layer has
``64 * (image_size // 2) ** 2`` inputs. The other models end in a global pool and accept any
size, except that the fast-cnn models need at least 8 pixels.

fast-cnn (widths 24, 32, 64, 128) is sized for CPUs: one training step on a 2-core CPU takes
about 0.9 ms per 32 x 32 image in channels-last format, against 4.7 ms for fast-cnn-wide
(widths 32, 64, 256, 256, the layout of the fast GPU training scripts for CIFAR-10).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError, check_choice, check_positive_int

MODEL_NAMES = ("fast-cnn", "fast-cnn-wide", "resnet18", "digits-net", "resnet50")

# Logit multiplier of fast-cnn. It keeps the initial logits small, so the first steps see a
# softmax close to uniform.
FAST_CNN_OUTPUT_SCALE = 1.0 / 9.0


class StagedClassifier(nn.Module):
    """Classifier made of body stages, a parameter-free pooling step and a linear head.

    ``forward`` computes ``head(pool(blocks(x))) * output_scale``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        pool: nn.Module,
        head: nn.Linear,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.pool = pool
        self.head = head
        self.output_scale = output_scale

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.pool(x))
        if self.output_scale != 1.0:
            logits = logits * self.output_scale
        return logits

    def reset_head(self, num_classes: int) -> None:
        """Replace ``head`` with a freshly initialised linear layer with ``num_classes`` outputs.

        The new head keeps the old one's input width, bias setting, device and dtype, and
        ``output_scale`` stays as it is. An optimizer built before the call still references the
        old head's parameters, so build a new one.
        """
        check_positive_int("num_classes", num_classes)
        old = self.head
        self.head = nn.Linear(
            old.in_features,
            num_classes,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )


def _init_weights(model: nn.Module) -> None:
    """Apply Kaiming-normal init (fan-out, ReLU gain) to convolutions, and BN weight 1, bias 0.

    Linear layers keep PyTorch's default init.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
) -> list[nn.Module]:
    """Return a bias-free 'same'-padded convolution and the batch norm after it."""
    return [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]


def _global_pool(kind: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(kind(1), nn.Flatten())


# ---------------------------------------------------------------------------------------------
# fast-cnn


def _fast_cnn_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Build conv, 2x2 max pool, BN, GELU, conv, BN, GELU, a block that halves the resolution."""
    first_conv, first_norm = _conv_bn(in_channels, out_channels)
    return nn.Sequential(
        first_conv,
        nn.MaxPool2d(2),
        first_norm,
        nn.GELU(),
        *_conv_bn(out_channels, out_channels),
        nn.GELU(),
    )


def _build_fast_cnn(
    num_classes: int, in_channels: int, image_size: int,
    stem_width: int = 24, widths: Sequence[int] = (32, 64, 128),
) -> StagedClassifier:
    # Three 2x2 max pools need at least 8 pixels to leave a 1 x 1 map.
    if image_size < 8:
        raise ConfigError(f"image_size must be >= 8 for fast-cnn, got {image_size!r}")

    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, stem_width), nn.GELU())]
    previous = stem_width
    for width in widths:
        blocks.append(_fast_cnn_block(previous, width))
        previous = width

    head = nn.Linear(previous, num_classes, bias=False)
    return StagedClassifier(blocks, _global_pool(nn.AdaptiveMaxPool2d), head, FAST_CNN_OUTPUT_SCALE)


# ---------------------------------------------------------------------------------------------
# ResNets


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and an identity or 1x1-projection shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, width, stride=stride),
            nn.ReLU(inplace=True),
            *_conv_bn(width, out_channels),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus a shortcut.

    The stride sits on the 3x3 convolution, as in the widely used "ResNet v1.5" layout.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, width, kernel_size=1),
            nn.ReLU(inplace=True),
            *_conv_bn(width, width, stride=stride),
            nn.ReLU(inplace=True),
            *_conv_bn(width, out_channels, kernel_size=1),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(in_channels, out_channels, kernel_size=1, stride=stride))


def _resnet_stages(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    depths: Sequence[int],
) -> tuple[list[nn.Module], int]:
    """Build one stage per depth, with widths 64, 128, 256, ... and stride 2 after the first.

    Returns the stages and the output channel count of the last one.
    """
    stages: list[nn.Module] = []
    for index, depth in enumerate(depths):
        width = 64 * 2**index
        stride = 1 if index == 0 else 2
        layers = []
        for _ in range(depth):
            layers.append(block(in_channels, width, stride))
            in_channels = width * block.expansion
            stride = 1
        stages.append(nn.Sequential(*layers))
    return stages, in_channels


def _build_resnet18(num_classes: int, in_channels: int, image_size: int) -> StagedClassifier:
    # CIFAR variant: a 3x3 stride-1 stem and no max pool keep 32 x 32 inputs at full size
    # through the first stage.
    stem = nn.Sequential(*_conv_bn(in_channels, 64), nn.ReLU(inplace=True))
    stages, features = _resnet_stages(BasicBlock, 64, (2, 2, 2, 2))
    head = nn.Linear(features, num_classes)
    return StagedClassifier([stem, *stages], _global_pool(nn.AdaptiveAvgPool2d), head)


def _build_resnet50(num_classes: int, in_channels: int, image_size: int) -> StagedClassifier:
    stem = nn.Sequential(
        *_conv_bn(in_channels, 64, kernel_size=7, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    stages, features = _resnet_stages(Bottleneck, 64, (3, 4, 6, 3))
    head = nn.Linear(features, num_classes)
    return StagedClassifier([stem, *stages], _global_pool(nn.AdaptiveAvgPool2d), head)


# ---------------------------------------------------------------------------------------------
# digits-net


def _build_digits_net(num_classes: int, in_channels: int, image_size: int) -> StagedClassifier:
    if image_size < 2:
        raise ConfigError(f"image_size must be >= 2 for digits-net, got {image_size!r}")
    pooled_size = image_size // 2
    hidden_width = 128
    blocks = [
        nn.Sequential(*_conv_bn(in_channels, 32), nn.ReLU(inplace=True)),
        nn.Sequential(*_conv_bn(32, 64), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * pooled_size * pooled_size, hidden_width),
            nn.ReLU(inplace=True),
        ),
    ]
    head = nn.Linear(hidden_width, num_classes)
    return StagedClassifier(blocks, nn.Identity(), head)


# ---------------------------------------------------------------------------------------------
# public API

_BUILDERS: dict[str, Callable[[int, int, int], StagedClassifier]] = {
    "fast-cnn": _build_fast_cnn,
    "fast-cnn-wide": lambda classes, channels, size: _build_fast_cnn(classes, channels, size, 32, (64, 256, 256)),
    "resnet18": _build_resnet18,
    "digits-net": _build_digits_net,
    "resnet50": _build_resnet50,
}


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
) -> StagedClassifier:
    """Build the classifier ``name`` (one of ``MODEL_NAMES``) with freshly initialised weights.

    ``image_size`` is the side of the square input in pixels. Raises ``ConfigError`` for an
    unknown name, a count below 1, or an image too small for the model.
    """
    check_choice("model", name, MODEL_NAMES)
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)

    model = _BUILDERS[name](num_classes, in_channels, image_size)
    _init_weights(model)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Count the model's parameter elements, or only those with ``requires_grad`` set."""
    return sum(
        parameter.numel()
        for parameter in model.parameters()
        if parameter.requires_grad or not trainable_only
    )
