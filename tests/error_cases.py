"""Bad inputs of the gct command line, each with the exact line a user sees on standard error.

This table is the source of truth for tests/test_errors.py, which runs every case, and for
docs/errors.md, which is rendered from it (``python tests/test_errors.py --write-docs``).
``<tmp>`` in arguments and messages stands for the case's temporary folder, which is also the
working directory while the case runs.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

BAD_OPTION = 2
RUN_FAILURE = 1

GROUPS = ("Options", "Config files", "Data", "Checkpoints", "Untrusted files", "Run time")


@dataclass(frozen=True)
class KnownGap:
    """The status and message a case should have once a fix lands in another module."""

    status: int
    message: str
    fix: str


@dataclass(frozen=True)
class ErrorCase:
    """One bad input: the command, its exit status and its one line on standard error."""

    name: str
    group: str
    problem: str
    arguments: tuple[str, ...]
    status: int
    message: str
    setup: Callable[[Path, "SharedRuns"], None] | None = None
    # A file, relative to <tmp>, that a payload in the input would create if it ran.
    forbidden: str | None = None
    gap: KnownGap | None = None

    @property
    def command(self) -> str:
        return "gct " + " ".join(self.arguments)


class SharedRuns:
    """Finished training runs that several cases copy, trained once per test session."""

    def __init__(self, folder: Path, train: Callable[[list[str]], None]) -> None:
        self.folder = folder
        self.train = train
        self._digits_run: Path | None = None

    def digits_run(self) -> Path:
        """Return the folder of a one-epoch digits run with a complete checkpoint.pt."""
        if self._digits_run is None:
            run = self.folder / "digits-run"
            self.train(["train", "--epochs", "1", "--batch-size", "256", "--num-threads", "1", "--out", str(run)])
            self._digits_run = run
        return self._digits_run


# Messages whose values are known only at run time, for tests/test_faults.py and the docs.
INTERRUPT_KEPT = (
    "gct train: interrupted by {signal} during epoch {epoch} of {epochs}; {out} keeps the checkpoint of "
    "epoch {saved}; continue with: gct train --resume {out}"
)
INTERRUPT_NO_CHECKPOINT = (
    "gct train: interrupted by {signal} during epoch 1 of {epochs}; no epoch finished, so {out} has no "
    "checkpoint to resume from"
)
INTERRUPT_NO_OUT = (
    "gct train: interrupted by {signal} during epoch {epoch} of {epochs}; nothing was saved because --out "
    "was not given"
)
INTERRUPT_BEFORE_TRAINING = "gct train: interrupted by {signal} before training started"
LOCKED_CHECKPOINT = (
    "cannot write {folder}/checkpoint.pt: another process is writing it and has locked "
    "{folder}/.checkpoint.pt.tmp; give each run its own --out folder"
)
NONFINITE_WEIGHTS = (
    "checkpoint {folder}/checkpoint.pt was not written because model tensor '{tensor}' contains NaN or "
    "infinite values, so the previous checkpoint is kept; lower --lr or add --clip-norm"
)


def gct_command() -> list[str]:
    """Return the command that starts the installed ``gct`` console script."""
    script = Path(sys.executable).parent / "gct"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "cyclical_training"]


# Files -------------------------------------------------------------------------------------------


def write_png(path: Path, size: tuple[int, int] = (8, 8), seed: int = 0) -> None:
    """Write a PNG of random pixels (width x height), so that every channel has a non-zero std."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def png_bytes(size: tuple[int, int] = (8, 8), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3, size=(8, 8)) -> Path:
    """Write an image-folder tree root/{train,test}/<class>/<n>.png."""
    seed = 0
    for split in ("train", "test"):
        for name in classes:
            for index in range(per_class):
                seed += 1
                write_png(root / split / name / f"{index}.png", size=size, seed=seed)
    return root


def tar_bytes(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """Build an uncompressed tar archive from (name, kind, content) entries, with fixed times.

    ``kind`` is file, dir, symlink or hardlink; a link's content is its target.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, kind, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if kind == "file":
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
            if kind != "dir":
                info.linkname = content
            archive.addfile(info)
    return buffer.getvalue()


def tree_entries(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> list[tuple[str, str, bytes]]:
    entries = []
    seed = 0
    for split in ("train", "test"):
        for name in classes:
            for index in range(per_class):
                seed += 1
                entries.append((f"{split}/{name}/{index}.png", "file", png_bytes(seed=seed)))
    return entries


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def edit_checkpoint(run: Path, edit: Callable[[dict], None]) -> None:
    """Load run/checkpoint.pt, let ``edit`` change the state in place, and save it back."""
    path = run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def copy_digits_run(tmp: Path, shared: SharedRuns) -> Path:
    run = tmp / "run"
    shutil.copytree(shared.digits_run(), run)
    return run


class ShellPayload:
    """A pickled object that runs a shell command when unpickled by a loader that allows callables."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_cifar_folder(folder: Path, batches: tuple[str, ...]) -> None:
    """Write a fake CIFAR-10 python folder with batches.meta and the named batch files."""
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [f"class{index}".encode() for index in range(10)]}, file)
    for name in batches:
        batch = {b"data": np.zeros((10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)


# Setups ------------------------------------------------------------------------------------------


def setup_tree_without_train(tmp: Path, shared: SharedRuns) -> None:
    make_tree(tmp / "tree")
    shutil.rmtree(tmp / "tree" / "train")


def setup_class_missing_from_test(tmp: Path, shared: SharedRuns) -> None:
    make_tree(tmp / "tree")
    write_png(tmp / "tree" / "train" / "bird" / "0.png")


def setup_empty_class(tmp: Path, shared: SharedRuns) -> None:
    make_tree(tmp / "tree")
    (tmp / "tree" / "train" / "bird").mkdir()
    (tmp / "tree" / "test" / "bird").mkdir()


def setup_text_file(tmp: Path, shared: SharedRuns) -> None:
    make_tree(tmp / "tree")
    (tmp / "tree" / "train" / "cat" / "notes.txt").write_text("a note, not an image\n")


def setup_corrupt_image(tmp: Path, shared: SharedRuns) -> None:
    make_tree(tmp / "tree")
    (tmp / "tree" / "train" / "cat" / "3.png").write_bytes(png_bytes(size=(8, 8))[:60])


def setup_dangling_link(tmp: Path, shared: SharedRuns) -> None:
    make_tree(tmp / "tree")
    (tmp / "tree" / "train" / "cat" / "3.png").symlink_to(tmp / "moved.png")


def setup_mixed_sizes(tmp: Path, shared: SharedRuns) -> None:
    make_tree(tmp / "tree")
    write_png(tmp / "tree" / "train" / "dog" / "3.png", size=(12, 10))


def setup_truncated_gzip_archive(tmp: Path, shared: SharedRuns) -> None:
    data = gzip_bytes(tar_bytes(tree_entries()))
    (tmp / "data.tar.gz").write_bytes(data[: len(data) // 2])


def setup_archive_without_end(tmp: Path, shared: SharedRuns) -> None:
    # Cut exactly after the last member, before the two zero blocks that end a tar archive, so
    # Python's tarfile reads a shorter archive without any error of its own.
    entries = tree_entries()
    data = tar_bytes(entries)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
        archive.getmembers()
        end = archive.offset
    (tmp / "data.tar").write_bytes(data[:end])


def setup_not_an_archive(tmp: Path, shared: SharedRuns) -> None:
    (tmp / "data.tar.gz").write_text("train/cat/0.png\ntrain/dog/0.png\n")


def setup_cifar_missing_batch(tmp: Path, shared: SharedRuns) -> None:
    present = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "test_batch")
    write_cifar_folder(tmp / "cifar", present)


def setup_config(text: str) -> Callable[[Path, SharedRuns], None]:
    def setup(tmp: Path, shared: SharedRuns) -> None:
        (tmp / "run.yaml").write_text(text.replace("<tmp>", str(tmp)))

    return setup


def setup_empty_run_folder(tmp: Path, shared: SharedRuns) -> None:
    (tmp / "run").mkdir()


def setup_run_folder_without_epochs(tmp: Path, shared: SharedRuns) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("epochs: 2\n")
    (tmp / "run" / "metrics.jsonl").write_text("")


def setup_truncated_checkpoint(tmp: Path, shared: SharedRuns) -> None:
    run = copy_digits_run(tmp, shared)
    checkpoint = run / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])


def setup_checkpoint_without_clock(tmp: Path, shared: SharedRuns) -> None:
    edit_checkpoint(copy_digits_run(tmp, shared), lambda state: state.pop("clock"))


def setup_checkpoint_other_optimizer(tmp: Path, shared: SharedRuns) -> None:
    # As if written by a version that put all parameters in one group.
    def keep_one_group(state: dict) -> None:
        groups = state["optimizer"]["param_groups"]
        groups[0]["params"] = sorted(parameter for group in groups for parameter in group["params"])
        del groups[1:]

    edit_checkpoint(copy_digits_run(tmp, shared), keep_one_group)


def setup_tree_run(tmp: Path, shared: SharedRuns) -> Path:
    """Train one epoch on a two-class tree of 8x8 images (model auto: digits-net)."""
    tree = make_tree(tmp / "tree")
    shared.train([
        "train", "--data", str(tree), "--data-mode", "memory", "--epochs", "1", "--batch-size", "4",
        "--num-threads", "1", "--out", str(tmp / "run"),
    ])
    return tree


def setup_class_added_since_checkpoint(tmp: Path, shared: SharedRuns) -> None:
    tree = setup_tree_run(tmp, shared)
    write_png(tree / "train" / "bird" / "0.png")
    write_png(tree / "test" / "bird" / "0.png")


def setup_images_resized_since_checkpoint(tmp: Path, shared: SharedRuns) -> None:
    # With --model auto, 16x16 images pick fast-cnn where the checkpoint contains digits-net weights.
    tree = setup_tree_run(tmp, shared)
    for index, image in enumerate(sorted(tree.rglob("*.png"))):
        write_png(image, size=(16, 16), seed=index)


def setup_pickled_callable(tmp: Path, shared: SharedRuns) -> None:
    (tmp / "run").mkdir()
    payload = ShellPayload(f"echo pwned > {tmp}/pwned")
    torch.save({"model": payload, "epoch": 0}, tmp / "run" / "checkpoint.pt")


def setup_tar_member(
    name: str, kind: str = "file", content: bytes | str = b""
) -> Callable[[Path, SharedRuns], None]:
    def setup(tmp: Path, shared: SharedRuns) -> None:
        entries = tree_entries()
        entries.insert(1, (name, kind, content or png_bytes()))
        (tmp / "data.tar.gz").write_bytes(gzip_bytes(tar_bytes(entries)))

    return setup


def setup_out_is_file(tmp: Path, shared: SharedRuns) -> None:
    (tmp / "run").write_text("notes of an earlier run\n")


# Cases -------------------------------------------------------------------------------------------

TRAIN = "gct train: error: "

NAN_RUN = ("--lr", "0.05:1e4", "--momentum", "0", "--epochs", "3", "--batch-size", "128", "--num-threads", "1",
           "--out", "<tmp>/run")

CASES = (
    # Options -------------------------------------------------------------------------------------
    ErrorCase(
        "cycle-without-hard-end", "Options",
        "a cycle with no hard end",
        ("train", "--weight-decay", "1e-3:"),
        BAD_OPTION,
        TRAIN + "--weight-decay must be a number X or a cycle EASY:HARD of two numbers, got '1e-3:'",
    ),
    ErrorCase(
        "cycle-of-words", "Options",
        "a cycle of words",
        ("train", "--temperature", "a:b"),
        BAD_OPTION,
        TRAIN + "--temperature must be a number X or a cycle EASY:HARD of two numbers, got 'a:b'",
    ),
    ErrorCase(
        "cycle-of-three", "Options",
        "a cycle of three numbers",
        ("train", "--lr", "1:2:3"),
        BAD_OPTION,
        TRAIN + "--lr must be a number X or a cycle EASY:HARD (optionally EASY:HARD:log), got '1:2:3'",
    ),
    ErrorCase(
        "knob-nan", "Options",
        "NaN as a knob value",
        ("train", "--lr", "nan"),
        BAD_OPTION,
        TRAIN + "--lr must contain finite numbers, got 'nan'",
    ),
    ErrorCase(
        "knob-infinite-end", "Options",
        "an infinite end of a cycle",
        ("train", "--weight-decay", "1e-4:inf"),
        BAD_OPTION,
        TRAIN + "--weight-decay must contain finite numbers, got '1e-4:inf'",
    ),
    ErrorCase(
        "number-nan", "Options",
        "NaN as a plain number option",
        ("train", "--cycle-peak", "nan"),
        BAD_OPTION,
        TRAIN + "--cycle-peak must be a finite number, got 'nan'",
    ),
    ErrorCase(
        "weight-decay-negative", "Options",
        "a negative weight decay",
        ("train", "--weight-decay=-1e-4"),
        BAD_OPTION,
        TRAIN + "--weight-decay must be >= 0, got -0.0001",
    ),
    ErrorCase(
        "temperature-zero", "Options",
        "a temperature of 0",
        ("train", "--temperature", "0"),
        BAD_OPTION,
        TRAIN + "--temperature must be > 0, got 0",
    ),
    ErrorCase(
        "temperature-negative", "Options",
        "a negative easy temperature",
        ("train", "--temperature=-0.5:2"),
        BAD_OPTION,
        TRAIN + "--temperature must be > 0, got -0.5",
    ),
    ErrorCase(
        "augment-word", "Options",
        "an augmentation setting that is neither a word it knows nor a number",
        ("train", "--augment", "weak"),
        BAD_OPTION,
        TRAIN + "--augment must be auto, none, a magnitude X or a cycle EASY:HARD in [0, 1], got 'weak'",
    ),
    ErrorCase(
        "clip-norm-zero", "Options",
        "a clip norm of 0",
        ("train", "--clip-norm", "0"),
        BAD_OPTION,
        TRAIN + "--clip-norm must be > 0, got 0",
    ),
    ErrorCase(
        "clip-norm-negative", "Options",
        "a negative clip norm",
        ("train", "--clip-norm=-1"),
        BAD_OPTION,
        TRAIN + "--clip-norm must be > 0, got -1",
    ),
    ErrorCase(
        "lr-zero", "Options",
        "a learning rate of 0",
        ("train", "--lr", "0"),
        BAD_OPTION,
        TRAIN + "--lr must be > 0, got 0",
    ),
    ErrorCase(
        "momentum-above-one", "Options",
        "a momentum above 1",
        ("train", "--momentum", "0.9:1.5"),
        BAD_OPTION,
        TRAIN + "--momentum must be <= 1, got 1.5",
    ),
    ErrorCase(
        "peak-zero", "Options",
        "a cycle peak of 0",
        ("train", "--cycle-peak", "0"),
        BAD_OPTION,
        TRAIN + "--cycle-peak must be in (0, 1], got 0",
    ),
    ErrorCase(
        "peak-above-one", "Options",
        "a cycle peak above 1",
        ("train", "--cycle-peak", "1.5"),
        BAD_OPTION,
        TRAIN + "--cycle-peak must be in (0, 1], got 1.5",
    ),
    ErrorCase(
        "epochs-zero", "Options",
        "zero epochs",
        ("train", "--epochs", "0"),
        BAD_OPTION,
        TRAIN + "--epochs must be an integer >= 1, got 0",
    ),
    ErrorCase(
        "epochs-fraction", "Options",
        "a fractional epoch count",
        ("train", "--epochs", "1.5"),
        BAD_OPTION,
        TRAIN + "--epochs must be an integer, got '1.5'",
    ),
    ErrorCase(
        "warmup-longer-than-run", "Options",
        "a warm-up longer than the run",
        ("train", "--epochs", "2", "--warmup-epochs", "5"),
        BAD_OPTION,
        TRAIN + "--warmup-epochs must be <= --epochs (2), got 5.0",
    ),
    ErrorCase(
        "seed-negative", "Options",
        "a negative seed",
        ("train", "--seed=-1"),
        BAD_OPTION,
        TRAIN + "--seed must be an integer >= 0, got -1",
    ),
    ErrorCase(
        "batch-size-zero", "Options",
        "a batch size of 0",
        ("train", "--batch-size", "0"),
        BAD_OPTION,
        TRAIN + "--batch-size must be >= 1, got 0",
    ),
    ErrorCase(
        "batch-size-over-training-set", "Options",
        "a batch size larger than the training set",
        ("train", "--batch-size", "2000"),
        BAD_OPTION,
        TRAIN + "--batch-size must be <= the training set (1438 images), got 2000",
    ),
    ErrorCase(
        "train-size-class-too-small", "Options",
        "a --train-size that a class cannot fill",
        ("train", "--train-size", "1430"),
        BAD_OPTION,
        TRAIN + "--train-size 1430 needs 143 samples of class 0, but the class has only 142",
    ),
    ErrorCase(
        "train-size-over-training-set", "Options",
        "a --train-size larger than the training set",
        ("train", "--train-size", "5000"),
        BAD_OPTION,
        TRAIN + "--train-size must be between 1 and 1438, got 5000",
    ),
    ErrorCase(
        "model-unknown", "Options",
        "an unknown model",
        ("train", "--model", "vgg16"),
        BAD_OPTION,
        TRAIN + "--model must be one of auto, fast-cnn, fast-cnn-wide, resnet18, digits-net, resnet50, got "
                "'vgg16'",
    ),
    ErrorCase(
        "optimizer-unknown", "Options",
        "an unknown optimizer",
        ("train", "--optimizer", "adam"),
        BAD_OPTION,
        TRAIN + "--optimizer must be one of sgd, adamw, got 'adam'",
    ),
    ErrorCase(
        "loss-unknown", "Options",
        "an unknown loss",
        ("train", "--loss", "mse"),
        BAD_OPTION,
        TRAIN + "--loss must be one of ce, focal, cyclical-focal, got 'mse'",
    ),
    ErrorCase(
        "data-name-unknown", "Options",
        "an unknown data set name",
        ("train", "--data", "cifar-10"),
        BAD_OPTION,
        TRAIN + "--data must be one of digits, cifar10, cifar100 or a path, got 'cifar-10'; did you mean 'cifar10'?",
    ),
    ErrorCase(
        "cifar-without-data-dir", "Options",
        "CIFAR-10 without --data-dir",
        ("train", "--data", "cifar10"),
        BAD_OPTION,
        TRAIN + "--data-dir is required for data 'cifar10', got none",
    ),
    ErrorCase(
        "fp16-on-cpu", "Options",
        "fp16 autocast on the CPU",
        ("train", "--device", "cpu", "--precision", "fp16"),
        BAD_OPTION,
        TRAIN + "--precision must be fp32 or bf16 on the CPU, got 'fp16'",
    ),
    ErrorCase(
        "labeled-too-many", "Options",
        "--labeled as large as the training set",
        ("train", "--labeled", "2000"),
        BAD_OPTION,
        TRAIN + "--labeled must be < the training set (1438 images) so that some images stay unlabeled, "
                "got --labeled 2000",
    ),
    ErrorCase(
        "unfreeze-without-finetune", "Options",
        "a fine-tuning knob without --finetune",
        ("train", "--unfreeze", "0:1"),
        BAD_OPTION,
        TRAIN + "--unfreeze needs --finetune, got no --finetune",
    ),
    ErrorCase(
        "teacher-with-focal-loss", "Options",
        "distillation together with another loss",
        ("train", "--teacher", "<tmp>/teacher.pt", "--loss", "focal"),
        BAD_OPTION,
        TRAIN + "--teacher needs --loss ce (the distillation loss replaces it), got 'focal'",
    ),
    ErrorCase(
        "curriculum-zero", "Options",
        "a curriculum whose easy end keeps no data",
        ("train", "--curriculum", "0:1"),
        BAD_OPTION,
        TRAIN + "--curriculum must be > 0, got 0",
    ),
    ErrorCase(
        "confidence-above-one", "Options",
        "a pseudo-label confidence above 1",
        ("train", "--labeled", "100", "--confidence", "1.5"),
        BAD_OPTION,
        TRAIN + "--confidence must be <= 1, got 1.5",
    ),
    ErrorCase(
        "finetune-missing", "Checkpoints",
        "--finetune of a checkpoint that does not exist",
        ("train", "--finetune", "<tmp>/missing.pt"),
        RUN_FAILURE,
        TRAIN + "checkpoint not found: <tmp>/missing.pt",
    ),
    ErrorCase(
        "scores-missing", "Data",
        "--difficulty-scores of a file that does not exist",
        ("train", "--curriculum", "0.3:1", "--difficulty-scores", "<tmp>/scores.txt"),
        RUN_FAILURE,
        TRAIN + "--difficulty-scores file not found: <tmp>/scores.txt",
    ),
    ErrorCase(
        "option-unknown", "Options",
        "an option that does not exist",
        ("train", "--learning-rate", "0.1"),
        BAD_OPTION,
        "gct train: error: unrecognized arguments: --learning-rate 0.1",
    ),
    ErrorCase(
        "resume-with-options", "Options",
        "--resume with an option the saved run fixes",
        ("train", "--resume", "<tmp>/run", "--epochs", "20"),
        BAD_OPTION,
        TRAIN + "--resume continues a run with its saved options; allowed beside it: --cache-dir, "
                "--data-dir, --device, --num-threads, --progress; got --epochs",
    ),
    ErrorCase(
        "schedule-steps-zero", "Options",
        "zero steps per epoch in gct schedule",
        ("schedule", "--steps-per-epoch", "0"),
        BAD_OPTION,
        "gct schedule: error: --steps-per-epoch must be an integer >= 1, got '0'",
    ),
    ErrorCase(
        "out-is-file", "Options",
        "--out naming a file",
        ("train", "--epochs", "1", "--out", "<tmp>/run"),
        BAD_OPTION,
        TRAIN + "--out must be a folder, got '<tmp>/run', which is a file",
        setup=setup_out_is_file,
    ),
    # Config files --------------------------------------------------------------------------------
    ErrorCase(
        "config-missing", "Config files",
        "a config file that does not exist",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--config file not found: <tmp>/run.yaml",
    ),
    ErrorCase(
        "config-unknown-key", "Config files",
        "a misspelt key",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--config <tmp>/run.yaml: unknown option 'weight_decy' in config; did you mean "
                "'weight_decay'?",
        setup=setup_config("epochs: 2\nweight_decy: 1e-4\n"),
    ),
    ErrorCase(
        "config-dashed-unknown-key", "Config files",
        "a misspelt key with dashes",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--config <tmp>/run.yaml: unknown option 'clip-nrom' in config; did you mean 'clip_norm'?",
        setup=setup_config("clip-nrom: 1\n"),
    ),
    ErrorCase(
        "config-list-for-integer", "Config files",
        "a list where an integer belongs",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--epochs must be an integer, got [1, 2]",
        setup=setup_config("epochs: [1, 2]\n"),
    ),
    ErrorCase(
        "config-text-for-boolean", "Config files",
        "text where true or false belongs",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--drop-last must be true or false, got 'sometimes'",
        setup=setup_config("drop_last: sometimes\n"),
    ),
    ErrorCase(
        "config-list-for-knob", "Config files",
        "a list where a knob belongs",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--weight-decay must be a number X or a cycle EASY:HARD, got [0.0001, 0.001]",
        setup=setup_config("weight_decay: [1.0e-4, 1.0e-3]\n"),
    ),
    ErrorCase(
        "config-yaml-syntax", "Config files",
        "a YAML syntax error",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--config <tmp>/run.yaml is not valid YAML at line 3, column 5: expected ',' or ']', but "
                "got ':'",
        setup=setup_config("epochs: 2\nlr: [0.1\nseed: 1\n"),
    ),
    ErrorCase(
        "config-tab-indent", "Config files",
        "a tab in the indentation",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--config <tmp>/run.yaml is not valid YAML at line 2, column 1: found character '\\t' that "
                "cannot start any token",
        setup=setup_config("epochs: 2\n\tlr: 0.1\n"),
    ),
    ErrorCase(
        "config-not-mapping", "Config files",
        "a list at the top level",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--config <tmp>/run.yaml must be a mapping of option names to values, got list",
        setup=setup_config("- epochs: 2\n- lr: 0.1\n"),
    ),
    # Data ----------------------------------------------------------------------------------------
    ErrorCase(
        "data-path-missing", "Data",
        "a data path that does not exist",
        ("train", "--data", "<tmp>/images"),
        RUN_FAILURE,
        TRAIN + "--data path not found: <tmp>/images; --data must be one of digits, cifar10, cifar100, an "
                "image-folder tree or a tar archive of one",
    ),
    ErrorCase(
        "archive-truncated", "Data",
        "a .tar.gz cut in half",
        ("train", "--data", "<tmp>/data.tar.gz"),
        RUN_FAILURE,
        TRAIN + "cannot read <tmp>/data.tar.gz as a tar archive (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz): Compressed file "
                "ended before the end-of-stream marker was reached",
        setup=setup_truncated_gzip_archive,
    ),
    ErrorCase(
        "archive-without-end", "Data",
        "a .tar cut after its last member",
        ("train", "--data", "<tmp>/data.tar"),
        RUN_FAILURE,
        TRAIN + "tar archive <tmp>/data.tar is truncated: it ends without the end-of-archive marker",
        setup=setup_archive_without_end,
    ),
    ErrorCase(
        "archive-not-tar", "Data",
        "a text file named .tar.gz",
        ("train", "--data", "<tmp>/data.tar.gz"),
        RUN_FAILURE,
        TRAIN + "cannot read <tmp>/data.tar.gz as a tar archive (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz): truncated header",
        setup=setup_not_an_archive,
    ),
    ErrorCase(
        "tree-without-train", "Data",
        "an image-folder tree with no train/",
        ("train", "--data", "<tmp>/tree", "--data-mode", "memory"),
        RUN_FAILURE,
        TRAIN + "no train/ folder in <tmp>/tree (expected train/<class>/<image>)",
        setup=setup_tree_without_train,
    ),
    ErrorCase(
        "class-missing-from-test", "Data",
        "a class folder in train/ but not in test/",
        ("train", "--data", "<tmp>/tree", "--data-mode", "memory"),
        RUN_FAILURE,
        TRAIN + "class folders in <tmp>/tree/train are missing from <tmp>/tree/test: bird",
        setup=setup_class_missing_from_test,
    ),
    ErrorCase(
        "class-empty", "Data",
        "an empty class folder",
        ("train", "--data", "<tmp>/tree", "--data-mode", "memory"),
        RUN_FAILURE,
        TRAIN + "class folder <tmp>/tree/train/bird contains no images",
        setup=setup_empty_class,
    ),
    ErrorCase(
        "image-not-an-image", "Data",
        "a text file in a class folder",
        ("train", "--data", "<tmp>/tree", "--data-mode", "memory"),
        RUN_FAILURE,
        TRAIN + "cannot decode image <tmp>/tree/train/cat/notes.txt: not an image format that Pillow reads",
        setup=setup_text_file,
    ),
    ErrorCase(
        "image-truncated", "Data",
        "a PNG file cut short",
        ("train", "--data", "<tmp>/tree", "--data-mode", "memory"),
        RUN_FAILURE,
        TRAIN + "cannot decode image <tmp>/tree/train/cat/3.png: image file is truncated",
        setup=setup_corrupt_image,
    ),
    ErrorCase(
        "image-unreadable", "Data",
        "a link to an image that was moved",
        ("train", "--data", "<tmp>/tree", "--data-mode", "memory"),
        RUN_FAILURE,
        TRAIN + "cannot read image <tmp>/tree/train/cat/3.png: [Errno 2] No such file or directory: "
                "'<tmp>/tree/train/cat/3.png'",
        setup=setup_dangling_link,
    ),
    ErrorCase(
        "images-mixed-sizes", "Data",
        "images of two sizes and no --image-size",
        ("train", "--data", "<tmp>/tree", "--data-mode", "memory"),
        RUN_FAILURE,
        TRAIN + "images must all have one size, but <tmp>/tree/train/cat/0.png is 8x8 and "
                "<tmp>/tree/train/dog/3.png is 12x10 (W x H). Set image_size (--image-size) to resize them "
                "to one size",
        setup=setup_mixed_sizes,
    ),
    ErrorCase(
        "images-mixed-sizes-auto-mode", "Data",
        "images of two sizes, no --image-size and the default --data-mode auto",
        ("train", "--data", "<tmp>/tree", "--workers", "0"),
        RUN_FAILURE,
        TRAIN + "images must all have one size, but <tmp>/tree/train/cat/0.png is 8x8 and "
                "<tmp>/tree/train/dog/3.png is 12x10 (W x H). Set image_size (--image-size) to resize them "
                "to one size",
        setup=setup_mixed_sizes,
    ),
    ErrorCase(
        "cifar-batch-missing", "Data",
        "a CIFAR-10 folder without data_batch_5",
        ("train", "--data", "cifar10", "--data-dir", "<tmp>/cifar"),
        RUN_FAILURE,
        TRAIN + "CIFAR file not found: <tmp>/cifar/data_batch_5",
        setup=setup_cifar_missing_batch,
    ),
    ErrorCase(
        "cifar-data-dir-missing", "Data",
        "a --data-dir that does not exist",
        ("train", "--data", "cifar10", "--data-dir", "<tmp>/cifar"),
        RUN_FAILURE,
        TRAIN + "data_dir must be an existing folder, got <tmp>/cifar",
    ),
    # Checkpoints ---------------------------------------------------------------------------------
    ErrorCase(
        "resume-folder-missing", "Checkpoints",
        "--resume of a folder that does not exist",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "--resume folder not found: <tmp>/run",
    ),
    ErrorCase(
        "resume-without-checkpoint", "Checkpoints",
        "--resume of a folder with no checkpoint",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "checkpoint not found: <tmp>/run/checkpoint.pt",
        setup=setup_empty_run_folder,
    ),
    ErrorCase(
        "plot-no-epoch", "Checkpoints",
        "a plot of a run folder whose start failed before the first epoch",
        ("plot", "<tmp>/run"),
        RUN_FAILURE,
        "gct plot: error: DIR must contain at least one finished epoch, got <tmp>/run (metrics.jsonl is empty)",
        setup=setup_run_folder_without_epochs,
    ),
    ErrorCase(
        "out-contains-run", "Checkpoints",
        "a new run into a folder that holds a finished run",
        ("train", "--epochs", "1", "--out", "<tmp>/run"),
        BAD_OPTION,
        TRAIN + "--out <tmp>/run already contains a run (checkpoint.pt); continue it with gct train --resume "
                "<tmp>/run, or choose another --out",
        setup=lambda tmp, shared: copy_digits_run(tmp, shared),
    ),
    ErrorCase(
        "checkpoint-truncated", "Checkpoints",
        "a checkpoint.pt cut in half",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "checkpoint <tmp>/run/checkpoint.pt is truncated or not a checkpoint file; restore a "
                "complete copy or start the run again",
        setup=setup_truncated_checkpoint,
    ),
    ErrorCase(
        "checkpoint-missing-entry", "Checkpoints",
        "a checkpoint without its clock",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "checkpoint <tmp>/run/checkpoint.pt must contain the entries model, optimizer, epoch, "
                "clock, config; missing: clock",
        setup=setup_checkpoint_without_clock,
    ),
    ErrorCase(
        "checkpoint-other-class-count", "Checkpoints",
        "a class folder added to the data since the checkpoint",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "checkpoint <tmp>/run/checkpoint.pt was written for classes 2 and cannot resume a run with 3",
        setup=setup_class_added_since_checkpoint,
    ),
    ErrorCase(
        "checkpoint-other-model", "Checkpoints",
        "images resized since the checkpoint, so --model auto picks another model",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "checkpoint <tmp>/run/checkpoint.pt was written for model 'digits-net' and cannot resume a "
                "run with 'fast-cnn'",
        setup=setup_images_resized_since_checkpoint,
    ),
    ErrorCase(
        "checkpoint-other-optimizer", "Checkpoints",
        "a checkpoint with another grouping of optimizer parameters",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "checkpoint <tmp>/run/checkpoint.pt holds optimizer state that does not fit --optimizer sgd: "
                "loaded state dict has a different number of parameter groups",
        setup=setup_checkpoint_other_optimizer,
    ),
    # Untrusted files -----------------------------------------------------------------------------
    ErrorCase(
        "checkpoint-pickled-callable", "Untrusted files",
        "a checkpoint that would run a shell command",
        ("train", "--resume", "<tmp>/run"),
        RUN_FAILURE,
        TRAIN + "checkpoint <tmp>/run/checkpoint.pt was rejected: it contains the pickled callable or class "
                "posix.system, and only tensors and plain values are loaded",
        setup=setup_pickled_callable,
        forbidden="pwned",
    ),
    ErrorCase(
        "config-python-tag", "Untrusted files",
        "a config file that would run a shell command",
        ("train", "--config", "<tmp>/run.yaml"),
        BAD_OPTION,
        TRAIN + "--config <tmp>/run.yaml must contain plain values (numbers, strings, lists, true or "
                "false), got the tag !!python/object/apply:os.system at line 1, column 9",
        setup=setup_config("epochs: !!python/object/apply:os.system ['echo pwned > <tmp>/pwned']\n"),
        forbidden="pwned",
    ),
    ErrorCase(
        "tar-member-dot-dot", "Untrusted files",
        "a tar member that climbs out with ../",
        ("train", "--data", "<tmp>/data.tar.gz"),
        RUN_FAILURE,
        TRAIN + "unsafe member train/cat/../../../evil.png in <tmp>/data.tar.gz: paths must be relative and "
                "without '..'",
        setup=setup_tar_member("train/cat/../../../evil.png"),
    ),
    ErrorCase(
        "tar-member-absolute", "Untrusted files",
        "a tar member with an absolute path",
        ("train", "--data", "<tmp>/data.tar.gz"),
        RUN_FAILURE,
        TRAIN + "unsafe member /etc/cron.d/evil in <tmp>/data.tar.gz: paths must be relative and without "
                "'..'",
        setup=setup_tar_member("/etc/cron.d/evil"),
    ),
    ErrorCase(
        "tar-member-symlink", "Untrusted files",
        "a tar member that is a symbolic link",
        ("train", "--data", "<tmp>/data.tar.gz"),
        RUN_FAILURE,
        TRAIN + "link member train/cat/9.png in <tmp>/data.tar.gz rejected: links could point outside the "
                "data set",
        setup=setup_tar_member("train/cat/9.png", "symlink", "/etc/passwd"),
    ),
    ErrorCase(
        "tar-member-hardlink", "Untrusted files",
        "a tar member that is a hard link",
        ("train", "--data", "<tmp>/data.tar.gz"),
        RUN_FAILURE,
        TRAIN + "link member train/cat/9.png in <tmp>/data.tar.gz rejected: links could point outside the "
                "data set",
        setup=setup_tar_member("train/cat/9.png", "hardlink", "../../etc/passwd"),
    ),
    # Run time ------------------------------------------------------------------------------------
    ErrorCase(
        "loss-not-finite", "Run time",
        "a learning rate that makes the loss NaN in epoch 2",
        ("train", *NAN_RUN),
        RUN_FAILURE,
        TRAIN + "training stopped: the loss or gradient norm is not finite (loss 1.54126e+33, gradient norm "
                "nan) at epoch 2, step 4, with lr 1e+04, weight_decay 0.0005, temperature 1, batch_size 128; the last finished "
                "epoch's checkpoint is kept. Lower --lr, add --clip-norm, or raise --temperature",
    ),
)
