"""The options of a training run, as one validated object.

``TrainConfig`` holds every option of ``gct train`` with the same names (``weight_decay`` in
Python and YAML, ``--weight-decay`` on the command line). A knob option is a number for a
constant or a string ``"EASY:HARD"`` for a cycle, optionally ``"EASY:HARD:log"`` for geometric
interpolation. ``validate()`` checks everything before any data is read, so a typo fails in the
first second and not after an hour of training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clock import SHAPES, UNITS, peak_from_factor, validate_clock_options
from .errors import ConfigError, check_choice, check_positive_int, shown_number
from .knobs import KNOB_BOUNDS, EpochKnob, Knob
from .losses import LOSS_NAMES
from .models import MODEL_NAMES

DATA_NAMES = ("digits", "cifar10", "cifar100")
MODEL_CHOICES = ("auto", *MODEL_NAMES)
OPTIMIZER_CHOICES = ("sgd", "adamw")
LOSS_CHOICES = LOSS_NAMES
LR_SCHEDULES = ("warmup-cosine", "constant")
LR_SCALINGS = ("none", "linear", "sqrt")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DATA_MODES = ("auto", "memory", "stream")


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class KnobSpec:
    """A parsed knob option: ends of the cycle and the interpolation between them."""

    easy: float
    hard: float
    interpolation: str = "linear"

    @property
    def is_constant(self) -> bool:
        return self.easy == self.hard

    def text(self) -> str:
        if self.is_constant:
            return f"{self.easy:g}"
        suffix = ":log" if self.interpolation == "log" else ""
        return f"{self.easy:g}:{self.hard:g}{suffix}"


def parse_knob_spec(key: str, raw: Any) -> KnobSpec:
    """Parse ``X``, ``EASY:HARD`` or ``EASY:HARD:log`` for option ``key``."""
    name = option_name(key)
    if isinstance(raw, bool):
        raise ConfigError(f"{name} must be a number X or a cycle EASY:HARD, got {raw!r}")
    if isinstance(raw, (int, float)):
        value = float(raw)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {raw!r}")
        return KnobSpec(value, value)
    if not isinstance(raw, str):
        raise ConfigError(f"{name} must be a number X or a cycle EASY:HARD, got {raw!r}")

    parts = raw.strip().split(":")
    interpolation = "linear"
    if len(parts) == 3 and parts[2].strip() in ("log", "linear"):
        interpolation = parts.pop().strip()
    if len(parts) not in (1, 2):
        raise ConfigError(f"{name} must be a number X or a cycle EASY:HARD (optionally EASY:HARD:log), got {raw!r}")
    numbers = []
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            raise ConfigError(
                f"{name} must be a number X or a cycle EASY:HARD of two numbers, got {raw!r}"
            ) from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must contain finite numbers, got {raw!r}")
        numbers.append(number)
    if len(numbers) == 1:
        return KnobSpec(numbers[0], numbers[0], interpolation)
    return KnobSpec(numbers[0], numbers[1], interpolation)


# Options that take a knob (X or EASY:HARD); ``None`` as a value turns an optional knob off.
KNOB_OPTIONS = (
    "lr", "momentum", "weight_decay", "temperature", "clip_norm", "batch_size", "augment",
    "unlabeled_weight", "confidence", "curriculum", "kd_weight", "kd_temperature", "unfreeze",
)

# Knobs of the techniques in semi_supervised.py, curriculum.py, finetune.py and distillation, the
# option each one needs, and the value it takes when that option is given without the knob.
TECHNIQUE_KNOBS = {
    "unlabeled_weight": ("labeled", 1.0),
    "confidence": ("labeled", 0.95),
    "curriculum": (None, None),
    "kd_weight": ("teacher", 0.5),
    "kd_temperature": ("teacher", 4.0),
    "unfreeze": ("finetune", 1.0),
}


@dataclass
class TrainConfig:
    """Every option of a training run. Units and the reasons for defaults are given per field."""

    # Data ------------------------------------------------------------------------------------
    data: str = "digits"  # digits, cifar10, cifar100, or a path to an image-folder tree or archive
    data_dir: str | None = None  # folder of the CIFAR python batches
    cache_dir: str | None = None  # decoded-image cache; default: the user's cache folder
    train_size: int | None = None  # class-balanced training subset; 4000 gives "4K CIFAR-10"
    validation_size: int = 0  # class-balanced images held out of training for model selection
    image_size: int | None = None  # resize image-folder data to this square size (pixels)
    data_mode: str = "auto"  # memory: decode once and cache; stream: decode per batch in workers
    workers: int = 4  # DataLoader worker processes when streaming

    # Model and optimizer ---------------------------------------------------------------------
    model: str = "auto"  # auto: digits-net for 8x8 digits, fast-cnn otherwise
    optimizer: str = "sgd"
    epochs: int = 10
    batch_size: Any = 256  # global batch; EASY:HARD cycles it per epoch (easy = large)
    drop_last: bool = False
    lr: Any = 0.1  # peak learning rate; EASY:HARD makes the rate a knob on the clock instead
    lr_schedule: str = "warmup-cosine"  # used when lr is a constant
    warmup_epochs: float = 1.0  # linear warm-up length of the warmup-cosine schedule
    lr_scaling: str = "none"  # scale lr with batch size relative to the easy batch size
    momentum: Any = 0.9  # SGD Nesterov momentum, or AdamW beta1
    weight_decay: Any = 5e-4  # easy = small; applied only to the decayed parameter group

    # Loss ------------------------------------------------------------------------------------
    loss: str = "ce"
    temperature: Any = 1.0  # training logits are divided by it; easy = small (sharper softmax)
    label_smoothing: float = 0.0
    gamma_hc: float = 2.0  # focal losses: exponent of the high-confidence weight (easy end)
    gamma_pos: float = 0.0  # focal losses: exponent on the target class (hard end)
    gamma_neg: float = 4.0  # focal losses: exponent on the other classes (hard end)

    # Gradient clipping and augmentation -------------------------------------------------------
    clip_norm: Any = None  # global L2 norm threshold; easy = tight (small); None: no clipping
    augment: Any = "auto"  # auto: crop and flip for images >= 16 px; X or EASY:HARD: magnitude in [0, 1]

    # Techniques (see docs/techniques.md) -------------------------------------------------------
    labeled: int | None = None  # semi-supervised: class-balanced labeled images; the rest are unlabeled
    unlabeled_ratio: int = 7  # semi-supervised: unlabeled images per labeled image in a step
    unlabeled_weight: Any = None  # semi-supervised: weight of the unlabeled loss; default 1 with --labeled
    confidence: Any = None  # semi-supervised: pseudo-label threshold; default 0.95 with --labeled
    curriculum: Any = None  # easiest fraction of each class to sample from; None: off
    difficulty_scores: str | None = None  # curriculum: file of one score per training image
    scoring_epochs: int = 3  # curriculum: epochs of each out-of-fold scoring model
    teacher: str | None = None  # distillation: checkpoint.pt (or its folder) of the teacher
    kd_weight: Any = None  # distillation: alpha, the weight of the teacher term; default 0.5
    kd_temperature: Any = None  # distillation: softmax temperature of the teacher term; default 4
    finetune: str | None = None  # checkpoint.pt (or its folder) to start from
    unfreeze: Any = None  # fine-tuning: share of blocks that train, from the top; default 1 (all)

    # Clock -----------------------------------------------------------------------------------
    cycle_peak: float | None = None  # fraction of training at the hardest point; default 0.5
    cycle_factor: float | None = None  # the paper's factor f: peak = 1 / f
    cycle_shape: str = "linear"
    cycle_unit: str = "epoch"  # epoch: the paper's granularity; step: moves every step
    cycles: int = 1

    # Run -------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # bf16/fp16 autocast; fp16 uses a gradient scaler
    channels_last: bool = True  # measured faster for convolutions on CPUs and GPUs alike
    compile: bool = False
    num_threads: int | None = None  # torch CPU threads; default: the number of usable cores
    out: str | None = None  # folder for config.yaml, metrics.jsonl, summary.json, checkpoint.pt
    tensorboard: bool = False  # also write TensorBoard scalars per step under out/tensorboard
    progress: bool = True  # progress bar on a terminal

    # Derived by validate() -------------------------------------------------------------------
    knob_specs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def peak(self) -> float:
        if self.cycle_factor is not None:
            return peak_from_factor(self.cycle_factor)
        return 0.5 if self.cycle_peak is None else self.cycle_peak

    def validate(self) -> "TrainConfig":
        """Check every option and parse the knob options; return self."""
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"--data must be digits, cifar10, cifar100 or a path, got {self.data!r}")
        check_positive_int("--epochs", self.epochs)
        if self.train_size is not None:
            check_positive_int("--train-size", self.train_size)
        check_positive_int("--validation-size", self.validation_size, minimum=0)
        if self.image_size is not None:
            check_positive_int("--image-size", self.image_size, minimum=4)
        check_choice("--model", self.model, MODEL_CHOICES)
        check_choice("--optimizer", self.optimizer, OPTIMIZER_CHOICES)
        check_choice("--loss", self.loss, LOSS_CHOICES)
        check_choice("--lr-schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("--lr-scaling", self.lr_scaling, LR_SCALINGS)
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--device", self.device, DEVICES)
        check_choice("--data-mode", self.data_mode, DATA_MODES)
        check_positive_int("--workers", self.workers, minimum=0)
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out must be a folder, got {self.out!r}, which is a file")
        if self.tensorboard and not self.out:
            raise ConfigError("--tensorboard needs --out DIR to write its event files, got no --out")
        check_choice("--cycle-shape", self.cycle_shape, SHAPES)
        check_choice("--cycle-unit", self.cycle_unit, UNITS)
        check_positive_int("--cycles", self.cycles)
        check_positive_int("--seed", self.seed, minimum=0)
        if self.num_threads is not None:
            check_positive_int("--num-threads", self.num_threads)
        _check_number("--warmup-epochs", self.warmup_epochs, minimum=0.0)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs must be <= --epochs ({self.epochs}), got {self.warmup_epochs!r}")
        _check_number("--label-smoothing", self.label_smoothing, minimum=0.0)
        if self.label_smoothing >= 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        for key in ("gamma_hc", "gamma_pos", "gamma_neg"):
            _check_number(option_name(key), getattr(self, key), minimum=0.0)

        if self.cycle_peak is not None and self.cycle_factor is not None:
            raise ConfigError(
                f"--cycle-peak and --cycle-factor set the same thing (peak = 1 / factor); give one, "
                f"got --cycle-peak {self.cycle_peak!r} and --cycle-factor {self.cycle_factor!r}"
            )
        if self.cycle_peak is not None:
            _check_number("--cycle-peak", self.cycle_peak)
            if not 0.0 < self.cycle_peak <= 1.0:
                raise ConfigError(f"--cycle-peak must be in (0, 1], got {shown_number(self.cycle_peak)}")
        if self.cycle_factor is not None:
            _check_number("--cycle-factor", self.cycle_factor)
            if self.cycle_factor < 1.0:
                raise ConfigError(f"--cycle-factor must be >= 1, got {self.cycle_factor!r}")
        validate_clock_options(self.peak, self.cycle_shape, self.cycles)

        if self.labeled is not None:
            check_positive_int("--labeled", self.labeled)
        check_positive_int("--unlabeled-ratio", self.unlabeled_ratio)
        check_positive_int("--scoring-epochs", self.scoring_epochs)
        for key in ("difficulty_scores", "teacher", "finetune"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{option_name(key)} must be a file path, got {value!r}")

        self.knob_specs = self._parse_knobs()
        return self

    def check_techniques(self) -> None:
        """Raise ConfigError for a technique knob given without the option it belongs to.

        Kept out of ``validate()`` because ``gct schedule`` previews these knobs without data,
        teacher or checkpoint.
        """
        for key, (needs, _default) in TECHNIQUE_KNOBS.items():
            if needs is not None and getattr(self, key) is not None and getattr(self, needs) is None:
                raise ConfigError(f"{option_name(key)} needs {option_name(needs)}, got no {option_name(needs)}")
        if self.difficulty_scores is not None and self.curriculum is None:
            raise ConfigError("--difficulty-scores needs --curriculum EASY:HARD, got no --curriculum")
        if self.teacher is not None:
            if self.loss != "ce":
                raise ConfigError(f"--teacher needs --loss ce (the distillation loss replaces it), got {self.loss!r}")
            temperature = self.knob_specs.get("temperature")
            if temperature is not None and temperature != KnobSpec(1.0, 1.0):
                raise ConfigError(
                    "--teacher needs --temperature 1, because --kd-temperature sets the distillation "
                    f"temperature; got --temperature {self.temperature!r}"
                )

    def _parse_knobs(self) -> dict[str, KnobSpec]:
        specs: dict[str, KnobSpec] = {}
        for key in KNOB_OPTIONS:
            raw = getattr(self, key)
            if raw is None or (key == "augment" and raw in ("auto", "none")):
                continue
            try:
                spec = parse_knob_spec(key, raw)
            except ConfigError:
                if key != "augment":
                    raise
                # The generic message lists numbers only, but --augment also takes two words.
                raise ConfigError(
                    f"--augment must be auto, none, a magnitude X or a cycle EASY:HARD in [0, 1], got {raw!r}"
                ) from None
            # Build the knob once to apply its bounds with the option's name in the message.
            build_knob(key, spec)
            specs[key] = spec

        for key, (needs, default) in TECHNIQUE_KNOBS.items():
            if key not in specs and needs is not None and getattr(self, needs) is not None:
                specs[key] = KnobSpec(default, default)

        batch = specs["batch_size"]
        for end in (batch.easy, batch.hard):
            if end != int(end) or end < 1:
                raise ConfigError(f"--batch-size must be integers >= 1, got {self.batch_size!r}")
        return specs

    def to_dict(self) -> dict:
        """Return the options as plain values, as written to config.yaml."""
        return {
            item.name: getattr(self, item.name)
            for item in dataclasses.fields(self)
            if item.name != "knob_specs"
        }

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build a config from plain values; unknown keys get the nearest valid name suggested."""
        known = {item.name for item in dataclasses.fields(cls) if item.name != "knob_specs"}
        for key in values:
            if key not in known:
                raise ConfigError(unknown_key_message(key, known))
        return cls(**values)


def unknown_key_message(key: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {key!r} in config{hint}"


def _check_number(name: str, value: Any, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got {value!r}")


# Bounds of each knob option and the knob class that reads it (batch size changes only per epoch).
KNOB_DEFINITIONS = {
    "lr": (KNOB_BOUNDS["lr"], Knob),
    "momentum": (KNOB_BOUNDS["momentum"], Knob),
    "weight_decay": (KNOB_BOUNDS["weight_decay"], Knob),
    "temperature": (KNOB_BOUNDS["temperature"], Knob),
    "clip_norm": (KNOB_BOUNDS["clip_norm"], Knob),
    "batch_size": ({"minimum": 1.0}, EpochKnob),
    "augment": ({"minimum": 0.0, "maximum": 1.0}, Knob),
    "unlabeled_weight": ({"minimum": 0.0}, Knob),
    "confidence": ({"minimum": 0.0, "maximum": 1.0}, Knob),
    # The data pool and the frozen blocks change between epochs only.
    "curriculum": ({"minimum": 0.0, "exclusive_minimum": True, "maximum": 1.0}, EpochKnob),
    "kd_weight": ({"minimum": 0.0, "maximum": 1.0}, Knob),
    "kd_temperature": ({"minimum": 0.0, "exclusive_minimum": True}, Knob),
    "unfreeze": ({"minimum": 0.0, "maximum": 1.0}, EpochKnob),
}


def build_knob(key: str, spec: KnobSpec) -> Knob:
    bounds, factory = KNOB_DEFINITIONS[key]
    return factory(spec.easy, spec.hard, interpolation=spec.interpolation, name=option_name(key), **bounds)
