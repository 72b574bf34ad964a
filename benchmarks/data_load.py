"""Seconds to load an image archive the first time (decode and write the cache) and later times.

Each first load uses a fresh temporary cache folder, so it lists the archive, decodes every
image and writes the decoded tensors to the cache. The later loads that follow it in the same
folder read only that cache file. First and later loads alternate: with ``--first-loads 2``
the order is first, later x ``--later-loads``, first, later x ``--later-loads``. The archive
and the cache file are read through the operating system's page cache, which is warm after the
first read, so the times are for a warm page cache.

    python benchmarks/data_load.py                 # CIFAR-10 JPEG archive, about 1-2 minutes
    python benchmarks/data_load.py --quick         # a generated archive of 200 images, seconds
"""

from __future__ import annotations

import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import (
    CIFAR_ARCHIVE, base_parser, command_line, machine_info, print_table, result_path, write_result,
)
from cyclical_training.data import dataset_cache_path, load_dataset

QUICK_CLASSES, QUICK_TRAIN_PER_CLASS, QUICK_TEST_PER_CLASS = 4, 40, 10


def parse_args():
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=CIFAR_ARCHIVE, help=f"archive or image-folder tree (default: {CIFAR_ARCHIVE})")
    parser.add_argument("--first-loads", type=int, default=2, help="first loads, each into a fresh cache (default 2)")
    parser.add_argument("--later-loads", type=int, default=5, help="later loads after each first load (default 5)")
    args = parser.parse_args()
    if args.quick:
        args.first_loads, args.later_loads = 1, 2
    return args


def write_quick_archive(folder: Path, seed: int) -> Path:
    """Write a .tar.gz of small random 32x32 JPEGs in the train/<class>/ and test/<class>/ layout."""
    rng = np.random.default_rng(seed)
    path = folder / "quick-images.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for split, count in (("train", QUICK_TRAIN_PER_CLASS), ("test", QUICK_TEST_PER_CLASS)):
            for class_index in range(QUICK_CLASSES):
                for image_index in range(count):
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG")
                    member = tarfile.TarInfo(f"{split}/class{class_index}/{image_index:04d}.jpg")
                    member.size = buffer.tell()
                    buffer.seek(0)
                    archive.addfile(member, buffer)
    return path


def timed_load(data: str, cache_dir: str) -> tuple[float, int]:
    """Load the data set and return the seconds taken and the number of images."""
    started = time.perf_counter()
    dataset = load_dataset(data, cache_dir=cache_dir)
    seconds = time.perf_counter() - started
    return seconds, len(dataset.train_labels) + len(dataset.test_labels)


def main() -> None:
    args = parse_args()
    machine = machine_info(torch.device("cpu"))
    first, later = [], []
    with tempfile.TemporaryDirectory(prefix="gct-data-load-") as work:
        data = str(write_quick_archive(Path(work), args.seed)) if args.quick else args.data
        images = cache_bytes = None
        for round_index in range(args.first_loads):
            cache_dir = tempfile.mkdtemp(prefix=f"cache{round_index}-", dir=work)
            seconds, images = timed_load(data, cache_dir)
            first.append(seconds)
            print(f"first load {round_index + 1}: {seconds:.3f} s")
            cache_bytes = dataset_cache_path(data, cache_dir=cache_dir).stat().st_size
            for _ in range(args.later_loads):
                seconds, _ = timed_load(data, cache_dir)
                later.append(seconds)
                print(f"  later load: {seconds:.3f} s")

    first_median, later_median = statistics.median(first), statistics.median(later)
    payload = {
        "benchmark": "data_load",
        "quick": args.quick,
        "machine": machine,
        "command": command_line(),
        "data": "generated archive of random JPEGs" if args.quick else args.data,
        "archive_bytes": Path(data).stat().st_size if not args.quick else None,
        "images": images,
        "cache_file_bytes": cache_bytes,
        "first_load_s": first,
        "later_load_s": later,
        "first_load_median_s": first_median,
        "later_load_median_s": later_median,
        "speedup_later_over_first": first_median / later_median,
        "target": {"speedup_min": 10.0, "met": first_median / later_median >= 10.0},
    }
    write_result(result_path(args.out, "data_load", args.quick), payload)
    print_table(
        ("load", "median s", "all s"),
        [("first (decode and write cache)", first_median, ", ".join(f"{value:.3f}" for value in first)),
         ("later (read cache)", later_median, ", ".join(f"{value:.3f}" for value in later))],
    )
    verdict = "met" if payload["target"]["met"] else "missed"
    print(f"later load is {payload['speedup_later_over_first']:.1f}x faster than the first; target >= 10x: {verdict}")


if __name__ == "__main__":
    main()
