"""Tests for streaming image-folder trees: scanning, transforms, the data set and StreamLoader.

Trees of JPEG and PNG files of mixed sizes are generated in tmp_path. Two tests start DataLoader
worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclical_training import streaming
from cyclical_training.data import balanced_subset
from cyclical_training.errors import ConfigError, DataError
from cyclical_training.streaming import (
    StreamingImageDataset,
    build_stream_loader,
    count_images,
    random_resized_crop_box,
    sample_labels,
    scan_image_folder,
    should_stream,
)

# Listed out of sorted order, so that the tests see the scan sort them.
CLASSES = ("cat", "ant", "bird")
TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 2
# (width, height) of the generated images, used in turn.
SIZES = ((20, 30), (90, 50), (45, 45), (64, 21), (33, 77), (50, 90), (71, 40))
IMAGE_SIZE = 16


# ----------------------------------------------------------------------------------------------
# Generated data


def write_image(path: Path, index: int) -> None:
    """Write a distinct image of one of SIZES, as PNG for a .png suffix and JPEG otherwise."""
    width, height = SIZES[index % len(SIZES)]
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image_format = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=image_format)


def tree_files() -> list[tuple[str, str, str]]:
    """Return the (split, class, file name) of every generated image, in writing order.

    Suffixes alternate between .jpg, .png and an upper-case .JPEG.
    """
    suffixes = (".jpg", ".png", ".JPEG")
    files = []
    for class_name in CLASSES:
        for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            for number in range(count):
                suffix = suffixes[len(files) % len(suffixes)]
                files.append((split, class_name, f"{number:02d}{suffix}"))
    return files


def make_tree(root: Path) -> None:
    """Write the images of tree_files, plus a text file and a hidden file per class folder."""
    for index, (split, class_name, name) in enumerate(tree_files()):
        write_image(root / split / class_name / name, index)
    for folder in root.glob("*/*"):
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.jpg").write_bytes(b"hidden")
    (root / "README.txt").write_text("tree description")


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_tree(root)
    return root


@pytest.fixture()
def index(tree: Path) -> streaming.FolderIndex:
    return scan_image_folder(tree)


def reference_eval_crop(path: str, size: int) -> torch.Tensor:
    """Resize the shorter side to round(size / 0.875) and crop the centre, as a C x H x W tensor."""
    resize_to = round(size / 0.875)
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    if width <= height:
        new_size = (resize_to, max(resize_to, round(height * resize_to / width)))
    else:
        new_size = (max(resize_to, round(width * resize_to / height)), resize_to)
    resized = rgb.resize(new_size, Image.BILINEAR)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(cropped)).permute(2, 0, 1)


def loader_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def sampler_positions(loader) -> list[list[int]]:
    """Return the data-set positions of each batch that ``loader`` yields in its current epoch."""
    return [[position for _, position in batch] for batch in loader.batch_sampler]


# ----------------------------------------------------------------------------------------------
# Scanning


def test_scan_sorts_classes_and_samples(tree: Path) -> None:
    index = scan_image_folder(tree)

    assert index.root == str(tree)
    assert index.classes == sorted(CLASSES)
    assert index.num_classes == 3
    assert len(index.train) == 3 * TRAIN_PER_CLASS
    assert len(index.test) == 3 * TEST_PER_CLASS

    for split, samples in (("train", index.train), ("test", index.test)):
        expected = [
            (str(tree / file_split / class_name / name), sorted(CLASSES).index(class_name))
            for file_split, class_name, name in tree_files()
            if file_split == split
        ]
        expected.sort(key=lambda sample: (sample[1], sample[0]))
        assert samples == expected


def test_scan_skips_hidden_and_non_images(index: streaming.FolderIndex) -> None:
    paths = [path for path, _ in index.train + index.test]

    assert not any(path.endswith("notes.txt") for path in paths)
    assert not any(os.path.basename(path).startswith(".") for path in paths)
    assert any(path.endswith(".JPEG") for path in paths)


def test_scan_finds_images_in_subfolders(tree: Path) -> None:
    write_image(tree / "train" / "ant" / "sub" / "00.png", 99)

    index = scan_image_folder(tree)

    ant_paths = [path for path, label in index.train if label == 0]
    assert ant_paths[-1] == str(tree / "train" / "ant" / "sub" / "00.png")
    assert len(ant_paths) == TRAIN_PER_CLASS + 1


def test_scan_accepts_one_top_folder(tmp_path: Path) -> None:
    make_tree(tmp_path / "outer" / "imagenet")

    index = scan_image_folder(tmp_path / "outer")

    assert index.root == str(tmp_path / "outer" / "imagenet")
    assert len(index.train) == 3 * TRAIN_PER_CLASS


def remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def break_missing_root(root: Path) -> Path:
    return root / "absent"


def break_file_root(root: Path) -> Path:
    archive = root.parent / "tree.tar"
    archive.write_bytes(b"tar")
    return archive


def break_no_train(root: Path) -> Path:
    remove_tree(root / "train")
    return root


def break_no_test(root: Path) -> Path:
    remove_tree(root / "test")
    return root


def break_class_missing_from_test(root: Path) -> Path:
    remove_tree(root / "test" / "bird")
    return root


def break_class_missing_from_train(root: Path) -> Path:
    write_image(root / "test" / "dog" / "00.jpg", 0)
    return root


def break_empty_class(root: Path) -> Path:
    for image in (root / "train" / "cat").glob("0*"):
        image.unlink()
    return root


def break_image_outside_class(root: Path) -> Path:
    write_image(root / "test" / "stray.png", 0)
    return root


def break_no_classes(root: Path) -> Path:
    for split in ("train", "test"):
        remove_tree(root / split)
        (root / split).mkdir()
    return root


SCAN_ERRORS = [
    (break_missing_root, r"image folder not found: .*absent$"),
    (break_file_root, r"streaming needs an image-folder tree, but .*tree\.tar is a file"),
    (break_no_train, r"no train/ folder in .*tree"),
    (break_no_test, r"no test/ folder in .*tree"),
    (break_class_missing_from_test, r"class folders in .*/train are missing from .*/test: bird"),
    (break_class_missing_from_train, r"class folders in .*/test are missing from .*/train: dog"),
    (break_empty_class, r"class folder .*train/cat contains no images"),
    (break_image_outside_class, r"image .*stray\.png must be inside a class folder"),
    (break_no_classes, r"no class folders in .*/train"),
]


@pytest.mark.parametrize(("damage", "message"), SCAN_ERRORS, ids=[case[0].__name__ for case in SCAN_ERRORS])
def test_scan_rejects_bad_tree(tree: Path, damage, message: str) -> None:
    root = damage(tree)

    with pytest.raises(DataError, match=message) as caught:
        scan_image_folder(root)
    assert "\n" not in str(caught.value)


def test_scan_does_not_decode(tree: Path) -> None:
    corrupt = tree / "train" / "ant" / "99.jpg"
    corrupt.write_bytes(b"not a jpeg")

    index = scan_image_folder(tree)

    assert (str(corrupt), 0) in index.train


def test_count_images_counts_both_splits(tree: Path) -> None:
    assert count_images(tree) == 3 * (TRAIN_PER_CLASS + TEST_PER_CLASS)


def test_count_images_stops_after_limit(tree: Path) -> None:
    assert count_images(tree, limit=5) == 6
    assert count_images(tree, limit=1000) == 3 * (TRAIN_PER_CLASS + TEST_PER_CLASS)


def test_count_images_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        count_images(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------
# Mode selection


def test_should_stream_fixed_modes(tree: Path) -> None:
    assert should_stream(tree, 32, "memory") is False
    assert should_stream(tree, 224, "memory") is False
    assert should_stream(tree, 32, "stream") is True


def test_should_stream_auto(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert should_stream(tree, 64, "auto") is False
    assert should_stream(tree, 65, "auto") is True
    assert should_stream("digits", 224, "auto") is False

    total = 3 * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    monkeypatch.setattr(streaming, "STREAM_MIN_IMAGES", total)
    assert should_stream(tree, 32, "auto") is False
    monkeypatch.setattr(streaming, "STREAM_MIN_IMAGES", total - 1)
    assert should_stream(tree, 32, "auto") is True


def test_should_stream_rejects_bad_arguments(tree: Path) -> None:
    with pytest.raises(ConfigError, match="--data-mode must be one of auto, memory, stream"):
        should_stream(tree, 32, "disk")
    with pytest.raises(ConfigError, match="image_size must be an integer >= 1"):
        should_stream(tree, 0, "auto")


# ----------------------------------------------------------------------------------------------
# Transforms


def test_crop_box_stays_inside_image() -> None:
    rng = np.random.default_rng(0)
    for width, height in SIZES + ((1, 1), (500, 375)):
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, rng)
            assert 0 <= left < right <= width
            assert 0 <= top < bottom <= height


def test_crop_box_respects_scale_and_ratio() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(500, 500, rng)
        crop_width, crop_height = right - left, bottom - top
        # Rounding each side to whole pixels moves area and ratio by about 1 / side.
        assert 0.08 * 0.9 <= crop_width * crop_height / 500**2 <= 1.0
        assert 0.75 * 0.9 <= crop_width / crop_height <= (4 / 3) * 1.1


def test_crop_box_falls_back_to_centre() -> None:
    # A 400 x 4 image cannot fit any crop of 8% of its area with a ratio of at most 4/3.
    rng = np.random.default_rng(2)

    assert random_resized_crop_box(400, 4, rng) == (197, 0, 202, 4)
    assert random_resized_crop_box(3, 300, rng) == (0, 148, 3, 152)


# ----------------------------------------------------------------------------------------------
# Data set


def test_dataset_train_sample_shape(index: streaming.FolderIndex) -> None:
    dataset = StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=0)

    assert len(dataset) == len(index.train)
    for position in range(len(dataset)):
        image, label = dataset[position]
        assert image.dtype == torch.uint8
        assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert image.is_contiguous()
        assert label == index.train[position][1]


def test_dataset_eval_matches_reference(index: streaming.FolderIndex) -> None:
    dataset = StreamingImageDataset(index.test, IMAGE_SIZE, train=False, seed=0)

    for position, (path, label) in enumerate(index.test):
        image, sample_label = dataset[position]
        assert image.dtype == torch.uint8
        assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert sample_label == label
        assert torch.equal(image, reference_eval_crop(path, IMAGE_SIZE)), path


def test_dataset_eval_ignores_epoch(index: streaming.FolderIndex) -> None:
    dataset = StreamingImageDataset(index.test, IMAGE_SIZE, train=False, seed=0)

    first = dataset[(0, 3)][0]
    assert torch.equal(dataset[(7, 3)][0], first)
    dataset.set_epoch(5)
    assert torch.equal(dataset[3][0], first)


def test_dataset_train_reproducible(index: streaming.FolderIndex) -> None:
    dataset = StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=3)
    again = StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=3)

    for position in range(len(dataset)):
        image = dataset[(2, position)][0]
        assert torch.equal(dataset[(2, position)][0], image)
        assert torch.equal(again[(2, position)][0], image)
    dataset.set_epoch(2)
    assert torch.equal(dataset[4][0], again[(2, 4)][0])


def test_dataset_train_changes_with_epoch(index: streaming.FolderIndex) -> None:
    dataset = StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=3)
    other_seed = StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=4)

    epoch_zero = [dataset[(0, position)][0] for position in range(len(dataset))]
    epoch_one = [dataset[(1, position)][0] for position in range(len(dataset))]
    seed_four = [other_seed[(0, position)][0] for position in range(len(dataset))]

    changed = sum(not torch.equal(a, b) for a, b in zip(epoch_zero, epoch_one))
    assert changed == len(dataset)
    changed = sum(not torch.equal(a, b) for a, b in zip(epoch_zero, seed_four))
    assert changed == len(dataset)


def test_dataset_corrupt_file_names_it(tree: Path) -> None:
    corrupt = tree / "train" / "ant" / "99.jpg"
    corrupt.write_bytes(b"not a jpeg")
    samples = scan_image_folder(tree).train
    position = samples.index((str(corrupt), 0))
    dataset = StreamingImageDataset(samples, IMAGE_SIZE, train=True, seed=0)

    with pytest.raises(DataError, match=f"cannot decode image {corrupt}") as caught:
        dataset[position]
    assert "\n" not in str(caught.value)


def test_dataset_deleted_file_names_it(index: streaming.FolderIndex) -> None:
    dataset = StreamingImageDataset(index.train, IMAGE_SIZE, train=False, seed=0)
    Path(index.train[0][0]).unlink()

    with pytest.raises(DataError, match=f"image not found: {index.train[0][0]}"):
        dataset[0]


def test_dataset_rejects_bad_arguments(index: streaming.FolderIndex) -> None:
    with pytest.raises(ConfigError, match="image_size must be an integer >= 1"):
        StreamingImageDataset(index.train, 0, train=True, seed=0)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=-1)
    with pytest.raises(ConfigError, match="samples must contain at least one"):
        StreamingImageDataset([], IMAGE_SIZE, train=True, seed=0)
    with pytest.raises(ConfigError, match=r"samples\[1\] label must be an integer >= 0"):
        StreamingImageDataset([("a.jpg", 0), ("b.jpg", -1)], IMAGE_SIZE, train=True, seed=0)
    with pytest.raises(ConfigError, match=r"samples\[0\] must be a \(path, label\) pair"):
        StreamingImageDataset(["a.jpg"], IMAGE_SIZE, train=True, seed=0)

    dataset = StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=0)
    with pytest.raises(IndexError, match="index must be between 0 and 17"):
        dataset[len(dataset)]
    with pytest.raises(ConfigError, match="epoch must be an integer >= 0"):
        dataset.set_epoch(-1)


def test_dataset_labels_tensor(index: streaming.FolderIndex) -> None:
    dataset = StreamingImageDataset(index.train, IMAGE_SIZE, train=True, seed=0)

    assert torch.equal(dataset.labels, sample_labels(index.train))
    assert dataset.labels.dtype == torch.int64
    assert dataset.path(5) == index.train[5][0]


# ----------------------------------------------------------------------------------------------
# Loader


def test_loader_batch_shapes(index: streaming.FolderIndex) -> None:
    for train in (True, False):
        loader = build_stream_loader(
            index.train, IMAGE_SIZE, train=train, batch_size=4, seed=0, workers=0
        )
        batches = loader_batches(loader)

        assert len(batches) == len(loader) == 5
        assert [len(labels) for _, labels in batches] == [4, 4, 4, 4, 2]
        for images, labels in batches:
            assert images.dtype == torch.uint8
            assert images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
            assert labels.dtype == torch.int64


def test_loader_eval_in_order(index: streaming.FolderIndex) -> None:
    loader = build_stream_loader(index.test, IMAGE_SIZE, train=False, batch_size=4, seed=0, workers=0)

    images = torch.cat([images for images, _ in loader])
    labels = torch.cat([labels for _, labels in loader])

    assert torch.equal(labels, sample_labels(index.test))
    for position, (path, _) in enumerate(index.test):
        assert torch.equal(images[position], reference_eval_crop(path, IMAGE_SIZE))


def test_loader_same_batches_any_workers(index: streaming.FolderIndex) -> None:
    serial = build_stream_loader(index.train, IMAGE_SIZE, train=True, batch_size=5, seed=7, workers=0)
    parallel = build_stream_loader(index.train, IMAGE_SIZE, train=True, batch_size=5, seed=7, workers=2)
    serial.set_epoch(1)
    parallel.set_epoch(1)

    serial_batches = loader_batches(serial)
    parallel_batches = loader_batches(parallel)

    assert len(serial_batches) == len(parallel_batches) == 4
    for (serial_images, serial_labels), (parallel_images, parallel_labels) in zip(
        serial_batches, parallel_batches
    ):
        assert torch.equal(serial_images, parallel_images)
        assert torch.equal(serial_labels, parallel_labels)

    # Persistent workers must see a later epoch and batch size too.
    serial.set_epoch(2, batch_size=6)
    parallel.set_epoch(2, batch_size=6)
    serial_batches = loader_batches(serial)
    parallel_batches = loader_batches(parallel)

    assert len(parallel_batches) == 3
    for (serial_images, _), (parallel_images, _) in zip(serial_batches, parallel_batches):
        assert parallel_images.shape[0] == 6
        assert torch.equal(serial_images, parallel_images)


def test_loader_each_sample_once(index: streaming.FolderIndex) -> None:
    loader = build_stream_loader(index.train, IMAGE_SIZE, train=True, batch_size=4, seed=0, workers=0)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        positions = [position for batch in sampler_positions(loader) for position in batch]
        assert sorted(positions) == list(range(len(index.train)))
        orders.append(positions)

    assert orders[0] != orders[1]
    loader.set_epoch(0)
    assert [p for batch in sampler_positions(loader) for p in batch] == orders[0]

    labels = torch.cat([labels for _, labels in loader])
    assert torch.equal(labels, sample_labels(index.train)[orders[0]])


def test_loader_two_ranks_split_batches(index: streaming.FolderIndex) -> None:
    # 18 samples in global batches of 5: 5, 5, 5, 3, each split 3 + 2 (or 2 + 1).
    ranks = [
        build_stream_loader(
            index.train, IMAGE_SIZE, train=True, batch_size=5, seed=1, workers=0, rank=rank, world_size=2
        )
        for rank in range(2)
    ]
    positions = [sampler_positions(loader) for loader in ranks]

    assert len(ranks[0]) == len(ranks[1]) == 4
    assert [len(batch) for batch in positions[0]] == [3, 3, 3, 2]
    assert [len(batch) for batch in positions[1]] == [2, 2, 2, 1]
    rank_zero = {p for batch in positions[0] for p in batch}
    rank_one = {p for batch in positions[1] for p in batch}
    assert rank_zero.isdisjoint(rank_one)
    assert rank_zero | rank_one == set(range(len(index.train)))

    batch_counts = [len(loader_batches(loader)) for loader in ranks]
    assert batch_counts == [4, 4]


def test_loader_drops_batch_smaller_than_ranks(index: streaming.FolderIndex) -> None:
    # 17 samples in global batches of 4 leave a final batch of 1 for 2 ranks, which is dropped.
    subset = list(range(17))
    ranks = [
        build_stream_loader(
            index.train,
            IMAGE_SIZE,
            train=True,
            batch_size=4,
            seed=1,
            workers=0,
            rank=rank,
            world_size=2,
            indices=subset,
        )
        for rank in range(2)
    ]
    positions = [{p for batch in sampler_positions(loader) for p in batch} for loader in ranks]

    assert len(ranks[0]) == len(ranks[1]) == 4
    assert positions[0].isdisjoint(positions[1])
    assert len(positions[0] | positions[1]) == 16
    assert positions[0] | positions[1] <= set(subset)


def test_loader_drop_last(index: streaming.FolderIndex) -> None:
    loader = build_stream_loader(
        index.train, IMAGE_SIZE, train=True, batch_size=4, seed=0, workers=0, drop_last=True
    )

    assert len(loader) == 4
    assert [len(batch) for batch in sampler_positions(loader)] == [4, 4, 4, 4]


def test_loader_set_epoch_new_batch_size(index: streaming.FolderIndex) -> None:
    loader = build_stream_loader(index.train, IMAGE_SIZE, train=True, batch_size=4, seed=0, workers=0)
    assert len(loader) == 5

    loader.set_epoch(1, batch_size=6)

    assert len(loader) == 3
    assert loader.batch_size == 6
    assert loader.epoch == 1
    assert [labels.shape[0] for _, labels in loader] == [6, 6, 6]

    loader.set_epoch(2)
    assert loader.batch_size == 6


def test_loader_balanced_subset(index: streaming.FolderIndex) -> None:
    subset = balanced_subset(sample_labels(index.train), 6, seed=0)
    loader = build_stream_loader(
        index.train, IMAGE_SIZE, train=True, batch_size=4, seed=0, workers=0, indices=subset
    )

    positions = [p for batch in sampler_positions(loader) for p in batch]
    labels = torch.cat([labels for _, labels in loader])

    assert len(loader) == 2
    assert sorted(positions) == subset.tolist()
    assert torch.bincount(labels).tolist() == [2, 2, 2]


def test_loader_corrupt_file_names_it(tree: Path) -> None:
    corrupt = tree / "train" / "bird" / "99.jpg"
    corrupt.write_bytes(b"not a jpeg")
    samples = scan_image_folder(tree).train

    for workers in (0, 2):
        loader = build_stream_loader(samples, IMAGE_SIZE, train=True, batch_size=4, seed=0, workers=workers)
        with pytest.raises(DataError, match=f"cannot decode image {corrupt}") as caught:
            loader_batches(loader)
        assert "\n" not in str(caught.value)


def test_loader_rejects_bad_arguments(index: streaming.FolderIndex) -> None:
    def build(**overrides):
        arguments = dict(train=True, batch_size=4, seed=0, workers=0)
        arguments.update(overrides)
        return build_stream_loader(index.train, IMAGE_SIZE, **arguments)

    with pytest.raises(ConfigError, match=r"batch_size must be <= 18 \(the number of samples\)"):
        build(batch_size=19)
    with pytest.raises(ConfigError, match=r"batch_size must be >= world_size \(4\)"):
        build(batch_size=3, world_size=4)
    with pytest.raises(ConfigError, match="rank must be between 0 and 1, got 2"):
        build(rank=2, world_size=2)
    with pytest.raises(ConfigError, match="workers must be an integer >= 0"):
        build(workers=-1)
    with pytest.raises(ConfigError, match="indices must be between 0 and 17, got 18"):
        build(indices=[0, 18])
    with pytest.raises(ConfigError, match="indices must be a non-empty 1-D sequence"):
        build(indices=[])
    with pytest.raises(ConfigError, match="epoch must be an integer >= 0"):
        build().set_epoch(-1)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        build().set_epoch(1, batch_size=0)
