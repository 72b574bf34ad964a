"""Image-folder trees streamed from disk, for data sets too large to hold in memory.

The tree has the layout that ``data.load_dataset`` reads: ``train/<class>/<image>`` and
``test/<class>/<image>``, optionally inside one top folder. ``scan_image_folder`` lists it
without decoding anything. ``build_stream_loader`` returns a ``StreamLoader`` whose DataLoader
workers decode each image with Pillow and transform it:

* training: random-resized crop (area fraction in (0.08, 1), aspect ratio in (3/4, 4/3) drawn
  log-uniformly, 10 attempts and then a centre crop) to ``image_size``, and a horizontal flip
  with probability 0.5;
* evaluation: resize the shorter side to ``round(image_size / 0.875)`` and crop the centre
  ``image_size`` x ``image_size``.

Batches are uint8 N x 3 x H x W images with int64 labels, like those of ``data.BatchLoader``, so
normalisation and batched augmentation run later on the device in both paths.

The random draws of a sample come from a generator seeded with (seed, epoch, index), so they do
not depend on the number of workers, the rank or the order in which samples are loaded.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .config import DATA_MODES
from .data import EPOCH_SEED_STRIDE, SPLITS, check_class_folders
from .errors import ConfigError, DataError, check_choice, check_positive_int

logger = logging.getLogger(__name__)

# Only files with these suffixes (in any case) count as images. Other files, such as a README or a
# synset list, are skipped.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# "auto" data mode streams a tree with more than this many images, or when image_size is above
# STREAM_MIN_IMAGE_SIZE. The in-memory path stores N x 3 x S x S bytes, about 1.2 GB for
# 100,000 images at 64 x 64. It also keeps only one centre crop of each image, so training on
# larger images would lose the random-resized crops taken from the full-resolution file.
STREAM_MIN_IMAGES = 100_000
STREAM_MIN_IMAGE_SIZE = 64

# Random-resized crop: area fraction range, aspect-ratio (width / height) range and the number of
# draws before the centre-crop fallback.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5

# Evaluation resizes the shorter side to image_size / 0.875 and crops image_size from its centre,
# the usual ImageNet ratio of 224 to 256.
EVAL_CROP_FRACTION = 0.875

# Batches each worker loads ahead of the training loop.
PREFETCH_BATCHES_PER_WORKER = 4


# ----------------------------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class FolderIndex:
    """Class names and the (path, label) samples of each split, in a deterministic order.

    Classes are sorted by folder name and labelled 0..K-1 in that order. Samples are grouped by
    label and sorted by their path below the class folder, the order ``data.load_dataset`` uses.
    """

    root: str
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def scan_image_folder(root: str | os.PathLike) -> FolderIndex:
    """List the image files of a ``train/<class>/`` and ``test/<class>/`` tree.

    Images may sit in subfolders of a class folder. Hidden files and folders (names starting
    with '.') and files without an image suffix are skipped, and no image is opened. Raises
    DataError when the root or a split folder is missing, a class folder is missing from one
    split, a class folder contains no images or an image lies outside a class folder.
    """
    started = time.perf_counter()
    tree = _tree_root(_checked_root(root))
    split_classes = {}
    for split in SPLITS:
        split_dir = os.path.join(tree, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"no {split}/ folder in {tree} (expected {split}/<class>/<image>)")
        split_classes[split] = _scan_split(split_dir)
    check_class_folders(split_classes, tree)

    classes = sorted(split_classes["train"])
    samples = {
        split: [
            (path, label)
            for label, class_name in enumerate(classes)
            for path in split_classes[split][class_name]
        ]
        for split in SPLITS
    }
    logger.info(
        "scanned %s in %.1f s: %d classes, %d train and %d test images",
        tree,
        time.perf_counter() - started,
        len(classes),
        len(samples["train"]),
        len(samples["test"]),
    )
    return FolderIndex(root=tree, classes=classes, train=samples["train"], test=samples["test"])


def _checked_root(root: str | os.PathLike) -> str:
    path = os.fspath(root)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise DataError(
            f"streaming needs an image-folder tree, but {path} is a file. Extract the archive"
            " or load it in memory"
        )
    raise DataError(f"image folder not found: {path}")


def _is_hidden(name: str) -> bool:
    # Covers .DS_Store, ._* AppleDouble files and .git folders.
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _tree_root(path: str) -> str:
    """Return ``path`` or, when it has no split folder, its only visible subfolder if that has one."""
    if any(os.path.isdir(os.path.join(path, split)) for split in SPLITS):
        return path
    with os.scandir(path) as entries:
        subfolders = [entry.path for entry in entries if entry.is_dir() and not _is_hidden(entry.name)]
    if len(subfolders) == 1 and any(os.path.isdir(os.path.join(subfolders[0], split)) for split in SPLITS):
        return subfolders[0]
    return path


def _scan_split(split_dir: str) -> dict[str, list[str]]:
    """Return class name -> sorted image paths for the class folders of one split."""
    classes = {}
    with os.scandir(split_dir) as iterator:
        entries = sorted(iterator, key=lambda entry: entry.name)
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():
            files = _scan_class(entry.path)
            if not files:
                suffixes = " ".join(IMAGE_SUFFIXES)
                raise DataError(f"class folder {entry.path} contains no images (files ending in {suffixes})")
            classes[entry.name] = files
        elif _is_image_name(entry.name):
            raise DataError(f"image {entry.path} must be inside a class folder of {split_dir}")
    return classes


def _scan_class(class_dir: str) -> list[str]:
    """Return the image paths below ``class_dir``, sorted by their path parts below it.

    Symbolic links to files are followed. Like ``os.walk``, links to folders are not entered,
    so a link cycle cannot make the scan loop.
    """
    found: list[tuple[tuple[str, ...], str]] = []
    pending = [(class_dir, ())]
    while pending:
        folder, parts = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, parts + (entry.name,)))
                elif _is_image_name(entry.name) and entry.is_file():
                    found.append((parts + (entry.name,), entry.path))
    found.sort()
    return [path for _, path in found]


def count_images(root: str | os.PathLike, limit: int | None = None) -> int:
    """Count the image files below the train/ and test/ folders of a tree, without sorting.

    Unlike ``scan_image_folder`` this checks no layout rule, and a missing split counts as
    zero. With ``limit``, counting stops as soon as the count exceeds it, so the result is then
    ``limit + 1``. Raises DataError when ``root`` is not a folder.
    """
    if limit is not None:
        check_positive_int("limit", limit, minimum=0)
    tree = _tree_root(_checked_root(root))
    count = 0
    pending = [os.path.join(tree, split) for split in SPLITS]
    pending = [folder for folder in pending if os.path.isdir(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif _is_image_name(entry.name):
                    count += 1
                    if limit is not None and count > limit:
                        return count
    return count


def should_stream(root: str | os.PathLike, image_size: int, mode: str) -> bool:
    """Decide whether to stream ``root`` from disk rather than decode it into memory.

    ``mode`` is "memory" (False), "stream" (True) or "auto". "auto" streams an image-folder tree
    with more than STREAM_MIN_IMAGES images or when ``image_size`` is above STREAM_MIN_IMAGE_SIZE.
    It returns False for anything that is not a folder (built-in data set names and tar
    archives), because only folders can be streamed.
    """
    check_choice("--data-mode", mode, DATA_MODES)
    check_positive_int("image_size", image_size)
    if mode != "auto":
        return mode == "stream"
    if not os.path.isdir(os.fspath(root)):
        return False
    if image_size > STREAM_MIN_IMAGE_SIZE:
        return True
    return count_images(root, limit=STREAM_MIN_IMAGES) > STREAM_MIN_IMAGES


def sample_labels(samples: Sequence[tuple[str, int]]) -> torch.Tensor:
    """Return the labels of ``samples`` as an int64 tensor, for ``data.balanced_subset``."""
    return torch.tensor([label for _, label in samples], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Transforms


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """Draw the (left, top, right, bottom) pixel box of a random-resized crop.

    Each attempt draws the crop area as a fraction of ``width * height`` uniformly from
    ``scale`` and the aspect ratio (width / height) log-uniformly from ``ratio``. The first
    crop that fits inside the image gets a uniformly drawn position. After CROP_ATTEMPTS misses
    the box is the largest centred crop whose aspect ratio lies in ``ratio``.
    """
    area = width * height
    log_ratio_low, log_ratio_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        crop_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio_low, log_ratio_high))
        crop_width = round(math.sqrt(crop_area * aspect))
        crop_height = round(math.sqrt(crop_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height

    # Both rounded sides stay within 1..width and 1..height, because the clamped side is
    # strictly shorter than the image side before rounding.
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    left = (width - crop_width) // 2
    top = (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def train_transform(image: Image.Image, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Apply a random-resized crop to ``image_size`` (bilinear) and a random horizontal flip."""
    box = random_resized_crop_box(image.width, image.height, rng)
    # Pillow crops and resizes in one pass when given the source box.
    cropped = image.resize((image_size, image_size), Image.BILINEAR, box=box)
    if rng.random() < FLIP_PROBABILITY:
        cropped = cropped.transpose(Image.FLIP_LEFT_RIGHT)
    return cropped


def eval_resize_size(image_size: int) -> int:
    """Return the shorter-side length that evaluation resizes to before the centre crop."""
    return round(image_size / EVAL_CROP_FRACTION)


def eval_transform(image: Image.Image, image_size: int) -> Image.Image:
    """Resize the shorter side to ``eval_resize_size`` (bilinear) and crop the centre square."""
    resize_size = eval_resize_size(image_size)
    width, height = image.size
    scale = resize_size / min(width, height)
    new_width = max(resize_size, round(width * scale))
    new_height = max(resize_size, round(height * scale))
    resized = image.resize((new_width, new_height), Image.BILINEAR)
    left = (new_width - image_size) // 2
    top = (new_height - image_size) // 2
    return resized.crop((left, top, left + image_size, top + image_size))


def decode_rgb(path: str) -> Image.Image:
    """Decode an image file with Pillow and convert it to RGB, raising DataError on failure."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}. Scan the folder again if files were moved") from None
    # Pillow reports damaged or unsupported files with any of these, depending on the format.
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image {path}: {error}") from error


# ----------------------------------------------------------------------------------------------
# Data set


class _PathTable:
    """File paths packed into one byte buffer with offsets.

    Reading a Python string in a forked DataLoader worker updates its reference count, and the
    write copies the memory page under copy-on-write. A list of a million paths therefore ends
    up copied into every worker, but a numpy buffer has no per-item objects.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [os.fsencode(path) for path in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._buffer[start:end].tobytes())


class StreamingImageDataset(Dataset):
    """Image files decoded and transformed on access, as (uint8 3 x S x S tensor, label) pairs.

    ``dataset[index]`` uses the epoch set by ``set_epoch``. ``dataset[(epoch, index)]`` names
    the epoch itself, which StreamLoader uses because a persistent worker keeps its own copy of
    the data set and never receives a later ``set_epoch``. Training samples draw their crop and flip
    from ``np.random.default_rng((seed, epoch, index))``. Evaluation samples use no randomness.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], image_size: int, train: bool, seed: int
    ) -> None:
        check_positive_int("image_size", image_size)
        check_positive_int("seed", seed, minimum=0)
        if len(samples) == 0:
            raise ConfigError("samples must contain at least one (path, label) pair, got none")
        labels = np.empty(len(samples), dtype=np.int64)
        paths = []
        for position, sample in enumerate(samples):
            path, label = _checked_sample(position, sample)
            paths.append(path)
            labels[position] = label
        self._paths = _PathTable(paths)
        self._labels = labels
        self.image_size = image_size
        self.train = bool(train)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that plain integer indexing draws its random crops for."""
        self.epoch = check_positive_int("epoch", epoch, minimum=0)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> torch.Tensor:
        """Int64 labels of all samples, in sample order."""
        return torch.from_numpy(self._labels)

    def path(self, index: int) -> str:
        return self._paths[self._checked_index(index)]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            epoch, index = key
            check_positive_int("epoch", epoch, minimum=0)
        else:
            epoch, index = self.epoch, key
        index = self._checked_index(index)

        image = decode_rgb(self._paths[index])
        if self.train:
            rng = np.random.default_rng((self.seed, epoch, index))
            image = train_transform(image, self.image_size, rng)
        else:
            image = eval_transform(image, self.image_size)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        return pixels.permute(2, 0, 1).contiguous(), int(self._labels[index])

    def _checked_index(self, index: object) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index must be between 0 and {len(self) - 1}, got {index}")
        return int(index)


def _checked_sample(position: int, sample: object) -> tuple[str, int]:
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise ConfigError(f"samples[{position}] must be a (path, label) pair, got {sample!r}")
    path, label = sample
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"samples[{position}] path must be a str or os.PathLike, got {path!r}")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise ConfigError(f"samples[{position}] label must be an integer >= 0, got {label!r}")
    return os.fspath(path), int(label)


# ----------------------------------------------------------------------------------------------
# Batches


class StreamBatchSampler(Sampler):
    """Per-rank batches of (epoch, index) keys for a StreamingImageDataset.

    ``positions`` are the data-set indices to draw from. When ``shuffle`` is set, the order of
    an epoch is ``torch.randperm`` with a generator seeded by ``seed * 1_000_003 + epoch``, the
    order ``data.BatchLoader`` uses. Otherwise positions keep their given order. Every global
    batch of ``batch_size`` is split into ``world_size`` contiguous chunks (sizes differ by at
    most one) and rank ``r`` yields chunk ``r``, so all ranks yield the same number of batches.
    Each position is drawn once per epoch, except that a final global batch is dropped when it
    is smaller than ``world_size`` or, with ``drop_last``, smaller than ``batch_size``.
    """

    def __init__(
        self,
        positions: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be between 0 and {world_size - 1}, got {rank!r}")
        check_positive_int("seed", seed, minimum=0)
        if positions.dim() != 1 or len(positions) == 0:
            raise ConfigError(f"positions must be a non-empty 1-D tensor, got shape {tuple(positions.shape)}")
        self.positions = positions.to(torch.int64)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.batch_size = self._checked_batch_size(batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.positions)

    def set_epoch(self, epoch: int, batch_size: int | None = None) -> None:
        """Select the sample order of ``epoch`` and, when given, a new global batch size."""
        check_positive_int("epoch", epoch, minimum=0)
        if batch_size is not None:
            self.batch_size = self._checked_batch_size(batch_size)
        self.epoch = epoch

    def _checked_batch_size(self, batch_size: int) -> int:
        check_positive_int("batch_size", batch_size)
        if batch_size > self.num_samples:
            raise ConfigError(
                f"batch_size must be <= {self.num_samples} (the number of samples),"
                f" got {batch_size}"
            )
        if batch_size < self.world_size:
            raise ConfigError(
                f"batch_size must be >= world_size ({self.world_size}) so that every rank gets"
                f" a sample, got {batch_size}"
            )
        return batch_size

    def __len__(self) -> int:
        full_batches, remainder = divmod(self.num_samples, self.batch_size)
        keeps_last = not self.drop_last and remainder >= self.world_size
        return full_batches + int(keeps_last)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # The epoch and batch size are read once, so a set_epoch call during iteration
        # takes effect at the next epoch.
        epoch, batch_size = self.epoch, self.batch_size
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            order = self.positions[torch.randperm(self.num_samples, generator=generator)]
        else:
            order = self.positions
        for batch_number in range(len(self)):
            start = batch_number * batch_size
            global_batch = order[start : start + batch_size]
            local = torch.tensor_split(global_batch, self.world_size)[self.rank]
            yield [(epoch, index) for index in local.tolist()]


class _SampleFailure(NamedTuple):
    """Message of a DataError raised in a worker, carried to the main process as a batch."""

    message: str


class _FailureCatchingDataset(Dataset):
    """Wrapper that returns a DataError as a _SampleFailure instead of raising it.

    DataLoader re-raises a worker's exception with the worker's traceback in the message. A
    returned failure lets StreamLoader raise the original one-line message instead.
    """

    def __init__(self, dataset: StreamingImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | _SampleFailure:
        try:
            return self.dataset[key]
        except DataError as error:
            return _SampleFailure(str(error))


def _collate_samples(items: list) -> tuple[torch.Tensor, torch.Tensor] | _SampleFailure:
    for item in items:
        if isinstance(item, _SampleFailure):
            return item
    # default_collate stacks into shared memory inside workers, which saves a copy.
    images, labels = default_collate(items)
    return images, labels


class StreamLoader:
    """Batches of (uint8 N x 3 x S x S images, int64 labels) decoded by DataLoader workers.

    Iterating yields this rank's share of every global batch of the current epoch, see
    StreamBatchSampler. Call ``set_epoch`` before each epoch. With ``workers > 0`` the workers
    persist across epochs. The sampler sends the epoch with every index, so a new epoch or
    batch size takes effect at the next iteration. A file that cannot be decoded raises DataError naming it.
    """

    def __init__(self, dataset: StreamingImageDataset, batch_sampler: StreamBatchSampler, workers: int) -> None:
        check_positive_int("workers", workers, minimum=0)
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.workers = workers
        self.dataloader = DataLoader(
            _FailureCatchingDataset(dataset),
            batch_sampler=batch_sampler,
            num_workers=workers,
            collate_fn=_collate_samples,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH_BATCHES_PER_WORKER if workers else None,
        )

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    @property
    def batch_size(self) -> int:
        """Global batch size of the current epoch, summed over all ranks."""
        return self.batch_sampler.batch_size

    @property
    def num_samples(self) -> int:
        """Samples drawn per epoch over all ranks, before any final batch is dropped."""
        return self.batch_sampler.num_samples

    def set_epoch(self, epoch: int, batch_size: int | None = None) -> None:
        """Select the sample order and random crops of ``epoch`` and, when given, a new global batch size."""
        self.batch_sampler.set_epoch(epoch, batch_size)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.dataloader:
            if isinstance(batch, _SampleFailure):
                raise DataError(batch.message)
            yield batch


def build_stream_loader(
    samples: Sequence[tuple[str, int]],
    image_size: int,
    *,
    train: bool,
    batch_size: int,
    seed: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    indices: torch.Tensor | Sequence[int] | None = None,
) -> StreamLoader:
    """Build a StreamLoader over ``samples``, shuffled and augmented when ``train`` is set.

    ``batch_size`` is the global batch over all ``world_size`` ranks. ``indices`` restricts the
    loader to those positions of ``samples``, such as a ``data.balanced_subset`` of
    ``sample_labels(samples)``. Evaluation loaders keep the order of ``indices`` (or of
    ``samples``). Raises ConfigError for invalid arguments.
    """
    dataset = StreamingImageDataset(samples, image_size, train=train, seed=seed)
    positions = _checked_indices(indices, len(dataset))
    batch_sampler = StreamBatchSampler(
        positions,
        batch_size,
        shuffle=train,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    return StreamLoader(dataset, batch_sampler, workers)


def _checked_indices(indices: torch.Tensor | Sequence[int] | None, num_samples: int) -> torch.Tensor:
    if indices is None:
        return torch.arange(num_samples)
    positions = torch.as_tensor(indices)
    if positions.dim() != 1 or len(positions) == 0:
        raise ConfigError(f"indices must be a non-empty 1-D sequence, got shape {tuple(positions.shape)}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ConfigError(f"indices must be integers, got dtype {positions.dtype}")
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or high >= num_samples:
        bad = low if low < 0 else high
        raise ConfigError(f"indices must be between 0 and {num_samples - 1}, got {bad}")
    return positions.to(torch.int64)
