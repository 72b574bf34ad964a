"""Atomic checkpoint files that hold only tensors and plain values.

A checkpoint is written to the temporary file ``.NAME.tmp`` in the same folder, flushed to disk,
and renamed over the old one, so a crash or a kill while saving leaves the previous checkpoint
intact. The temporary name is fixed, so a writer killed with SIGKILL leaves at most one stale
temporary file, which the next save overwrites. On POSIX systems, an exclusive ``flock`` on the
temporary file makes a second process that saves to the same path at the same time fail with
CheckpointError, so the two never mix their bytes. Other systems get no lock.

Loading uses ``torch.load(..., weights_only=True)``: a file from someone else can carry
tensors, numbers, strings, lists and dicts, but never code that runs on load.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import IO, Callable, Iterable

import torch

from .errors import CheckpointError, TrainingError

try:
    import fcntl
except ImportError:  # Windows has no flock.
    fcntl = None

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1

# Entries that ``gct train`` writes and ``--resume`` reads.
RUN_STATE_KEYS = ("model", "optimizer", "epoch", "clock", "config")

# How often to reopen the temporary file when another writer renames or removes it between our
# open and our lock. One retry is enough unless many processes race for the same path.
LOCK_ATTEMPTS = 5


def temporary_path(path: Path) -> Path:
    """Return the temporary file that ``atomic_write_bytes`` renames over ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on ``.NAME.tmp`` beside ``path``, then rename it over ``path``.

    Raises CheckpointError when another process is writing the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    file = _open_locked(temporary, path)
    renamed = False
    try:
        # A stale file from a killed writer may be longer than what we write.
        file.truncate(0)
        write(file)
        file.flush()
        os.fsync(file.fileno())
        # Rename under the lock: a writer that locks this file later finds the name gone and
        # leaves the file alone (see _open_locked).
        os.replace(temporary, path)
        renamed = True
    except BaseException:
        # Covers KeyboardInterrupt and SystemExit too. Removing the name under the lock keeps
        # this unlink from removing the file of a writer that comes next.
        if not renamed:
            temporary.unlink(missing_ok=True)
        raise
    finally:
        file.close()
    _fsync_directory(path.parent)


def _open_locked(temporary: Path, target: Path) -> IO[bytes]:
    """Open ``temporary`` for writing and take an exclusive lock on it, without truncating."""
    for _ in range(LOCK_ATTEMPTS):
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return os.fdopen(descriptor, "r+b")
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise CheckpointError(
                f"cannot write {target}: another process is writing it and has locked {temporary}; "
                "give each run its own --out folder"
            ) from None
        # Between our open and our lock, the writer that held the lock may have renamed this
        # file over the target or removed it. Then the name points to another file, or none.
        try:
            current = os.stat(temporary)
        except FileNotFoundError:
            current = None
        opened = os.fstat(descriptor)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return os.fdopen(descriptor, "r+b")
        os.close(descriptor)
    raise CheckpointError(f"cannot write {target}: {temporary} kept changing while other processes wrote it")


def _fsync_directory(folder: Path) -> None:
    # The rename is only durable once the folder entry reaches the disk.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically to ``path``.

    Raises TrainingError, and keeps the previous file, when a floating-point tensor of
    ``state["model"]`` contains NaN or an infinity: such weights are not worth resuming from.
    """
    _check_finite_weights(path, state.get("model"))
    state = {"format_version": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda file: torch.save(state, file))


def _check_finite_weights(path: Path, model_state: object) -> None:
    if not isinstance(model_state, dict):
        return
    for name, tensor in model_state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(
                f"checkpoint {path} was not written because model tensor {name!r} contains NaN or infinite "
                "values, so the previous checkpoint is kept; lower --lr or add --clip-norm"
            )


def load_checkpoint(path: Path, required: Iterable[str] = RUN_STATE_KEYS) -> dict:
    """Load a checkpoint written by ``save_checkpoint``, rejecting anything but tensors and plain values.

    ``path`` is the file or the folder that contains ``checkpoint.pt``. Raises CheckpointError
    for a missing, truncated or unsafe file and for one without the ``required`` entries.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only loading raises this for any pickled callable or class.
        raise CheckpointError(
            f"checkpoint {path} was rejected: it contains {_rejected_object(error)}, and only tensors "
            "and plain values are loaded"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError):
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a checkpoint file; restore a complete copy or start "
            "the run again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} must contain a dict, got {type(state).__name__}")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} must contain the entries {', '.join(required)}; missing: {', '.join(missing)}"
        )
    return state


def _rejected_object(error: pickle.UnpicklingError) -> str:
    """Name the callable or class that weights_only loading rejected, from torch's message."""
    # torch 2.13.0 writes, among its advice, "Trying to load unsupported GLOBAL posix.system ..."
    # for a blocked module or "Unsupported global: GLOBAL __main__.Payload ..." for a class.
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    if match:
        return f"the pickled callable or class {match.group(1)}"
    return "a pickled object other than tensors and plain values"
