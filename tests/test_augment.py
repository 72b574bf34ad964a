import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclical_training.augment import augment, normalize, random_crop_flip
from cyclical_training.errors import ConfigError


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Return images with spatial structure, so a shift or flip changes the pixels."""
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=_generator(seed))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _reference_crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Crop and flip one image at a time, drawing the random numbers as the library does."""
    count, _, height, width = images.shape
    offsets = torch.randint(2 * padding + 1, (count, 2), generator=generator)
    flips = torch.rand(count, generator=generator) < (0.5 if flip else 0.0)
    padded = F.pad(images, (padding,) * 4, mode="reflect")

    crops = []
    for index in range(count):
        top, left = offsets[index].tolist()
        crop = padded[index, :, top : top + height, left : left + width]
        if flips[index]:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


# ---------------------------------------------------------------------------------------------
# random_crop_flip


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_crop_flip_identity(dtype: torch.dtype) -> None:
    images = (torch.rand(8, 3, 6, 5, generator=_generator()) * 255).to(dtype)
    output = random_crop_flip(images, padding=0, flip=False, generator=_generator(1))

    assert torch.equal(output, images)
    assert output.dtype == dtype
    assert output.data_ptr() != images.data_ptr()


def test_crop_flip_reproducible() -> None:
    images = torch.rand(64, 3, 16, 16, generator=_generator())
    first = random_crop_flip(images, generator=_generator(7))
    second = random_crop_flip(images, generator=_generator(7))
    other_seed = random_crop_flip(images, generator=_generator(8))

    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
@pytest.mark.parametrize(("padding", "flip"), [(4, True), (4, False), (1, True), (5, True)])
def test_crop_flip_matches_loop(dtype: torch.dtype, padding: int, flip: bool) -> None:
    # 6 x 11 images exercise non-square sizes, and padding 5 = height - 1 is the largest allowed.
    images = (torch.rand(40, 2, 6, 11, generator=_generator()) * 255).to(dtype)
    output = random_crop_flip(images, padding=padding, flip=flip, generator=_generator(3))
    expected = _reference_crop_flip(images, padding, flip, _generator(3))

    assert output.dtype == dtype
    assert output.shape == images.shape
    assert torch.equal(output, expected)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 5),
    channels=st.integers(1, 3),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    padding_fraction=st.floats(0, 1, exclude_max=True),
    flip=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_crop_flip_any_shape(
    count: int,
    channels: int,
    height: int,
    width: int,
    padding_fraction: float,
    flip: bool,
    seed: int,
) -> None:
    padding = int(padding_fraction * min(height, width))
    images = torch.rand(count, channels, height, width, generator=_generator(seed))
    output = random_crop_flip(images, padding=padding, flip=flip, generator=_generator(seed))
    expected = _reference_crop_flip(images, padding, flip, _generator(seed))
    assert torch.equal(output, expected)


def test_crop_flip_uses_all_offsets() -> None:
    # The image is a ramp with a distinct value per pixel, so a crop's centre pixel shows its offset.
    size, padding = 16, 2
    ramp = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) + 1000
    images = ramp.repeat(2000, 1, 1, 1)
    output = random_crop_flip(images, padding=padding, flip=False, generator=_generator())

    # Inside the image, pixel (row, col) of a crop at offset (dy, dx) is ramp[row + dy - p, col + dx - p].
    centre = output[:, 0, size // 2, size // 2] - 1000
    dy = torch.div(centre, size, rounding_mode="floor") - size // 2 + padding
    dx = centre.remainder(size) - size // 2 + padding
    offsets = (dy * (2 * padding + 1) + dx).long()

    counts = torch.bincount(offsets, minlength=(2 * padding + 1) ** 2)
    assert counts.numel() == (2 * padding + 1) ** 2
    assert counts.min().item() > 0


def test_crop_flip_flips_about_half() -> None:
    # With padding 0, a crop is either the image or its mirror.
    images = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).repeat(4000, 1, 2, 1)
    output = random_crop_flip(images, padding=0, generator=_generator())

    flipped = (output == images.flip(-1)).flatten(1).all(dim=1)
    unchanged = (output == images).flatten(1).all(dim=1)
    assert torch.all(flipped ^ unchanged)
    # Binomial(4000, 0.5) has std 31.6, so 0.45 to 0.55 is more than 6 standard deviations.
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_crop_flip_no_flip_option() -> None:
    images = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).repeat(500, 1, 2, 1)
    output = random_crop_flip(images, padding=0, flip=False, generator=_generator())
    assert torch.equal(output, images)


def test_crop_flip_leaves_input() -> None:
    images = torch.rand(16, 3, 8, 8, generator=_generator())
    before = images.clone()
    random_crop_flip(images, padding=3, generator=_generator())
    assert torch.equal(images, before)


@pytest.mark.parametrize(
    ("padding", "message"),
    [
        (-1, "padding must be an integer >= 0, got -1"),
        (1.5, "padding must be an integer >= 0, got 1.5"),
        (6, "padding must be < the image height and width (6 x 11), got 6"),
    ],
)
def test_crop_flip_bad_padding(padding: object, message: str) -> None:
    images = torch.zeros(2, 1, 6, 11)
    with pytest.raises(ConfigError) as caught:
        random_crop_flip(images, padding=padding)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_crop_flip_rejects_3d() -> None:
    with pytest.raises(ConfigError) as caught:
        random_crop_flip(torch.zeros(3, 8, 8))
    assert str(caught.value) == "images must be a 4-D N x C x H x W tensor, got (3, 8, 8)"


# ---------------------------------------------------------------------------------------------
# augment


def test_augment_zero_is_identity() -> None:
    images = torch.randn(16, 3, 8, 8, generator=_generator())
    generator = _generator()
    state = generator.get_state()

    output = augment(images, 0.0, generator)

    assert output is images
    assert torch.equal(generator.get_state(), state)


def test_augment_copies_for_positive() -> None:
    images = torch.randn(16, 3, 8, 8, generator=_generator())
    before = images.clone()
    output = augment(images, 0.3, _generator())

    assert output is not images
    assert output.shape == images.shape
    assert output.dtype == images.dtype
    assert torch.equal(images, before)


def test_augment_reproducible() -> None:
    images = _smooth_images(32)
    first = augment(images, 0.7, _generator(5))
    second = augment(images, 0.7, _generator(5))
    assert torch.equal(first, second)


def test_augment_grows_with_magnitude() -> None:
    images = _smooth_images(512)
    differences = []
    for magnitude in (0.25, 0.5, 1.0):
        output = augment(images, magnitude, _generator(11))
        differences.append((output - images).abs().mean().item())

    assert 0 < differences[0] < differences[1] < differences[2]


def test_augment_tiny_magnitude_changes_little() -> None:
    # At m = 0.01 every setting rounds to 0 except the 1% flip chance and a 0.4% jitter.
    images = _smooth_images(256)
    output = augment(images, 0.01, _generator())
    assert (output - images).abs().mean().item() < 0.02


@pytest.mark.parametrize(("magnitude", "side"), [(1.0, 12), (0.5, 6), (0.25, 3)])
def test_cutout_square_side(magnitude: float, side: int) -> None:
    # Values in [1, 2) and no jitter, so every 0 comes from cutout.
    count = 400
    images = torch.rand(count, 3, 32, 32, generator=_generator()) + 1
    output = augment(images, magnitude, _generator(2), max_jitter=0.0)

    zeros = output == 0
    assert torch.equal(zeros, zeros[:, :1].expand_as(zeros))

    masks = zeros[:, 0]
    zero_counts = masks.flatten(1).sum(dim=1)
    with_cutout = zero_counts > 0
    assert torch.all((zero_counts == 0) | (zero_counts == side * side))

    rows_hit = masks.any(dim=2)[with_cutout].float()
    columns_hit = masks.any(dim=1)[with_cutout].float()
    assert torch.all(rows_hit.sum(dim=1) == side)
    assert torch.all(columns_hit.sum(dim=1) == side)

    # Cutout applies with probability m. Binomial(400, 0.25) has std 8.7, so +-0.1 is > 4 std.
    fraction = with_cutout.float().mean().item()
    assert fraction == pytest.approx(magnitude, abs=0.1)


def test_cutout_side_clipped() -> None:
    images = torch.rand(20, 1, 8, 8, generator=_generator()) + 1
    output = augment(images, 1.0, _generator(), max_translate=0, max_cutout=12, max_jitter=0.0)
    assert torch.all(output == 0)


def test_augment_translation_only() -> None:
    # max_cutout 0 and max_jitter 0 leave crop and flip, with padding round(0.5 * 4) = 2.
    images = torch.rand(64, 3, 16, 16, generator=_generator())
    output = augment(images, 0.5, _generator(4), max_cutout=0, max_jitter=0.0)

    generator = _generator(4)
    offsets = torch.randint(5, (64, 2), generator=generator)
    flips = torch.rand(64, generator=generator) < 0.5
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    for index in range(64):
        top, left = offsets[index].tolist()
        expected = padded[index, :, top : top + 16, left : left + 16]
        if flips[index]:
            expected = expected.flip(-1)
        assert torch.equal(output[index], expected), index


def test_augment_flip_probability() -> None:
    # At m = 0.25 and no other operation, crops flip with probability 0.25.
    images = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).repeat(4000, 1, 2, 1)
    output = augment(images, 0.25, _generator(), max_translate=0, max_cutout=0, max_jitter=0.0)

    flipped = (output == images.flip(-1)).flatten(1).all(dim=1)
    assert flipped.float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_jitter_ranges() -> None:
    # Only jitter: each output is c * x + shift with c in [1 - 0.4, 1 + 0.4] at m = 1.
    images = torch.randn(300, 3, 8, 8, generator=_generator())
    output = augment(images, 1.0, _generator(), max_translate=0, max_cutout=0)

    # A flip does not change per-image statistics, so compare those.
    std_in, mean_in = torch.std_mean(images, dim=(1, 2, 3), correction=0)
    std_out, mean_out = torch.std_mean(output, dim=(1, 2, 3), correction=0)
    contrast = std_out / std_in
    brightness = (mean_out - mean_in) / std_in

    assert contrast.min().item() >= 0.6 - 1e-4
    assert contrast.max().item() <= 1.4 + 1e-4
    assert contrast.min().item() < 0.7
    assert contrast.max().item() > 1.3
    assert brightness.abs().max().item() <= 0.4 + 1e-4
    assert brightness.abs().max().item() > 0.3


@pytest.mark.parametrize("magnitude", [-0.1, 1.5, math.nan, math.inf])
def test_augment_bad_magnitude(magnitude: float) -> None:
    with pytest.raises(ConfigError) as caught:
        augment(torch.zeros(2, 3, 8, 8), magnitude)
    assert str(caught.value).startswith("magnitude must be")
    assert repr(magnitude) in str(caught.value)


def test_augment_magnitude_messages() -> None:
    with pytest.raises(ConfigError) as caught:
        augment(torch.zeros(2, 3, 8, 8), 1.5)
    assert str(caught.value) == "magnitude must be in [0, 1], got 1.5"

    with pytest.raises(ConfigError) as caught:
        augment(torch.zeros(2, 3, 8, 8), math.nan)
    assert str(caught.value) == "magnitude must be a finite number, got nan"

    with pytest.raises(ConfigError) as caught:
        augment(torch.zeros(2, 3, 8, 8), "0.5")  # type: ignore[arg-type]
    assert str(caught.value) == "magnitude must be a number, got '0.5'"


def test_augment_bad_maxima() -> None:
    images = torch.zeros(2, 3, 8, 8)
    cases = [
        ({"max_translate": -1}, "max_translate must be an integer >= 0, got -1"),
        ({"max_cutout": 2.0}, "max_cutout must be an integer >= 0, got 2.0"),
        ({"max_jitter": 1.5}, "max_jitter must be in [0, 1], got 1.5"),
    ]
    for arguments, message in cases:
        with pytest.raises(ConfigError) as caught:
            augment(images, 0.5, **arguments)
        assert str(caught.value) == message


def test_augment_rejects_uint8() -> None:
    with pytest.raises(ConfigError) as caught:
        augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0.5)
    assert str(caught.value) == "images must be a floating-point tensor, got torch.uint8"


# ---------------------------------------------------------------------------------------------
# normalize


def test_normalize_matches_formula() -> None:
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=_generator())
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    output = normalize(images, mean, std)

    channel_mean = torch.tensor(mean).view(3, 1, 1)
    channel_std = torch.tensor(std).view(3, 1, 1)
    expected = (images.double() / 255 - channel_mean.double()) / channel_std.double()
    assert output.dtype == torch.float32
    assert torch.allclose(output.double(), expected, rtol=0, atol=1e-5)


def test_normalize_exact_values() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    output = normalize(images, 0.2, 0.4)
    assert output.flatten().tolist() == pytest.approx([-0.5, 0.0, 2.0], abs=1e-6)


def test_normalize_scalar_and_chw() -> None:
    images = torch.full((1, 2, 2), 255, dtype=torch.uint8)
    output = normalize(images, torch.tensor(0.5), torch.tensor([0.25]))
    assert output.shape == (1, 2, 2)
    assert torch.allclose(output, torch.full((1, 2, 2), 2.0))


def test_normalize_bad_arguments() -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    cases = [
        (images.float(), 0.5, 0.5, "images_uint8 must be a torch.uint8 tensor, got torch.float32"),
        (images, (0.5, 0.5), 0.5, "mean must have 1 or 3 values (one per channel), got 2"),
        (images, 0.5, (0.5, 0.0, 0.5), "std must be > 0 and finite, got (0.5, 0.0, 0.5)"),
        (images[0, 0], 0.5, 0.5, "images_uint8 must have channels at dim -3, got shape (4, 4)"),
    ]
    for tensor, mean, std, message in cases:
        with pytest.raises(ConfigError) as caught:
            normalize(tensor, mean, std)
        assert str(caught.value) == message
