"""Image data sets held in memory as uint8 tensors, and the batches drawn from them.

Supported data sets (the ``data`` argument of ``load_dataset``):

* ``digits``: the 8x8 handwritten digits that ship inside scikit-learn (1,797 grayscale images),
  split 80/20 per class with a fixed seed, so no download is needed.
* ``cifar10`` and ``cifar100``: the python-pickle releases (``cifar-10-batches-py`` and
  ``cifar-100-python``) in ``data_dir``. CIFAR-100 uses the 100 fine labels.
* A path to an image-folder tree ``train/<class>/<image>`` and ``test/<class>/<image>``, or to a
  ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2`` or ``.tar.xz`` archive of one. The archive is read
  as a stream without extracting it, and its top level may be the tree itself or one folder that
  contains it. Images are decoded with Pillow (any format it reads) and converted to RGB. The
  decoded tensors are cached, because decoding tens of thousands of JPEG files takes tens of
  seconds.

``BatchLoader`` yields batches from the in-memory tensors with tensor indexing only, and splits
each global batch across the ranks of a distributed run.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import os
import pickle
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, DataError, check_positive_int

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("digits", "cifar10", "cifar100")
SPLITS = ("train", "test")

# Fraction of each digits class that goes to the test split, and the seed that picks it. The seed
# is fixed so that every run, whatever its own seed, evaluates on the same test images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16

# Bump when the decoding or the cache layout changes, so that old cache files are not reused.
CACHE_FORMAT_VERSION = 1
CACHE_KEYS = ("format_version", "name", "classes") + tuple(
    f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")
)

# Shuffle seed is seed * EPOCH_SEED_STRIDE + epoch, distinct for every (seed, epoch) pair while
# epoch < EPOCH_SEED_STRIDE.
EPOCH_SEED_STRIDE = 1_000_003

# Images per chunk when computing channel statistics, to bound the float64 copy to ~25 MB for
# 32x32 RGB images.
STATS_CHUNK_IMAGES = 1024


@dataclass(eq=False)
class ImageDataset:
    """Train and test images as uint8 tensors of shape N x C x H x W, with int64 labels."""

    name: str
    classes: list[str]
    train_images: torch.Tensor = dataclasses.field(repr=False)
    train_labels: torch.Tensor = dataclasses.field(repr=False)
    test_images: torch.Tensor = dataclasses.field(repr=False)
    test_labels: torch.Tensor = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise DataError(f"data set {self.name!r} must have at least one class, got none")
        for split in SPLITS:
            images = _checked_images(f"{split}_images", getattr(self, f"{split}_images"))
            labels = _checked_labels(f"{split}_labels", getattr(self, f"{split}_labels"), images)
            _check_label_range(f"{split}_labels", labels, len(self.classes))
            setattr(self, f"{split}_images", images)
            setattr(self, f"{split}_labels", labels)
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(
                f"test_images must have the train image shape {tuple(self.train_images.shape[1:])}"
                f" (C x H x W), got {tuple(self.test_images.shape[1:])}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        """Image height in pixels, equal to the width whenever ``image_size`` was given to load."""
        return int(self.train_images.shape[2])

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the train images on the pixel / 255 scale."""
        return self._channel_stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel population standard deviation of the train images, pixel / 255 scale."""
        return self._channel_stats[1]

    @functools.cached_property
    def _channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return compute_channel_stats(self.train_images)


def compute_channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Compute the per-channel mean and population std of uint8 N x C x H x W images / 255.

    Sums are accumulated in float64 chunk by chunk. Sums of uint8 values and of their squares
    stay exact integers in float64 below 2**53, which takes about 1.3e8 images of 32x32 pixels.
    """
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], STATS_CHUNK_IMAGES):
        chunk = images[start : start + STATS_CHUNK_IMAGES].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_squares += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    variance = (total_squares / count - mean.square()).clamp(min=0.0)
    mean_tuple = tuple(float(value) / 255.0 for value in mean)
    std_tuple = tuple(float(value) / 255.0 for value in variance.sqrt())
    return mean_tuple, std_tuple


def _checked_images(field: str, images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise DataError(f"{field} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise DataError(f"{field} must have dtype torch.uint8, got {images.dtype}")
    if images.dim() != 4:
        raise DataError(f"{field} must have shape N x C x H x W, got {tuple(images.shape)}")
    return images.contiguous()


def _checked_labels(field: str, labels: object, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{field} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise DataError(f"{field} must have dtype torch.int64, got {labels.dtype}")
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"{field} must have shape ({images.shape[0]},) to match the images,"
            f" got {tuple(labels.shape)}"
        )
    return labels.contiguous()


def _check_label_range(field: str, labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"{field} must be in [0, {num_classes - 1}], got {bad}")


# ----------------------------------------------------------------------------------------------
# Entry point


def load_dataset(
    data: str,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a built-in data set or an image-folder tree or archive into memory.

    ``data`` is ``digits``, ``cifar10``, ``cifar100`` or a path. A relative path is looked up in
    ``data_dir`` first when ``data_dir`` is given. With ``image_size``, every image is resized so
    that its shorter side is ``image_size`` (bilinear) and centre-cropped to a square. Decoded
    path-based data sets are cached in ``cache_dir`` (default: ``default_cache_dir()``).

    Raises ConfigError for invalid arguments and DataError for data that cannot be read.
    """
    data = os.fspath(data)
    if image_size is not None:
        check_positive_int("image_size", image_size)
    if data == "digits":
        return _resized(load_digits(), image_size)
    if data in ("cifar10", "cifar100"):
        if data_dir is None:
            raise ConfigError(f"--data-dir is required for data {data!r}, got none")
        return _resized(load_cifar(data, data_dir), image_size)
    path = _resolve_data_path(data, data_dir)
    return _load_path_dataset(path, cache_dir, image_size)


def _resolve_data_path(data: str, data_dir: str | None) -> Path:
    path = Path(data)
    if data_dir is not None and not path.is_absolute():
        candidate = Path(data_dir) / path
        if candidate.exists():
            return candidate
    if path.exists():
        return path
    builtins = ", ".join(BUILTIN_DATASETS)
    looks_like_name = "/" not in data and "\\" not in data and "." not in data
    if looks_like_name:
        # A bare word that is no file is a misspelt data set name, so it is an option error.
        import difflib

        close = difflib.get_close_matches(data, BUILTIN_DATASETS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--data must be one of {builtins} or a path, got {data!r}{hint}")
    where = f" (looked in the working directory and in data_dir {data_dir})" if data_dir else ""
    raise DataError(
        f"--data path not found: {data}{where}; --data must be one of {builtins}, an image-folder"
        " tree or a tar archive of one"
    )


# ----------------------------------------------------------------------------------------------
# Built-in data sets


def load_digits() -> ImageDataset:
    """Load scikit-learn's 8x8 digits as uint8 images with a fixed, class-balanced 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    # Values are integers 0..16. np.rint rounds half to even like Python's round().
    pixels = np.rint(bunch.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_index, test_index = _digits_split(bunch.target)
    return ImageDataset(
        name="digits",
        classes=[str(digit) for digit in range(10)],
        train_images=images[train_index].contiguous(),
        train_labels=labels[train_index].contiguous(),
        test_images=images[test_index].contiguous(),
        test_labels=labels[test_index].contiguous(),
    )


def _digits_split(targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Return sorted train and test indices, with round(20%) of every class in the test split."""
    generator = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_parts = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        test_count = round(len(members) * DIGITS_TEST_FRACTION)
        test_parts.append(generator.permutation(members)[:test_count])
    is_test = np.zeros(len(targets), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    train_index = torch.from_numpy(np.flatnonzero(~is_test))
    test_index = torch.from_numpy(np.flatnonzero(is_test))
    return train_index, test_index


class _CifarLayout(NamedTuple):
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{index}" for index in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}

CIFAR_IMAGE_SHAPE = (3, 32, 32)


def load_cifar(name: str, data_dir: str) -> ImageDataset:
    """Load the python-pickle release of CIFAR-10 or CIFAR-100 from ``data_dir``.

    ``data_dir`` is the folder with the batch files or its parent. NOTE: unpickling can run
    arbitrary code, as with any pickle file, so load only CIFAR folders from a trusted source.
    """
    layout = CIFAR_LAYOUTS[name]
    folder = _cifar_folder(Path(data_dir), layout.folder)
    classes = _cifar_class_names(folder / layout.meta_file, layout.names_key)
    train = [_read_cifar_batch(folder / file, layout.label_key) for file in layout.train_files]
    test_images, test_labels = _read_cifar_batch(folder / layout.test_file, layout.label_key)
    return ImageDataset(
        name=name,
        classes=classes,
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
    )


def _cifar_folder(data_dir: Path, folder_name: str) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"data_dir must be an existing folder, got {data_dir}")
    nested = data_dir / folder_name
    return nested if nested.is_dir() else data_dir


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            content = pickle.load(file, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"CIFAR file not found: {path}") from None
    # A damaged pickle can fail in any of these ways, depending on where the damage is.
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        TypeError,
    ) as error:
        raise DataError(f"cannot read CIFAR file {path}: {error}") from error
    if not isinstance(content, dict):
        raise DataError(f"CIFAR file {path} must contain a dict, got {type(content).__name__}")
    return content


def _required_key(content: dict, key: bytes, path: Path) -> object:
    if key not in content:
        raise DataError(f"CIFAR file {path} has no {key.decode()!r} entry")
    return content[key]


def _cifar_class_names(path: Path, names_key: bytes) -> list[str]:
    names = _required_key(_read_pickle(path), names_key, path)
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    content = _read_pickle(path)
    rows = np.asarray(_required_key(content, b"data", path))
    labels = np.asarray(_required_key(content, label_key, path), dtype=np.int64)
    row_length = math.prod(CIFAR_IMAGE_SHAPE)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != row_length:
        raise DataError(
            f"CIFAR file {path} must have uint8 data of shape N x {row_length},"
            f" got {rows.dtype} {rows.shape}"
        )
    if labels.shape != (rows.shape[0],):
        raise DataError(
            f"CIFAR file {path} must have {rows.shape[0]} labels, one per image, got {labels.size}"
        )
    # Each row contains the red, then the green, then the blue 32x32 plane, in row-major order.
    images = torch.from_numpy(rows.reshape(-1, *CIFAR_IMAGE_SHAPE).copy())
    return images, torch.from_numpy(labels)


def _resized(dataset: ImageDataset, image_size: int | None) -> ImageDataset:
    if image_size is None:
        return dataset
    return dataclasses.replace(
        dataset,
        train_images=_resize_tensor_images(dataset.train_images, image_size),
        test_images=_resize_tensor_images(dataset.test_images, image_size),
    )


def _resize_tensor_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize N x C x H x W uint8 images with the same Pillow steps as decoded image files."""
    if images.shape[2] == size and images.shape[3] == size:
        return images
    pixels = images.permute(0, 2, 3, 1).numpy()
    grayscale = images.shape[1] == 1
    resized = []
    for image in pixels:
        picture = Image.fromarray(image[:, :, 0] if grayscale else image)
        array = np.asarray(_resize_and_center_crop(picture, size))
        resized.append(array[:, :, None] if grayscale else array)
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()


def _resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` (bilinear) and crop the centre ``size`` x ``size``."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_width = max(size, round(width * scale))
    new_height = max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.BILINEAR)
    left = (new_width - size) // 2
    top = (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------
# Image-folder trees and archives


class _ImageFile(NamedTuple):
    """One image of a tree or archive, before decoding."""

    source: str  # file path or "archive:member", for error messages
    relative: tuple[str, ...]  # path parts below the class folder, which set the order
    read: Callable[[], bytes]


# split -> class name -> image files
_Listing = dict[str, dict[str, list[_ImageFile]]]


def _load_path_dataset(path: Path, cache_dir: str | None, image_size: int | None) -> ImageDataset:
    cache_file = dataset_cache_path(path, image_size=image_size, cache_dir=cache_dir)
    cached = _read_cache(cache_file)
    if cached is not None:
        logger.info("loaded %s from cache %s", path, cache_file)
        return cached
    started = time.perf_counter()
    listing = _list_tree(path) if path.is_dir() else _list_archive(path)
    dataset = _decode_listing(_dataset_name(path), listing, image_size)
    logger.info(
        "decoded %d images from %s in %.1f s",
        len(dataset.train_labels) + len(dataset.test_labels),
        path,
        time.perf_counter() - started,
    )
    _write_cache(cache_file, dataset)
    return dataset


def _dataset_name(path: Path) -> str:
    name = path.resolve().name
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_hidden(name: str) -> bool:
    # Covers .DS_Store, ._* AppleDouble files and .git folders.
    return name.startswith(".")


def _list_tree(path: Path) -> _Listing:
    root = _tree_root(path)
    listing: _Listing = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"no {split}/ folder in {root} (expected {split}/<class>/<image>)")
        listing[split] = _list_tree_split(split_dir)
    check_class_folders(listing, str(root))
    return listing


def _tree_root(path: Path) -> Path:
    """Return ``path`` or, when it has no split folder, its only visible subfolder if that has one."""
    if any((path / split).is_dir() for split in SPLITS):
        return path
    subfolders = [entry for entry in path.iterdir() if entry.is_dir() and not _is_hidden(entry.name)]
    if len(subfolders) == 1 and any((subfolders[0] / split).is_dir() for split in SPLITS):
        return subfolders[0]
    return path


def _list_tree_split(split_dir: Path) -> dict[str, list[_ImageFile]]:
    classes: dict[str, list[_ImageFile]] = {}
    for entry in sorted(split_dir.iterdir()):
        if _is_hidden(entry.name):
            continue
        if not entry.is_dir():
            raise DataError(f"file {entry} must be inside a class folder of {split_dir}")
        files = _list_tree_files(entry)
        if not files:
            raise DataError(f"class folder {entry} contains no images")
        classes[entry.name] = files
    return classes


def _list_tree_files(class_dir: Path) -> list[_ImageFile]:
    files = []
    for folder, subfolders, names in os.walk(class_dir):
        subfolders[:] = [name for name in subfolders if not _is_hidden(name)]
        for name in names:
            if _is_hidden(name):
                continue
            file_path = Path(folder) / name
            relative = file_path.relative_to(class_dir).parts
            files.append(_ImageFile(str(file_path), relative, file_path.read_bytes))
    return sorted(files, key=lambda image_file: image_file.relative)


def check_class_folders(listing: dict, source: str) -> None:
    """Raise DataError unless train/ and test/ hold the same, non-empty set of class folders."""
    for split in SPLITS:
        other = SPLITS[1 - SPLITS.index(split)]
        missing = sorted(set(listing[split]) - set(listing[other]))
        if missing:
            listed = ", ".join(missing[:5])
            if len(missing) > 5:
                listed += f" and {len(missing) - 5} more"
            raise DataError(
                f"class folders in {source}/{split} are missing from {source}/{other}: {listed}"
            )
    if not listing["train"]:
        raise DataError(f"no class folders in {source}/train (expected train/<class>/<image>)")


# Archives


class _CountingReader:
    """Read-only file wrapper that counts the bytes read and keeps the most recent ones.

    Python's tarfile (checked on 3.11) stops without an error when the data ends at a member
    header, so a copy cut at a 512-byte boundary would load as a smaller data set. The count and the kept bytes let the
    reader check for the two zero blocks that end every complete tar archive.
    """

    def __init__(self, fileobj, keep: int = 1 << 16) -> None:
        self._fileobj = fileobj
        self._keep = keep
        self._tail = bytearray()
        self._tail_start = 0
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._fileobj.read(size)
        self.position += len(chunk)
        self._tail += chunk
        excess = len(self._tail) - self._keep
        if excess > 0:
            del self._tail[:excess]
            self._tail_start += excess
        return chunk

    def read_to_end(self) -> None:
        # Reading the rest also makes gzip, bz2 and lzma check their end-of-stream trailer.
        while self.read(1 << 16):
            pass

    def has_end_marker(self, offset: int) -> bool:
        end = offset + 2 * tarfile.BLOCKSIZE
        if self.position < end:
            return False
        start = offset - self._tail_start
        if start < 0:
            # NOTE: more than `keep` bytes follow the marker, so only its length was checked.
            return True
        return not any(self._tail[start : start + 2 * tarfile.BLOCKSIZE])


def _open_decompressed(raw):
    """Wrap ``raw`` in the decompressor its magic bytes name: gzip, bzip2, xz or none."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def _list_archive(path: Path) -> _Listing:
    members, directories = _read_archive(path)
    prefix = _archive_root(list(members) + directories)
    listing: _Listing = {split: {} for split in SPLITS}
    for parts in directories:
        inner = parts[len(prefix) :]
        if parts[: len(prefix)] == prefix and len(inner) >= 2 and inner[0] in SPLITS:
            listing[inner[0]].setdefault(inner[1], [])
    for parts, content in members.items():
        _add_archive_member(listing, path, prefix, parts, content)
    source = f"{path}:{'/'.join(prefix)}" if prefix else str(path)
    _check_archive_listing(listing, source)
    for classes in listing.values():
        for files in classes.values():
            files.sort(key=lambda image_file: image_file.relative)
    return {split: dict(sorted(listing[split].items())) for split in SPLITS}


def _add_archive_member(
    listing: _Listing, path: Path, prefix: tuple[str, ...], parts: tuple[str, ...], content: bytes
) -> None:
    inner = parts[len(prefix) :]
    if parts[: len(prefix)] != prefix or not inner or inner[0] not in SPLITS:
        return  # files next to the split folders, such as a README, are not images
    member = "/".join(parts)
    if len(inner) < 3:
        raise DataError(f"member {member} of {path} must be inside a class folder of {inner[0]}/")
    listing[inner[0]].setdefault(inner[1], []).append(
        _ImageFile(f"{path}:{member}", inner[2:], lambda: content)
    )


def _check_archive_listing(listing: _Listing, source: str) -> None:
    for split in SPLITS:
        if not listing[split]:
            raise DataError(
                f"no {split}/<class>/ folders in {source} (expected {split}/<class>/<image>)"
            )
        for name, files in listing[split].items():
            if not files:
                raise DataError(f"class folder {split}/{name} in {source} contains no images")
    check_class_folders(listing, source)


def _archive_root(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Return the folder parts above train/ and test/: none, or the archive's only top folder."""
    top_names = {parts[0] for parts in paths}
    if top_names & set(SPLITS) or len(top_names) != 1:
        return ()
    (top,) = top_names
    if any(len(parts) > 1 and parts[1] in SPLITS for parts in paths):
        return (top,)
    return ()


def _read_archive(path: Path) -> tuple[dict[tuple[str, ...], bytes], list[tuple[str, ...]]]:
    """Read every regular file of a tar archive into memory, streaming, without extracting.

    Returns the contents keyed by path parts, and the directory members. NOTE: all member bytes
    stay in memory until decoding, an estimated 60 MB for the JPEG-encoded CIFAR-10.
    """
    members: dict[tuple[str, ...], bytes] = {}
    directories: list[tuple[str, ...]] = []
    try:
        with open(path, "rb") as raw, _open_decompressed(raw) as stream:
            reader = _CountingReader(stream)
            with tarfile.open(fileobj=reader, mode="r|") as archive:
                for member in archive:
                    parts = _member_parts(member, path)
                    if parts is None:
                        continue
                    if member.isdir():
                        directories.append(parts)
                    else:
                        members[parts] = archive.extractfile(member).read()
                end_offset = archive.offset
            reader.read_to_end()
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as error:
        raise DataError(
            f"cannot read {path} as a tar archive (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz): {error}"
        ) from error
    if not reader.has_end_marker(end_offset):
        raise DataError(f"tar archive {path} is truncated: it ends without the end-of-archive marker")
    return members, directories


def _member_parts(member: tarfile.TarInfo, path: Path) -> tuple[str, ...] | None:
    """Return a member's path parts, or None for a hidden member.

    Raises DataError for an absolute path, a '..' part, a link or a special file, which could
    point outside the data set.
    """
    name = member.name
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/") or ".." in parts:
        raise DataError(f"unsafe member {name} in {path}: paths must be relative and without '..'")
    if member.issym() or member.islnk():
        raise DataError(f"link member {name} in {path} rejected: links could point outside the data set")
    if not (member.isreg() or member.isdir()):
        raise DataError(f"member {name} in {path} must be a regular file or a folder")
    if not parts or any(_is_hidden(part) for part in parts):
        return None
    return parts


# Decoding


def _decode_listing(name: str, listing: _Listing, image_size: int | None) -> ImageDataset:
    classes = list(listing["train"])
    arrays: dict[str, list[np.ndarray]] = {}
    labels: dict[str, torch.Tensor] = {}
    first: tuple[str, tuple[int, ...]] | None = None
    for split in SPLITS:
        arrays[split] = []
        split_labels = []
        for label, class_name in enumerate(classes):
            for image_file in listing[split][class_name]:
                array = _decode_image(image_file, image_size)
                first = first or (image_file.source, array.shape)
                _check_same_size(first, image_file.source, array.shape)
                arrays[split].append(array)
                split_labels.append(label)
        labels[split] = torch.tensor(split_labels, dtype=torch.int64)
    return ImageDataset(
        name=name,
        classes=classes,
        train_images=_to_tensor(arrays["train"]),
        train_labels=labels["train"],
        test_images=_to_tensor(arrays["test"]),
        test_labels=labels["test"],
    )


def _decode_image(image_file: _ImageFile, image_size: int | None) -> np.ndarray:
    """Decode one image file to an H x W x 3 uint8 RGB array."""
    try:
        content = image_file.read()
    except OSError as error:
        raise DataError(f"cannot read image {image_file.source}: {error}") from error
    try:
        with Image.open(io.BytesIO(content)) as image:
            picture = image.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image {image_file.source}: not an image format that Pillow reads") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image {image_file.source}: {error}") from error
    if image_size is not None:
        picture = _resize_and_center_crop(picture, image_size)
    return np.asarray(picture)


def _check_same_size(first: tuple[str, tuple[int, ...]], source: str, shape: tuple[int, ...]) -> None:
    first_source, first_shape = first
    if shape != first_shape:
        raise DataError(
            f"images must all have one size, but {first_source} is"
            f" {first_shape[1]}x{first_shape[0]} and {source} is {shape[1]}x{shape[0]} (W x H)."
            " Set image_size (--image-size) to resize them to one size"
        )


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Cache of decoded data sets


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/cyclical-training``, or ``~/.cache/cyclical-training``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cyclical-training"


def dataset_cache_path(
    path: str | os.PathLike, image_size: int | None = None, cache_dir: str | None = None
) -> Path:
    """Return the cache file for the decoded data set at ``path``.

    The key covers the absolute path, the size (or file count of a tree) and the newest
    modification time, ``image_size`` and ``CACHE_FORMAT_VERSION``, so any change to the data
    gives a new file name.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    size, mtime_ns = _tree_fingerprint(path) if path.is_dir() else _file_fingerprint(path)
    key = json.dumps(
        [CACHE_FORMAT_VERSION, os.path.abspath(path), size, mtime_ns, image_size]
    ).encode()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{hashlib.sha256(key).hexdigest()}.pt"


def _file_fingerprint(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _tree_fingerprint(path: Path) -> tuple[int, int]:
    """Return the file count and the newest mtime_ns of the files and folders under ``path``."""
    # Folder times change when entries are added, removed or renamed, so they count too.
    newest = path.stat().st_mtime_ns
    count = 0
    for folder, subfolders, names in os.walk(path):
        for name in subfolders + names:
            # A dangling link must reach the image reader, which names it, not fail here.
            newest = max(newest, os.stat(os.path.join(folder, name), follow_symlinks=False).st_mtime_ns)
        count += len(names)
    return count, newest


def _read_cache(cache_file: Path) -> ImageDataset | None:
    """Return the cached data set, or None when the file is missing, damaged or outdated."""
    if not cache_file.is_file():
        return None
    try:
        payload = torch.load(cache_file, weights_only=True)
        return _dataset_from_payload(payload)
    # torch.load raises many exception types for a damaged file (KeyError, RuntimeError,
    # EOFError, UnpicklingError, ...), and any of them only means the data is decoded again.
    except Exception as error:  # noqa: BLE001
        logger.warning("ignoring unreadable cache file %s: %s", cache_file, error)
        return None


def _dataset_from_payload(payload: object) -> ImageDataset:
    if not isinstance(payload, dict) or set(payload) != set(CACHE_KEYS):
        raise DataError("cache file does not contain the expected entries")
    if payload["format_version"] != CACHE_FORMAT_VERSION:
        raise DataError(
            f"cache format must be {CACHE_FORMAT_VERSION}, got {payload['format_version']!r}"
        )
    fields = {key: value for key, value in payload.items() if key != "format_version"}
    return ImageDataset(**fields)


def _write_cache(cache_file: Path, dataset: ImageDataset) -> None:
    """Write the cache atomically, so a crash or a second process never leaves a partial file."""
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "name": dataset.name,
        "classes": list(dataset.classes),
        "train_images": dataset.train_images,
        "train_labels": dataset.train_labels,
        "test_images": dataset.test_images,
        "test_labels": dataset.test_labels,
    }
    temporary = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=cache_file.parent, prefix=f".{cache_file.stem}.", suffix=".tmp"
        )
        with os.fdopen(descriptor, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, cache_file)
        temporary = None
    except OSError as error:
        # A cache that cannot be written only costs the next run a decode.
        logger.warning("could not write cache file %s: %s", cache_file, error)
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)


# ----------------------------------------------------------------------------------------------
# Subsets and batches


def balanced_subset(
    labels: torch.Tensor, size: int, seed: int, *, name: str = "train_size"
) -> torch.Tensor:
    """Return sorted int64 indices of a class-balanced subset of ``size`` samples.

    Each of the K classes present in ``labels`` gets ``size // K`` samples, and ``size % K``
    classes picked at random get one more. The same ``seed`` always gives the same subset.
    ``name`` is the option that set ``size``, for error messages.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ConfigError(f"labels must be a 1-D tensor, got {_describe(labels)}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(labels):
        raise ConfigError(f"{name} must be between 1 and {len(labels)}, got {size!r}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    shares = torch.full((len(classes),), size // len(classes), dtype=torch.int64)
    shares[torch.randperm(len(classes), generator=generator)[: size % len(classes)]] += 1
    chosen = []
    for class_label, share in zip(classes.tolist(), shares.tolist()):
        members = torch.nonzero(labels == class_label).squeeze(1)
        if len(members) < share:
            raise ConfigError(
                f"{name} {size} needs {share} samples of class {class_label},"
                f" but the class has only {len(members)}"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:share]])
    return torch.cat(chosen).sort().values


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def steps_per_epoch(num_samples: int, batch_size: int, drop_last: bool = False) -> int:
    """Return the batches in one epoch: ceil(num_samples / batch_size), floor with ``drop_last``."""
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    if drop_last:
        if batch_size > num_samples:
            raise ConfigError(
                f"batch_size must be <= {num_samples} (the number of samples) when drop_last"
                f" is set, got {batch_size}"
            )
        return num_samples // batch_size
    return -(-num_samples // batch_size)


class BatchLoader:
    """Batches of an in-memory data set, drawn with tensor indexing on ``device``.

    The whole data set is moved to ``device`` once. When ``shuffle`` is set, the sample order of
    an epoch is ``torch.randperm(N)`` with a generator seeded by ``seed * 1_000_003 + epoch``, a
    pure function of seed and epoch, so a resumed run gets the same order without saved state.
    Images stay uint8 and labels int64.

    ``batch_size`` is the global batch. With ``world_size > 1``, every global batch is split into
    ``world_size`` contiguous chunks (sizes differ by at most one) and rank ``r`` yields chunk
    ``r``. All ranks see the same order, so every rank yields the same number of batches and each
    sample goes to one rank only. Each sample is used once per epoch, except for samples in a
    final global batch that ``drop_last`` drops or that has fewer samples than ``world_size``,
    which is always dropped so that no rank gets an empty batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_loader_tensors(images, labels)
        check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be between 0 and {world_size - 1}, got {rank!r}")
        check_positive_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.set_epoch(0, batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch_size(self) -> int:
        """Global batch size of the current epoch, summed over all ranks."""
        return self._batch_size

    def set_epoch(self, epoch: int, batch_size: int | None = None) -> None:
        """Select the sample order of ``epoch`` and, when given, a new global batch size."""
        check_positive_int("epoch", epoch, minimum=0)
        if batch_size is not None:
            self._check_batch_size(batch_size)
            self._batch_size = batch_size
        self._epoch = epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        self._order = order.to(self.device)

    def _check_batch_size(self, batch_size: int) -> None:
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

    def __len__(self) -> int:
        full_batches, remainder = divmod(self.num_samples, self._batch_size)
        keeps_last = not self.drop_last and remainder >= self.world_size
        return full_batches + int(keeps_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in range(len(self)):
            start = index * self._batch_size
            global_batch = self._order[start : start + self._batch_size]
            local = torch.tensor_split(global_batch, self.world_size)[self.rank]
            yield self.images.index_select(0, local), self.labels.index_select(0, local)


def _check_loader_tensors(images: object, labels: object) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() < 1 or images.shape[0] < 1:
        raise ConfigError(f"images must be a tensor with at least one sample, got {_describe(images)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
        raise ConfigError(
            f"labels must be a 1-D tensor of length {images.shape[0]} to match the images,"
            f" got {_describe(labels)}"
        )
