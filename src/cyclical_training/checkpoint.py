"""Atomic checkpoint files that hold only tensors and plain values.

A checkpoint is written to a temporary file in the same folder, flushed to disk, and renamed
over the old one, so a crash or a kill while saving leaves the previous checkpoint intact.
Loading uses ``torch.load(..., weights_only=True)``: a file from someone else can carry
tensors, numbers, strings, lists and dicts, but never code that runs on load.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        # Covers KeyboardInterrupt and SystemExit too: never leave half-written files behind.
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


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
    state = {"format_version": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda file: torch.save(state, file))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by ``save_checkpoint``, refusing anything but tensors and plain values."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only loading raises this for any pickled callable or class.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported object"
        raise CheckpointError(
            f"checkpoint {path} contains objects other than tensors and plain values and was not loaded "
            f"({first_line})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint file ({error.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} must be a dict with a 'model' entry, got {type(state).__name__}")
    return state
