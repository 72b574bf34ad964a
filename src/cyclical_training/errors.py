"""Errors raised for bad input, and the checks that build their messages.

Every message follows one template: the argument, what is allowed, and the value given, as in
``weight_decay must be >= 0, got -0.1``. The command line prints such an error as one line
and exits with status 2 (bad option) or 1 (failure at run time).
"""

from __future__ import annotations

import math
from typing import Iterable


class ConfigError(ValueError):
    """Invalid option, argument or configuration value; raised before any training starts."""


class DataError(RuntimeError):
    """Data set that cannot be read or does not have the expected layout."""


class CheckpointError(RuntimeError):
    """Checkpoint that cannot be loaded into the current run."""


class TrainingError(RuntimeError):
    """Failure during training, such as a loss that is no longer finite."""


def shown_number(value: object) -> str:
    """Show a number as a user typed it: a whole float as an integer, anything else by repr.

    Knob ends parse ``0`` from the command line as ``0.0``; the message should echo ``0``.
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(choices)
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
