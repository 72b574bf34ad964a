"""Helpers shared by the benchmark scripts: device choice, step timing, result files, tables.

Each script in this folder imports this module by name, which works because Python puts the
script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from cyclical_training import __version__
from cyclical_training.data import ImageDataset

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The shared data folder sits beside the repository checkout.
CIFAR_ARCHIVE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------------
# command line and result files


def base_parser(description: str) -> argparse.ArgumentParser:
    """Return a parser with the options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes for a smoke run of a few seconds; the numbers mean nothing",
    )
    parser.add_argument(
        "--out", default=str(RESULTS_DIR),
        help=f"folder for the JSON result file (default: {RESULTS_DIR})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights and augmentation (default 0)")
    return parser


def command_line() -> str:
    """Return the command that started this script, with its arguments, as a shell would show it."""
    return shlex.join(["python", *sys.argv])


def result_path(out_dir: str | os.PathLike, name: str, quick: bool) -> Path:
    """Return ``out_dir/name.json``, or ``name.quick.json`` so a smoke run never replaces a real result."""
    suffix = ".quick.json" if quick else ".json"
    return Path(out_dir) / f"{name}{suffix}"


def write_result(path: Path, payload: dict) -> None:
    """Write the payload as JSON, adding the load average at the end of the run to its machine."""
    if "machine" in payload:
        payload["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print rows as a Markdown table, so the output can be pasted into the docs."""
    text_rows = [[_cell(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in text_rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
    print("| " + " | ".join(header.ljust(width) for header, width in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in text_rows:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# machine


def machine_info(device: torch.device) -> dict:
    """Describe the hardware and software a result was measured on."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "torch": torch.__version__,
        "cyclical_training": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "git_commit": git_commit(),
        # Thread settings read by OpenMP and MKL when torch starts.
        "environment": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["precision"] = "bf16 autocast"
    else:
        info["precision"] = "fp32"
    return info


def git_commit() -> str:
    """Return the checked-out commit, with ``+modified`` when files under src/ differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+modified" if changes else "")


def cpu_model_name() -> str:
    """Return the CPU model name as ``lscpu`` prints it, read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# NOTE: the CUDA branches in this folder (device choice, bf16 autocast, CUDA-event timing) have
# never run, because no GPU was available where the benchmarks were written.
def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device):
    """Return bf16 autocast on CUDA and a no-op context on the CPU, matching ``precision`` below."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def precision_for(device: torch.device) -> str:
    """Return the ``TrainConfig.precision`` that matches ``autocast_for``."""
    return "bf16" if device.type == "cuda" else "fp32"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# timing


class StepTimer:
    """Timestamps between training steps, with CUDA events on a GPU and ``perf_counter`` on a CPU.

    ``mark()`` is called before the first step and after every step, so n steps give n + 1
    marks and ``durations()`` returns n step times in seconds. On a GPU the events measure the
    stream, so a step that is waiting for the host still counts in full.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) / 1000.0 for start, end in zip(self._marks, self._marks[1:])]
        return [end - start for start, end in zip(self._marks, self._marks[1:])]


class TimedBatches:
    """Wrap an iterable of batches so that each step of the loop that consumes it is timed.

    The loop requests the next batch when it has finished a step, so the time between two
    requests is one step including the fetch of its batch. ``len()`` is passed through for
    ``Trainer.train_epoch``, which sizes its progress bar with it.
    """

    def __init__(self, batches, timer: StepTimer, length: int | None = None) -> None:
        self.batches = batches
        self.timer = timer
        self.length = len(batches) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator:
        self.timer.mark()
        for index, batch in enumerate(self.batches):
            if index == self.length:
                break
            yield batch
            self.timer.mark()


def time_per_call(function: Callable[[], object], calls: int, blocks: int, device: torch.device) -> list[float]:
    """Return the mean time of one call in each of ``blocks`` blocks of ``calls`` calls, in seconds.

    Timing blocks rather than single calls keeps the timer's own cost and resolution out of
    calls that take microseconds.
    """
    results = []
    for _ in range(blocks):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(calls):
            function()
        synchronize(device)
        results.append((time.perf_counter() - started) / calls)
    return results


def summarize(times: Sequence[float]) -> dict:
    """Return the median, quartiles, mean, minimum and count of times in seconds."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        quartiles = statistics.quantiles(ordered, n=4)
    else:
        quartiles = [ordered[0], ordered[0], ordered[0]]
    return {
        "median_s": statistics.median(ordered),
        "p25_s": quartiles[0],
        "p75_s": quartiles[2],
        "mean_s": statistics.fmean(ordered),
        "min_s": ordered[0],
        "count": len(ordered),
    }


def rotated(names: Sequence[str], repeat: int) -> list[str]:
    """Return ``names`` rotated by ``repeat``, so each variant runs first in some repeat."""
    shift = repeat % len(names)
    return list(names[shift:]) + list(names[:shift])


# ---------------------------------------------------------------------------------------------
# data


def random_dataset(train_images: int, test_images: int, seed: int, image_size: int = 32,
                   num_classes: int = 10) -> ImageDataset:
    """Build an in-memory data set of uniform random uint8 RGB images with random labels.

    Speed does not depend on pixel values, so this replaces CIFAR-10 where only time is
    measured.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (3, image_size, image_size)
    return ImageDataset(
        name="random-uint8",
        classes=[f"class{index}" for index in range(num_classes)],
        train_images=torch.randint(0, 256, (train_images, *shape), dtype=torch.uint8, generator=generator),
        train_labels=torch.randint(0, num_classes, (train_images,), generator=generator),
        test_images=torch.randint(0, 256, (test_images, *shape), dtype=torch.uint8, generator=generator),
        test_labels=torch.randint(0, num_classes, (test_images,), generator=generator),
    )


def plain_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> Iterator:
    """Yield shuffled batches by hand: one ``randperm`` and one ``index_select`` per batch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    for start in range(0, len(labels) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield images.index_select(0, index), labels.index_select(0, index)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters the usual way: weights of 2 or more dims decay, biases and norms do not."""
    decay = [parameter for parameter in model.parameters() if parameter.ndim >= 2]
    no_decay = [parameter for parameter in model.parameters() if parameter.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
