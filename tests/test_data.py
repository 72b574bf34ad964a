"""Tests for data loading, the decoded-data cache, class-balanced subsets and BatchLoader.

Image-folder trees, tar archives and CIFAR pickle folders are generated in tmp_path, so nothing
here needs a download. One test reads the real CIFAR-10 JPEG archive from its cache and is
skipped when either is missing.
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from cyclical_training import data
from cyclical_training.data import (
    BatchLoader,
    ImageDataset,
    balanced_subset,
    dataset_cache_path,
    default_cache_dir,
    load_dataset,
    steps_per_epoch,
)
from cyclical_training.errors import ConfigError, DataError

# The shared data folder sits beside the repository checkout, as in CI.
REAL_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"

# Class name -> (train images, test images) of the generated trees, listed out of sorted order.
TREE_CLASSES = {"cat": (3, 2), "ant": (2, 1), "bird": (2, 2)}


# ----------------------------------------------------------------------------------------------
# Generated data


def pixel_array(index: int, width: int = 8, height: int = 8) -> np.ndarray:
    """Return a distinct H x W x 3 uint8 image for each index."""
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode(array: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def make_tree(root: Path, classes: dict[str, tuple[int, int]] = TREE_CLASSES) -> dict:
    """Write train/<class>/NN.png and test/<class>/NN.png, and return split -> class -> arrays."""
    expected: dict[str, dict[str, list[np.ndarray]]] = {"train": {}, "test": {}}
    index = 0
    for class_name, counts in classes.items():
        for split, count in zip(("train", "test"), counts):
            expected[split][class_name] = []
            if count == 0:
                continue
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                array = pixel_array(index)
                index += 1
                (folder / f"{number:02d}.png").write_bytes(encode(array))
                expected[split][class_name].append(array)
    return expected


def make_archive(tree: Path, archive: Path, mode: str, top_folder: str | None = None) -> Path:
    """Pack the contents of ``tree`` at the archive's top level or under ``top_folder``."""
    with tarfile.open(archive, mode) as tar:
        for entry in sorted(tree.iterdir()):
            arcname = f"{top_folder}/{entry.name}" if top_folder else entry.name
            tar.add(entry, arcname=arcname)
    return archive


def add_member(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def archive_with_extra(path: Path, extra: tarfile.TarInfo, content: bytes = b"") -> Path:
    """Write a valid one-class archive plus one extra member."""
    with tarfile.open(path, "w") as tar:
        add_member(tar, "train/a/0.png", encode(pixel_array(0)))
        add_member(tar, "test/a/0.png", encode(pixel_array(1)))
        tar.addfile(extra, io.BytesIO(content) if content else None)
    return path


def expected_tensors(expected: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    arrays, labels = [], []
    for label, class_name in enumerate(sorted(expected[split])):
        arrays.extend(expected[split][class_name])
        labels.extend([label] * len(expected[split][class_name]))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return images, torch.tensor(labels, dtype=torch.int64)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "shapes"
    return root, make_tree(root)


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_and_split_sizes():
    dataset = load_dataset("digits")

    assert dataset.name == "digits"
    assert dataset.classes == [str(digit) for digit in range(10)]
    assert dataset.train_images.shape == (1438, 1, 8, 8)
    assert dataset.test_images.shape == (359, 1, 8, 8)
    assert dataset.train_images.dtype == torch.uint8
    assert dataset.train_labels.dtype == torch.int64
    assert dataset.train_images.is_contiguous()
    assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (10, 1, 8)


def test_digits_split_is_class_balanced():
    dataset = load_dataset("digits")

    class_counts = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    test_counts = torch.bincount(dataset.test_labels, minlength=10).tolist()
    train_counts = torch.bincount(dataset.train_labels, minlength=10).tolist()
    assert test_counts == [round(count * 0.2) for count in class_counts]
    assert [a + b for a, b in zip(train_counts, test_counts)] == class_counts


def test_digits_split_ignores_global_seeds():
    torch.manual_seed(1)
    np.random.seed(1)
    first = load_dataset("digits")
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_dataset("digits")

    assert torch.equal(first.test_images, second.test_images)
    assert torch.equal(first.train_labels, second.train_labels)


def test_digits_pixel_scale():
    from sklearn.datasets import load_digits as sklearn_load_digits

    dataset = load_dataset("digits")
    source = sklearn_load_digits().images
    expected = np.array([round(value * 255 / 16) for value in source.ravel()]).reshape(source.shape)
    everything = torch.cat([dataset.train_images, dataset.test_images])

    assert int(everything.to(torch.int64).sum()) == int(expected.sum())
    assert set(everything.unique().tolist()) <= {round(value * 255 / 16) for value in range(17)}
    assert int(everything.max()) == 255
    # Train and test together contain every converted sklearn image exactly once.
    loaded = sorted(image.tobytes() for image in everything[:, 0].numpy())
    converted = sorted(image.astype(np.uint8).tobytes() for image in expected)
    assert loaded == converted


def test_digits_mean_std_match_numpy():
    dataset = load_dataset("digits")
    pixels = dataset.train_images.numpy().astype(np.float64) / 255.0

    assert dataset.mean == pytest.approx((pixels.mean(),), abs=1e-12)
    assert dataset.std == pytest.approx((pixels.std(),), abs=1e-12)


def test_digits_image_size_resizes():
    dataset = load_dataset("digits", image_size=16)

    assert dataset.train_images.shape == (1438, 1, 16, 16)
    assert dataset.test_images.shape == (359, 1, 16, 16)


def test_image_size_must_be_positive():
    with pytest.raises(ConfigError, match="image_size must be an integer >= 1, got 0"):
        load_dataset("digits", image_size=0)


# ----------------------------------------------------------------------------------------------
# ImageDataset


def test_image_dataset_rejects_float_images():
    images = torch.zeros(2, 3, 4, 4)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(DataError, match="train_images must have dtype torch.uint8"):
        ImageDataset("x", ["a"], images, labels, images.to(torch.uint8), labels)


def test_image_dataset_rejects_label_out_of_range():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 2])
    with pytest.raises(DataError, match=r"test_labels must be in \[0, 1\], got 2"):
        ImageDataset("x", ["a", "b"], images, labels.clamp(max=1), images, labels)


def test_image_dataset_mean_std_per_channel():
    images = torch.zeros(2, 3, 1, 2, dtype=torch.uint8)
    images[:, 1] = 255
    images[0, 2] = torch.tensor([[0, 255]], dtype=torch.uint8)
    images[1, 2] = torch.tensor([[255, 0]], dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)
    dataset = ImageDataset("x", ["a"], images, labels, images, labels)

    assert dataset.mean == (0.0, 1.0, 0.5)
    assert dataset.std == (0.0, 0.0, 0.5)


# ----------------------------------------------------------------------------------------------
# Image-folder trees and archives


def test_tree_loads_exact_pixels_and_sorted_classes(tree, cache_dir):
    root, expected = tree
    dataset = load_dataset(str(root), cache_dir=cache_dir)

    assert dataset.name == "shapes"
    assert dataset.classes == ["ant", "bird", "cat"]
    for split in ("train", "test"):
        images, labels = expected_tensors(expected, split)
        assert torch.equal(getattr(dataset, f"{split}_images"), images)
        assert torch.equal(getattr(dataset, f"{split}_labels"), labels)
    assert dataset.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert dataset.train_images.shape == (7, 3, 8, 8)


@pytest.mark.parametrize(
    "file_name, mode, top_folder",
    [
        ("shapes.tar", "w", None),
        ("shapes.tar.gz", "w:gz", None),
        ("shapes.tgz", "w:gz", "shapes"),
        ("shapes.tar.xz", "w:xz", None),
    ],
)
def test_archive_matches_tree(tree, tmp_path, cache_dir, file_name, mode, top_folder):
    root, _ = tree
    archive = make_archive(root, tmp_path / file_name, mode, top_folder)
    from_tree = load_dataset(str(root), cache_dir=cache_dir)
    from_archive = load_dataset(str(archive), cache_dir=cache_dir)

    assert from_archive.name == "shapes"
    assert from_archive.classes == from_tree.classes
    assert torch.equal(from_archive.train_images, from_tree.train_images)
    assert torch.equal(from_archive.train_labels, from_tree.train_labels)
    assert torch.equal(from_archive.test_images, from_tree.test_images)
    assert torch.equal(from_archive.test_labels, from_tree.test_labels)


def test_tree_inside_single_folder(tmp_path, cache_dir):
    expected = make_tree(tmp_path / "outer" / "inner")
    dataset = load_dataset(str(tmp_path / "outer"), cache_dir=cache_dir)

    images, _ = expected_tensors(expected, "test")
    assert torch.equal(dataset.test_images, images)


def test_hidden_files_are_skipped(tree, tmp_path, cache_dir):
    root, expected = tree
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"not an image")
    (root / "train" / ".DS_Store").write_bytes(b"not an image")
    (root / "test" / "cat" / "._00.png").write_bytes(b"AppleDouble")
    archive = make_archive(root, tmp_path / "hidden.tar", "w")

    for path in (root, archive):
        dataset = load_dataset(str(path), cache_dir=cache_dir)
        assert torch.equal(dataset.train_images, expected_tensors(expected, "train")[0])
        assert len(dataset.test_labels) == 5


def test_jpeg_tree_loads_rgb(tmp_path, cache_dir):
    root = tmp_path / "jpeg"
    for split in ("train", "test"):
        folder = root / split / "gray"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(folder / "0.jpg")
    dataset = load_dataset(str(root), cache_dir=cache_dir)

    assert dataset.train_images.shape == (1, 3, 8, 8)
    assert dataset.train_images.unique().tolist() == [100]


def test_image_size_resizes_and_center_crops(tmp_path, cache_dir):
    root = tmp_path / "tall"
    tall = np.repeat(np.arange(16, dtype=np.uint8)[:, None, None] * 10, 8, axis=1)
    tall = np.repeat(tall, 3, axis=2)  # 16 rows x 8 columns, row r has value 10 * r
    wide = pixel_array(5, width=12, height=6)
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "0.png").write_bytes(encode(tall))
        (root / split / "a" / "1.png").write_bytes(encode(wide))
    dataset = load_dataset(str(root), cache_dir=cache_dir, image_size=8)

    assert dataset.train_images.shape == (2, 3, 8, 8)
    # The shorter side is already 8, so the centre crop keeps rows 4..11 unchanged.
    assert dataset.train_images[0, 0, :, 0].tolist() == [10 * row for row in range(4, 12)]
    assert dataset.image_size == 8


def test_image_size_is_part_of_cache_key(tree, cache_dir):
    root, _ = tree
    full = load_dataset(str(root), cache_dir=cache_dir)
    small = load_dataset(str(root), cache_dir=cache_dir, image_size=4)

    assert full.train_images.shape == (7, 3, 8, 8)
    assert small.train_images.shape == (7, 3, 4, 4)
    assert len(list(Path(cache_dir).glob("*.pt"))) == 2


def test_data_dir_resolves_relative_path(tree, cache_dir):
    root, _ = tree
    dataset = load_dataset(root.name, data_dir=str(root.parent), cache_dir=cache_dir)

    assert dataset.classes == ["ant", "bird", "cat"]


# ----------------------------------------------------------------------------------------------
# Cache


def fail_decode(*args, **kwargs):
    raise AssertionError("image decoded although the cache should have been used")


def test_cache_hit_skips_decoding(tree, tmp_path, cache_dir, monkeypatch):
    root, _ = tree
    archive = make_archive(root, tmp_path / "shapes.tar.gz", "w:gz")
    first = load_dataset(str(archive), cache_dir=cache_dir)
    monkeypatch.setattr(data, "_decode_image", fail_decode)
    second = load_dataset(str(archive), cache_dir=cache_dir)

    assert second.classes == first.classes
    assert second.name == first.name
    assert torch.equal(second.train_images, first.train_images)
    assert torch.equal(second.test_labels, first.test_labels)


def test_cache_leaves_no_temporary_files(tree, cache_dir):
    root, _ = tree
    load_dataset(str(root), cache_dir=cache_dir)

    names = [path.name for path in Path(cache_dir).iterdir()]
    assert len(names) == 1
    assert names[0].endswith(".pt")
    assert not names[0].startswith(".")


def test_cache_misses_after_tree_change(tree, cache_dir):
    root, _ = tree
    load_dataset(str(root), cache_dir=cache_dir)
    (root / "train" / "ant" / "extra.png").write_bytes(encode(pixel_array(99)))
    dataset = load_dataset(str(root), cache_dir=cache_dir)

    assert len(dataset.train_labels) == 8


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_payload"])
def test_corrupted_cache_is_ignored(tree, cache_dir, monkeypatch, damage):
    root, expected = tree
    cache_file = dataset_cache_path(root, cache_dir=cache_dir)
    load_dataset(str(root), cache_dir=cache_dir)
    content = cache_file.read_bytes()
    if damage == "garbage":
        cache_file.write_bytes(b"not a torch file" * 10)
    elif damage == "truncated":
        cache_file.write_bytes(content[: len(content) // 2])
    elif damage == "empty":
        cache_file.write_bytes(b"")
    else:
        torch.save({"format_version": data.CACHE_FORMAT_VERSION}, cache_file)

    dataset = load_dataset(str(root), cache_dir=cache_dir)
    assert torch.equal(dataset.train_images, expected_tensors(expected, "train")[0])
    # The damaged file was replaced, so the next load comes from the cache.
    monkeypatch.setattr(data, "_decode_image", fail_decode)
    assert torch.equal(load_dataset(str(root), cache_dir=cache_dir).test_labels, dataset.test_labels)


def test_unwritable_cache_still_loads(tree, cache_dir, monkeypatch):
    root, _ = tree

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(data.torch, "save", failing_save)
    dataset = load_dataset(str(root), cache_dir=cache_dir)

    assert len(dataset.train_labels) == 7
    assert list(Path(cache_dir).iterdir()) == []


def test_default_cache_dir_reads_xdg(tree, tmp_path, monkeypatch):
    root, _ = tree
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset(str(root))

    assert default_cache_dir() == tmp_path / "xdg" / "cyclical-training"
    assert len(list(default_cache_dir().glob("*.pt"))) == 1
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cyclical-training"


# ----------------------------------------------------------------------------------------------
# Data errors


def test_missing_path_raises(tmp_path, cache_dir):
    missing = tmp_path / "nowhere.tar.gz"
    with pytest.raises(DataError, match=re.escape(f"--data path not found: {missing}")):
        load_dataset(str(missing), cache_dir=cache_dir)


def test_non_tar_file_raises(tmp_path, cache_dir):
    path = tmp_path / "notes.tar.gz"
    path.write_bytes(b"plain text, not a tar archive\n" * 40)
    with pytest.raises(DataError, match=re.escape(f"cannot read {path} as a tar archive")):
        load_dataset(str(path), cache_dir=cache_dir)


def test_image_file_instead_of_archive_raises(tmp_path, cache_dir):
    path = tmp_path / "picture.png"
    path.write_bytes(encode(pixel_array(0)))
    with pytest.raises(DataError, match=re.escape(f"cannot read {path} as a tar archive")):
        load_dataset(str(path), cache_dir=cache_dir)


def test_truncated_gzip_archive_raises(tree, tmp_path, cache_dir):
    root, _ = tree
    archive = make_archive(root, tmp_path / "cut.tar.gz", "w:gz")
    content = archive.read_bytes()
    archive.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=re.escape(f"cannot read {archive} as a tar archive")):
        load_dataset(str(archive), cache_dir=cache_dir)


def test_tar_cut_at_member_boundary_raises(tree, tmp_path, cache_dir):
    root, _ = tree
    archive = make_archive(root, tmp_path / "cut.tar", "w")
    with tarfile.open(archive) as tar:
        last_header = tar.getmembers()[-1].offset
    content = archive.read_bytes()
    # Python's tarfile reads this as a complete archive with one member less.
    archive.write_bytes(content[:last_header])
    with pytest.raises(DataError, match=re.escape(f"tar archive {archive} is truncated")):
        load_dataset(str(archive), cache_dir=cache_dir)


@pytest.mark.parametrize("missing_split", ["train", "test"])
def test_missing_split_in_tree_raises(tmp_path, cache_dir, missing_split):
    root = tmp_path / "one-split"
    make_tree(root)
    for path in sorted((root / missing_split).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / missing_split).rmdir()
    with pytest.raises(DataError, match=re.escape(f"no {missing_split}/ folder in {root}")):
        load_dataset(str(root), cache_dir=cache_dir)


@pytest.mark.parametrize("missing_split", ["train", "test"])
def test_missing_split_in_archive_raises(tmp_path, cache_dir, missing_split):
    present = "test" if missing_split == "train" else "train"
    archive = tmp_path / "one-split.tar"
    with tarfile.open(archive, "w") as tar:
        add_member(tar, f"{present}/a/0.png", encode(pixel_array(0)))
    with pytest.raises(DataError, match=re.escape(f"no {missing_split}/<class>/ folders in {archive}")):
        load_dataset(str(archive), cache_dir=cache_dir)


def test_class_missing_from_test_raises(tmp_path, cache_dir):
    root = tmp_path / "unpaired"
    make_tree(root, {"ant": (1, 1), "bee": (1, 0)})
    with pytest.raises(DataError, match=re.escape(f"missing from {root}/test: bee")):
        load_dataset(str(root), cache_dir=cache_dir)


def test_class_missing_from_archive_train_raises(tmp_path, cache_dir):
    archive = tmp_path / "unpaired.tar"
    with tarfile.open(archive, "w") as tar:
        add_member(tar, "train/ant/0.png", encode(pixel_array(0)))
        add_member(tar, "test/ant/0.png", encode(pixel_array(1)))
        add_member(tar, "test/bee/0.png", encode(pixel_array(2)))
    with pytest.raises(DataError, match=re.escape(f"in {archive}/test are missing from {archive}/train: bee")):
        load_dataset(str(archive), cache_dir=cache_dir)


def test_empty_class_folder_raises(tree, cache_dir):
    root, _ = tree
    empty = root / "test" / "dog"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"class folder {empty} contains no images")):
        load_dataset(str(root), cache_dir=cache_dir)


def test_empty_class_folder_in_archive_raises(tmp_path, cache_dir):
    archive = tmp_path / "empty-class.tar"
    with tarfile.open(archive, "w") as tar:
        add_member(tar, "train/ant/0.png", encode(pixel_array(0)))
        add_member(tar, "test/ant/0.png", encode(pixel_array(1)))
        folder = tarfile.TarInfo("test/bee")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    with pytest.raises(DataError, match=re.escape(f"class folder test/bee in {archive} contains no images")):
        load_dataset(str(archive), cache_dir=cache_dir)


def test_undecodable_image_is_named(tree, tmp_path, cache_dir):
    root, _ = tree
    broken = root / "train" / "bird" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DataError, match=re.escape(f"cannot decode image {broken}")):
        load_dataset(str(root), cache_dir=cache_dir)

    archive = make_archive(root, tmp_path / "broken.tar", "w")
    with pytest.raises(DataError, match=re.escape(f"cannot decode image {archive}:train/bird/broken.png")):
        load_dataset(str(archive), cache_dir=cache_dir)


def test_different_image_sizes_raise(tree, cache_dir):
    root, _ = tree
    odd = root / "test" / "cat" / "wide.png"
    odd.write_bytes(encode(pixel_array(0, width=10, height=8)))
    with pytest.raises(DataError) as raised:
        load_dataset(str(root), cache_dir=cache_dir)

    message = str(raised.value)
    assert "8x8" in message
    assert f"{odd} is 10x8" in message
    assert "--image-size" in message
    assert "\n" not in message
    assert load_dataset(str(root), cache_dir=cache_dir, image_size=8).test_images.shape == (6, 3, 8, 8)


def test_file_outside_class_folder_raises(tree, cache_dir):
    root, _ = tree
    stray = root / "train" / "stray.png"
    stray.write_bytes(encode(pixel_array(0)))
    with pytest.raises(DataError, match=re.escape(f"file {stray} must be inside a class folder")):
        load_dataset(str(root), cache_dir=cache_dir)


# Unsafe archive members


def test_traversal_member_rejected(tmp_path, cache_dir):
    extra = tarfile.TarInfo("../evil.png")
    content = encode(pixel_array(3))
    extra.size = len(content)
    archive = archive_with_extra(tmp_path / "traversal.tar", extra, content)
    with pytest.raises(DataError, match=r"unsafe member \.\./evil\.png"):
        load_dataset(str(archive), cache_dir=cache_dir)
    assert not (tmp_path / "evil.png").exists()


def test_nested_traversal_member_rejected(tmp_path, cache_dir):
    extra = tarfile.TarInfo("train/a/../../../evil.png")
    content = encode(pixel_array(3))
    extra.size = len(content)
    archive = archive_with_extra(tmp_path / "nested.tar", extra, content)
    with pytest.raises(DataError, match=re.escape("unsafe member train/a/../../../evil.png")):
        load_dataset(str(archive), cache_dir=cache_dir)


def test_absolute_member_rejected(tmp_path, cache_dir):
    extra = tarfile.TarInfo("/tmp/evil.png")
    content = encode(pixel_array(3))
    extra.size = len(content)
    archive = archive_with_extra(tmp_path / "absolute.tar", extra, content)
    with pytest.raises(DataError, match="unsafe member /tmp/evil.png"):
        load_dataset(str(archive), cache_dir=cache_dir)


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_link_member_rejected(tmp_path, cache_dir, link_type):
    extra = tarfile.TarInfo("train/a/link.png")
    extra.type = link_type
    extra.linkname = "/etc/passwd"
    archive = archive_with_extra(tmp_path / "link.tar", extra)
    with pytest.raises(DataError, match="link member train/a/link.png"):
        load_dataset(str(archive), cache_dir=cache_dir)


def test_device_member_rejected(tmp_path, cache_dir):
    extra = tarfile.TarInfo("train/a/device")
    extra.type = tarfile.CHRTYPE
    archive = archive_with_extra(tmp_path / "device.tar", extra)
    with pytest.raises(DataError, match="member train/a/device in .* must be a regular file"):
        load_dataset(str(archive), cache_dir=cache_dir)


# ----------------------------------------------------------------------------------------------
# CIFAR pickle folders


def write_pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(content, file)


def make_cifar10(root: Path, rows_per_batch: int = 4, test_rows: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    names = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_rows if name == "test_batch" else rows_per_batch
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, size=count).tolist(),
            b"filenames": [f"{index}.png".encode() for index in range(count)],
        }
        write_pickle(folder / name, batch)
        batches[name] = batch
    label_names = [name.encode() for name in ("airplane", "automobile", "bird", "cat", "deer")]
    label_names += [name.encode() for name in ("dog", "frog", "horse", "ship", "truck")]
    write_pickle(folder / "batches.meta", {b"label_names": label_names, b"num_vis": 3072})
    return batches


def make_cifar100(root: Path) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name, count in (("train", 6), ("test", 4)):
        batch = {
            b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, size=count).tolist(),
            b"coarse_labels": rng.integers(0, 20, size=count).tolist(),
        }
        write_pickle(folder / name, batch)
        batches[name] = batch
    fine_names = [f"fine{index:02d}".encode() for index in range(100)]
    coarse_names = [f"coarse{index:02d}".encode() for index in range(20)]
    write_pickle(folder / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    return batches


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_loads_batches(tmp_path, nested):
    batches = make_cifar10(tmp_path)
    data_dir = tmp_path if nested else tmp_path / "cifar-10-batches-py"
    dataset = load_dataset("cifar10", data_dir=str(data_dir))

    assert dataset.name == "cifar10"
    assert dataset.classes[:3] == ["airplane", "automobile", "bird"]
    assert dataset.num_classes == 10
    assert dataset.train_images.shape == (20, 3, 32, 32)
    assert dataset.test_images.shape == (3, 3, 32, 32)
    train_rows = np.concatenate([batches[f"data_batch_{index}"][b"data"] for index in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{index}"][b"labels"] for index in range(1, 6)), [])
    assert dataset.train_labels.tolist() == train_labels
    assert dataset.test_labels.tolist() == batches["test_batch"][b"labels"]
    # A row is the red plane, then green, then blue, each 32 rows of 32 pixels.
    row = train_rows[5]
    image = dataset.train_images[5]
    assert int(image[0, 0, 0]) == row[0]
    assert int(image[0, 0, 1]) == row[1]
    assert int(image[0, 1, 0]) == row[32]
    assert int(image[1, 0, 0]) == row[1024]
    assert int(image[2, 31, 31]) == row[3071]
    assert torch.equal(dataset.train_images.reshape(20, 3072), torch.from_numpy(train_rows))


def test_cifar100_uses_fine_labels(tmp_path):
    batches = make_cifar100(tmp_path)
    dataset = load_dataset("cifar100", data_dir=str(tmp_path))

    assert dataset.name == "cifar100"
    assert dataset.num_classes == 100
    assert dataset.classes[7] == "fine07"
    assert dataset.train_labels.tolist() == batches["train"][b"fine_labels"]
    assert dataset.test_labels.tolist() == batches["test"][b"fine_labels"]
    assert torch.equal(dataset.test_images.reshape(4, 3072), torch.from_numpy(batches["test"][b"data"]))


def test_cifar_image_size_resizes(tmp_path):
    make_cifar10(tmp_path)
    dataset = load_dataset("cifar10", data_dir=str(tmp_path), image_size=16)

    assert dataset.train_images.shape == (20, 3, 16, 16)


def test_cifar_missing_batch_raises(tmp_path):
    make_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(f"CIFAR file not found: {missing}")):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_missing_labels_key_raises(tmp_path):
    make_cifar100(tmp_path)
    test_file = tmp_path / "cifar-100-python" / "test"
    write_pickle(test_file, {b"data": np.zeros((1, 3072), dtype=np.uint8)})
    with pytest.raises(DataError, match=re.escape(f"CIFAR file {test_file} has no 'fine_labels' entry")):
        load_dataset("cifar100", data_dir=str(tmp_path))


def test_cifar_damaged_file_raises(tmp_path):
    make_cifar10(tmp_path)
    damaged = tmp_path / "cifar-10-batches-py" / "test_batch"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(DataError, match=re.escape(f"cannot read CIFAR file {damaged}")):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_without_data_dir_raises():
    with pytest.raises(ConfigError, match="--data-dir is required for data 'cifar100'"):
        load_dataset("cifar100")


def test_cifar_missing_data_dir_raises(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"data_dir must be an existing folder, got {tmp_path / 'no'}")):
        load_dataset("cifar10", data_dir=str(tmp_path / "no"))


# ----------------------------------------------------------------------------------------------
# balanced_subset


def labels_with_counts(counts: list[int]) -> torch.Tensor:
    labels = torch.cat([torch.full((count,), label) for label, count in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))]


def test_balanced_subset_even_share():
    labels = labels_with_counts([10, 7, 5])
    subset = balanced_subset(labels, 9, seed=0)

    assert subset.dtype == torch.int64
    assert torch.equal(subset, subset.sort().values)
    assert len(subset.unique()) == 9
    assert torch.bincount(labels[subset]).tolist() == [3, 3, 3]


def test_balanced_subset_remainder_goes_one_per_class():
    labels = labels_with_counts([10, 7, 5, 6])
    for seed in range(5):
        counts = torch.bincount(labels[balanced_subset(labels, 11, seed=seed)], minlength=4)
        assert sorted(counts.tolist()) == [2, 3, 3, 3]


def test_balanced_subset_is_deterministic():
    labels = labels_with_counts([40, 40, 40])

    assert torch.equal(balanced_subset(labels, 30, seed=3), balanced_subset(labels, 30, seed=3))
    assert not torch.equal(balanced_subset(labels, 30, seed=3), balanced_subset(labels, 30, seed=4))


def test_balanced_subset_whole_set():
    labels = labels_with_counts([2, 2])

    assert balanced_subset(labels, 4, seed=0).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("size", [0, -1, 23])
def test_balanced_subset_size_out_of_range(size):
    labels = labels_with_counts([10, 7, 5])
    with pytest.raises(ConfigError, match=re.escape(f"train_size must be between 1 and 22, got {size}")):
        balanced_subset(labels, size, seed=0)


def test_balanced_subset_small_class_raises():
    labels = labels_with_counts([10, 1])
    with pytest.raises(ConfigError, match="train_size 6 needs 3 samples of class 1, but the class has only 1"):
        balanced_subset(labels, 6, seed=0)


def test_balanced_subset_names_option():
    labels = labels_with_counts([3, 3])
    with pytest.raises(ConfigError, match="--validation-size must be between 1 and 6, got 7"):
        balanced_subset(labels, 7, seed=0, name="--validation-size")


# ----------------------------------------------------------------------------------------------
# steps_per_epoch


@pytest.mark.parametrize(
    "num_samples, batch_size, drop_last, expected",
    [(10, 3, False, 4), (10, 3, True, 3), (9, 3, False, 3), (9, 3, True, 3), (2, 3, False, 1), (1, 1, True, 1)],
)
def test_steps_per_epoch_values(num_samples, batch_size, drop_last, expected):
    assert steps_per_epoch(num_samples, batch_size, drop_last) == expected


def test_steps_per_epoch_zero_batches_raises():
    with pytest.raises(ConfigError, match="batch_size must be <= 2 .* got 3"):
        steps_per_epoch(2, 3, drop_last=True)


def test_steps_per_epoch_bad_batch_size():
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        steps_per_epoch(10, 0)


# ----------------------------------------------------------------------------------------------
# BatchLoader


def numbered(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels all equal the sample index, and labels equal to the index."""
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 2, 2)
    return images.contiguous(), torch.arange(count)


def epoch_labels(loader: BatchLoader) -> list[int]:
    return torch.cat([labels for _, labels in loader]).tolist()


def test_loader_sees_each_sample_once():
    images, labels = numbered(10)
    loader = BatchLoader(images, labels, 3, shuffle=True, seed=5)
    batches = list(loader)

    assert len(loader) == 4
    assert [len(batch_labels) for _, batch_labels in batches] == [3, 3, 3, 1]
    assert sorted(epoch_labels(loader)) == list(range(10))
    for batch_images, batch_labels in batches:
        assert batch_images.dtype == torch.uint8
        assert torch.equal(batch_images[:, 0, 0, 0].long(), batch_labels)


def test_loader_order_is_function_of_seed_and_epoch():
    images, labels = numbered(50)
    first = BatchLoader(images, labels, 7, shuffle=True, seed=3)
    second = BatchLoader(images, labels, 7, shuffle=True, seed=3)
    second.set_epoch(4)
    second.set_epoch(2)
    first.set_epoch(2)

    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2))
    assert epoch_labels(first) == expected.tolist()
    assert epoch_labels(second) == expected.tolist()
    first.set_epoch(3)
    assert epoch_labels(first) != expected.tolist()


def test_loader_without_shuffle_keeps_order():
    images, labels = numbered(7)
    loader = BatchLoader(images, labels, 4, shuffle=False)
    loader.set_epoch(3)

    assert epoch_labels(loader) == list(range(7))


def test_loader_drop_last():
    images, labels = numbered(10)
    loader = BatchLoader(images, labels, 3, shuffle=True, drop_last=True)

    assert len(loader) == 3
    assert len(epoch_labels(loader)) == 9


def test_loader_batch_size_changes_per_epoch():
    images, labels = numbered(10)
    loader = BatchLoader(images, labels, 3, shuffle=True)
    loader.set_epoch(1, batch_size=4)

    assert loader.batch_size == 4
    assert len(loader) == 3
    assert [len(batch) for _, batch in loader] == [4, 4, 2]
    loader.set_epoch(2, batch_size=10)
    assert len(loader) == 1
    loader.set_epoch(3)
    assert loader.batch_size == 10


def rank_loaders(count: int, batch_size: int, world_size: int, drop_last: bool = False) -> list[BatchLoader]:
    images, labels = numbered(count)
    return [
        BatchLoader(
            images, labels, batch_size, shuffle=True, seed=1, drop_last=drop_last,
            rank=rank, world_size=world_size,
        )
        for rank in range(world_size)
    ]


def test_two_ranks_partition_samples():
    loaders = rank_loaders(11, 4, 2)
    seen = [epoch_labels(loader) for loader in loaders]

    assert [len(loader) for loader in loaders] == [3, 3]
    assert [[len(batch) for _, batch in loader] for loader in loaders] == [[2, 2, 2], [2, 2, 1]]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(11))


def test_ranks_drop_final_batch_smaller_than_world():
    loaders = rank_loaders(9, 4, 2)
    seen = [epoch_labels(loader) for loader in loaders]

    assert [len(loader) for loader in loaders] == [2, 2]
    assert len(set(seen[0] + seen[1])) == 8


def test_ranks_take_contiguous_chunks():
    images, labels = numbered(8)
    loaders = [
        BatchLoader(images, labels, 8, shuffle=False, rank=rank, world_size=3) for rank in range(3)
    ]

    assert [epoch_labels(loader) for loader in loaders] == [[0, 1, 2], [3, 4, 5], [6, 7]]


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 40),
    world_size=st.integers(1, 4),
    batch_fraction=st.floats(0.0, 1.0),
    drop_last=st.booleans(),
)
def test_ranks_partition_property(count, world_size, batch_fraction, drop_last):
    assume(count >= world_size)
    batch_size = world_size + round(batch_fraction * (count - world_size))
    loaders = rank_loaders(count, batch_size, world_size, drop_last)
    seen = [epoch_labels(loader) for loader in loaders]
    everything = sum(seen, [])

    full, remainder = divmod(count, batch_size)
    expected_batches = full + int(not drop_last and remainder >= world_size)
    assert all(len(loader) == expected_batches for loader in loaders)
    assert len(everything) == len(set(everything))
    assert len(everything) == full * batch_size + (remainder if expected_batches > full else 0)


def test_loader_argument_errors():
    images, labels = numbered(6)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        BatchLoader(images, labels, 0, shuffle=True)
    with pytest.raises(ConfigError, match=r"batch_size must be <= 6 \(the number of samples\), got 7"):
        BatchLoader(images, labels, 7, shuffle=True)
    with pytest.raises(ConfigError, match="rank must be between 0 and 1, got 2"):
        BatchLoader(images, labels, 2, shuffle=True, rank=2, world_size=2)
    with pytest.raises(ConfigError, match=r"batch_size must be >= world_size \(4\) .* got 3"):
        BatchLoader(images, labels, 3, shuffle=True, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="labels must be a 1-D tensor of length 6"):
        BatchLoader(images, labels[:5], 2, shuffle=True)
    loader = BatchLoader(images, labels, 2, shuffle=True)
    with pytest.raises(ConfigError, match="epoch must be an integer >= 0, got -1"):
        loader.set_epoch(-1)
    with pytest.raises(ConfigError, match="batch_size must be <= 6"):
        loader.set_epoch(1, batch_size=8)


# ----------------------------------------------------------------------------------------------
# Real CIFAR-10 JPEG archive (only from its cache, which a first load_dataset call writes)


def test_real_cifar10_archive_from_cache():
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"{REAL_ARCHIVE} not present")
    if not dataset_cache_path(REAL_ARCHIVE).is_file():
        pytest.skip("decoded cache of the CIFAR-10 archive not built; decoding takes ~20 s")
    dataset = load_dataset(str(REAL_ARCHIVE))

    assert dataset.classes[0] == "airplane"
    assert dataset.classes[-1] == "truck"
    assert dataset.train_images.shape == (50000, 3, 32, 32)
    assert dataset.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(dataset.train_labels).tolist() == [5000] * 10
    assert dataset.mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=1e-4)
    assert dataset.std == pytest.approx((0.2452, 0.2428, 0.2606), abs=1e-4)
