import pytest
import torch
from torch import nn

from cyclical_training.errors import ConfigError
from cyclical_training.models import (
    FAST_CNN_OUTPUT_SCALE,
    MODEL_NAMES,
    build_model,
    count_parameters,
)

# (name, in_channels, image_size, batch) for one forward pass per model. resnet50 is slow on
# the CPU, so it runs on a small image and batch.
FORWARD_CASES = [
    ("fast-cnn", 3, 32, 4),
    ("fast-cnn", 1, 8, 4),
    ("fast-cnn", 3, 13, 2),
    ("resnet18", 3, 32, 2),
    ("digits-net", 1, 8, 4),
    ("digits-net", 3, 9, 2),
    ("resnet50", 3, 64, 2),
]

# Body stages, stem first, each with the channel count of its output.
STAGE_WIDTHS = {
    "fast-cnn": [24, 32, 64, 128],
    "fast-cnn-wide": [32, 64, 256, 256],
    "resnet18": [64, 64, 128, 256, 512],
    "resnet50": [64, 256, 512, 1024, 2048],
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("name", "in_channels", "image_size", "batch"), FORWARD_CASES)
def test_forward_output_shape(name: str, in_channels: int, image_size: int, batch: int) -> None:
    model = build_model(name, 10, in_channels=in_channels, image_size=image_size)
    images = torch.randn(batch, in_channels, image_size, image_size)

    with torch.no_grad():
        logits = model.eval()(images)

    assert logits.shape == (batch, 10)
    assert torch.isfinite(logits).all()


def test_model_names_all_build() -> None:
    for name in MODEL_NAMES:
        model = build_model(name, 3, in_channels=1, image_size=8)
        assert isinstance(model.head, nn.Linear)
        assert model.head.out_features == 3


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        build_model("vgg16", 10)

    message = str(caught.value)
    assert message == (
        "model must be one of fast-cnn, fast-cnn-wide, resnet18, digits-net, resnet50, got 'vgg16'"
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_classes": 0}, "num_classes must be an integer >= 1, got 0"),
        ({"num_classes": 2.5}, "num_classes must be an integer >= 1, got 2.5"),
        ({"num_classes": 10, "in_channels": 0}, "in_channels must be an integer >= 1, got 0"),
        ({"num_classes": 10, "image_size": 0}, "image_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_sizes_raise(arguments: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_model("resnet18", **arguments)
    assert str(caught.value) == message


def test_fast_cnn_rejects_small_image() -> None:
    with pytest.raises(ConfigError) as caught:
        build_model("fast-cnn", 10, image_size=7)
    assert str(caught.value) == "image_size must be >= 8 for fast-cnn, got 7"


def test_digits_net_rejects_one_pixel() -> None:
    with pytest.raises(ConfigError) as caught:
        build_model("digits-net", 10, in_channels=1, image_size=1)
    assert str(caught.value) == "image_size must be >= 2 for digits-net, got 1"


@pytest.mark.parametrize(
    ("name", "num_classes", "in_channels", "image_size", "expected"),
    [
        # The CIFAR ResNet-18 for 10 classes is commonly quoted at 11.17M parameters.
        ("resnet18", 10, 3, 32, 11_173_962),
        ("resnet18", 100, 3, 32, 11_220_132),
        # With 1000 classes this is the commonly quoted ImageNet ResNet-50 size of 25.56M.
        ("resnet50", 1000, 3, 224, 25_557_032),
        ("resnet50", 10, 3, 224, 23_528_522),
        ("fast-cnn", 10, 3, 32, 295_480),
        ("fast-cnn-wide", 10, 3, 32, 1_978_016),
        ("digits-net", 10, 1, 8, 151_402),
    ],
)
def test_parameter_counts(
    name: str, num_classes: int, in_channels: int, image_size: int, expected: int
) -> None:
    model = build_model(name, num_classes, in_channels=in_channels, image_size=image_size)
    assert count_parameters(model) == expected


def test_digits_net_parameter_breakdown() -> None:
    # conv 1->32 + BN, conv 32->64 + BN, linear 64*4*4 -> 128, head 128 -> 10.
    expected = (9 * 32 + 64) + (9 * 32 * 64 + 128) + (64 * 16 * 128 + 128) + (128 * 10 + 10)
    model = build_model("digits-net", 10, in_channels=1, image_size=8)
    assert count_parameters(model) == expected


def test_count_trainable_only() -> None:
    model = build_model("digits-net", 10, in_channels=1, image_size=8)
    for parameter in model.blocks.parameters():
        parameter.requires_grad_(False)

    assert count_parameters(model, trainable_only=True) == 128 * 10 + 10
    assert count_parameters(model) == 151_402


@pytest.mark.parametrize("name", sorted(STAGE_WIDTHS))
def test_blocks_run_in_order(name: str) -> None:
    image_size = 64 if name == "resnet50" else 32
    model = build_model(name, 10, image_size=image_size).eval()
    features = torch.randn(1, 3, image_size, image_size)

    widths = []
    with torch.no_grad():
        for block in model.blocks:
            features = block(features)
            widths.append(features.shape[1])

    assert widths == STAGE_WIDTHS[name]
    assert model.head.in_features == widths[-1]


def test_blocks_stem_first() -> None:
    fast = build_model("fast-cnn", 10)
    stem_conv = fast.blocks[0][0]
    assert isinstance(stem_conv, nn.Conv2d)
    assert stem_conv.in_channels == 3
    assert stem_conv.kernel_size == (3, 3)

    resnet50 = build_model("resnet50", 10, image_size=224)
    stem_conv = resnet50.blocks[0][0]
    assert stem_conv.kernel_size == (7, 7)
    assert stem_conv.stride == (2, 2)
    assert isinstance(resnet50.blocks[0][-1], nn.MaxPool2d)

    resnet18 = build_model("resnet18", 10)
    stem_conv = resnet18.blocks[0][0]
    assert stem_conv.kernel_size == (3, 3)
    assert stem_conv.stride == (1, 1)
    assert not any(isinstance(module, nn.MaxPool2d) for module in resnet18.modules())


def test_blocks_cover_all_but_head() -> None:
    for name in MODEL_NAMES:
        model = build_model(name, 10, in_channels=1, image_size=8)
        body = sum(parameter.numel() for parameter in model.blocks.parameters())
        head = sum(parameter.numel() for parameter in model.head.parameters())
        assert body + head == count_parameters(model), name


def test_digits_net_blocks() -> None:
    model = build_model("digits-net", 10, in_channels=1, image_size=8)
    assert len(model.blocks) == 3

    features = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        features = model.blocks[0](features)
        assert features.shape == (2, 32, 8, 8)
        features = model.blocks[1](features)
        assert features.shape == (2, 64, 4, 4)
        features = model.blocks[2](features)
        assert features.shape == (2, 128)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reset_head_changes_classes(name: str) -> None:
    model = build_model(name, 10, in_channels=1, image_size=8).eval()
    old_head = model.head
    model.reset_head(4)

    assert model.head is not old_head
    assert model.head.out_features == 4
    assert model.num_classes == 4
    assert model.head.in_features == old_head.in_features
    assert (model.head.bias is None) == (old_head.bias is None)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_reset_head_rejects_zero() -> None:
    model = build_model("digits-net", 10, in_channels=1, image_size=8)
    with pytest.raises(ConfigError) as caught:
        model.reset_head(0)
    assert str(caught.value) == "num_classes must be an integer >= 1, got 0"


def test_fast_cnn_output_scale() -> None:
    model = build_model("fast-cnn", 10).eval()
    assert model.head.bias is None
    assert model.output_scale == FAST_CNN_OUTPUT_SCALE

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.pool(_run_blocks(model, images))
        expected = model.head(features) / 9
        assert torch.allclose(model(images), expected, rtol=1e-6, atol=1e-7)

    model.reset_head(5)
    assert model.output_scale == FAST_CNN_OUTPUT_SCALE
    assert model.head.bias is None


def _run_blocks(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    for block in model.blocks:
        images = block(images)
    return images


def test_init_kaiming_and_batch_norm() -> None:
    model = build_model("resnet18", 10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))

    # Kaiming normal with fan-out and ReLU gain: std = sqrt(2 / (out_channels * 3 * 3)).
    conv = model.blocks[4][0].residual[0]
    expected_std = (2 / (512 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)


def test_fast_cnn_trains_on_batch() -> None:
    model = build_model("fast-cnn", 4, image_size=8)
    images = torch.randn(16, 3, 8, 8)
    labels = torch.arange(16) % 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.5 * losses[0]
