"""The ``gct`` command line: ``gct train`` and ``gct schedule``.

Options and YAML config files become one validated ``TrainConfig``; the command line overrides
the file. A bad option prints one line on standard error and exits with status 2; a failure at
run time (missing data, a broken checkpoint, a loss that is no longer finite) exits with 1.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import KNOB_OPTIONS, TrainConfig, option_name, unknown_key_message
from .errors import CheckpointError, ConfigError, DataError, TrainingError

# Help text for every option of TrainConfig: what it sets and in what unit.
OPTION_HELP = {
    "data": "digits (default, embedded), cifar10, cifar100, or a path to an image-folder tree or a "
            ".tar/.tar.gz archive of one with train/<class>/ and test/<class>/",
    "data_dir": "folder of the CIFAR python batches (for --data cifar10/cifar100)",
    "cache_dir": "folder for decoded images (default: the user's cache folder)",
    "train_size": "train on a class-balanced subset of N images, chosen by the seed (4000: '4K CIFAR-10')",
    "validation_size": "hold out N class-balanced training images for validation (default 0)",
    "image_size": "resize image-folder data to N x N pixels (needed when image sizes differ)",
    "data_mode": "auto (default: stream folders of more than 100,000 images or --image-size over 64), memory or stream",
    "workers": "DataLoader worker processes that decode images when streaming (default 4)",
    "tensorboard": "also write TensorBoard scalars per step to OUT/tensorboard (needs the tensorboard extra)",
    "model": "auto, fast-cnn, fast-cnn-wide, resnet18, digits-net or resnet50 (auto: digits-net for digits, else fast-cnn)",
    "optimizer": "sgd (Nesterov momentum) or adamw",
    "epochs": "number of epochs (default 10)",
    "batch_size": "global batch size, X or EASY:HARD per epoch (easy = large), default 256",
    "drop_last": "drop the last incomplete batch of every epoch",
    "lr": "learning rate: X is the peak of --lr-schedule; EASY:HARD follows the clock instead (default 0.1)",
    "lr_schedule": "warmup-cosine (default: linear warm-up, then cosine decay) or constant, for a constant --lr",
    "warmup_epochs": "length of the linear warm-up in epochs (default 1)",
    "lr_scaling": "none, linear or sqrt: scale the learning rate with the batch size relative to the easy end",
    "momentum": "SGD momentum or AdamW beta1, X or EASY:HARD (default 0.9)",
    "weight_decay": "weight decay of the decayed group, X or EASY:HARD (easy = small), default 5e-4",
    "loss": "ce (default), focal or cyclical-focal",
    "temperature": "softmax temperature dividing training logits, X or EASY:HARD (easy = small), default 1",
    "label_smoothing": "label smoothing in [0, 1) (default 0)",
    "gamma_hc": "focal losses: high-confidence exponent (default 2)",
    "gamma_pos": "focal losses: exponent on the target class (default 0)",
    "gamma_neg": "focal losses: exponent on the other classes (default 4); acts only with --label-smoothing > 0",
    "clip_norm": "gradient clipping threshold on the global L2 norm, X or EASY:HARD (easy = tight, small); default off",
    "augment": "auto (crop and flip for images of 16 px or more), none, or a magnitude X or EASY:HARD in [0, 1]",
    "labeled": "semi-supervised: keep the labels of a class-balanced subset of N training images and treat "
               "the rest as unlabeled; an epoch is one pass over the N labeled images",
    "unlabeled_ratio": "semi-supervised: unlabeled images per labeled image in each step (default 7)",
    "unlabeled_weight": "semi-supervised: weight of the pseudo-label loss, X or EASY:HARD (default 1)",
    "confidence": "semi-supervised: softmax confidence a pseudo-label needs, X or EASY:HARD in [0, 1] "
                  "(default 0.95)",
    "curriculum": "sample each epoch from the easiest fraction q of each class, X or EASY:HARD in (0, 1], "
                  "e.g. 0.3:1",
    "difficulty_scores": "curriculum: text or .npy file of one difficulty score per training image (higher is "
                         "harder); default: out-of-fold loss of short scoring runs",
    "scoring_epochs": "curriculum: epochs of each of the two out-of-fold scoring models (default 3)",
    "teacher": "distil from this gct train checkpoint.pt (or its folder)",
    "kd_weight": "distillation: weight alpha of the teacher term in [0, 1], X or EASY:HARD (default 0.5)",
    "kd_temperature": "distillation: softmax temperature of the teacher term, X or EASY:HARD (default 4)",
    "finetune": "start from the weights of this gct train checkpoint.pt (or its folder); a new head when the "
                "class count differs",
    "unfreeze": "fine-tuning: share of blocks that train, counted from the top, X or EASY:HARD in [0, 1] "
                "(default 1: all; the head always trains)",
    "cycle_peak": "fraction of training at the hardest point, in (0, 1] (default 0.5)",
    "cycle_factor": "the paper's cyclical factor f >= 1, the same as --cycle-peak 1/f",
    "cycle_shape": "linear (default) or cosine",
    "cycle_unit": "epoch (default: the value changes once per epoch) or step",
    "cycles": "number of easy-hard-easy cycles in the run (default 1)",
    "seed": "random seed for initial weights, subset, data order and augmentation (default 0)",
    "device": "auto (default), cpu or cuda",
    "precision": "fp32 (default), bf16 or fp16 (CUDA only) autocast",
    "channels_last": "use the channels-last memory format (default: on)",
    "compile": "compile the model with torch.compile",
    "num_threads": "CPU threads for torch (default: all usable cores)",
    "out": "folder for config.yaml, metrics.jsonl, summary.json and checkpoint.pt",
    "progress": "draw a progress bar while an epoch runs (on a terminal)",
}

BOOLEAN_FIELDS = {"drop_last", "channels_last", "compile", "progress", "tensorboard"}
INT_FIELDS = {
    "workers", "train_size", "validation_size", "image_size", "epochs", "cycles", "seed", "num_threads",
    "labeled", "unlabeled_ratio", "scoring_epochs",
}
FLOAT_FIELDS = {"warmup_epochs", "label_smoothing", "gamma_hc", "gamma_pos", "gamma_neg", "cycle_peak", "cycle_factor"}

# Options of `gct schedule`: the clock and the knobs, without data, model or run options.
SCHEDULE_FIELDS = (
    "epochs", "batch_size", "drop_last", "lr", "lr_schedule", "warmup_epochs", "lr_scaling", "momentum",
    "weight_decay", "temperature", "clip_norm", "augment", "cycle_peak", "cycle_factor", "cycle_shape",
    "cycle_unit", "cycles", "unlabeled_weight", "confidence", "curriculum", "kd_weight", "kd_temperature",
    "unfreeze",
)

# Options that may accompany --resume; every other option comes from the saved run.
RESUME_FIELDS = {"device", "num_threads", "progress", "cache_dir", "data_dir"}


class OneLineParser(argparse.ArgumentParser):
    """Argument parser whose errors are one line on standard error and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="gct", description="General Cyclical Training for PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True

    train = commands.add_parser("train", help="train a model with cyclical knobs")
    train.add_argument("--config", help="YAML file of options; command-line options override it")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    train.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    _add_config_options(train, [item.name for item in dataclasses.fields(TrainConfig) if item.name in OPTION_HELP])

    schedule = commands.add_parser("schedule", help="print or plot every knob's value without training")
    schedule.add_argument("--config", help="YAML file of options; command-line options override it")
    schedule.add_argument("--steps-per-epoch", default="1", help="steps in every epoch (default 1)")
    schedule.add_argument("--train-images", help="derive steps per epoch from this many images and the batch size")
    schedule.add_argument("--csv", action="store_true", help="print CSV with a header row of option names")
    schedule.add_argument("--plot", metavar="FILE.png", help="draw the knob curves to a PNG file")
    schedule.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    _add_config_options(schedule, list(SCHEDULE_FIELDS))

    from .reproduce import add_reproduce_arguments

    reproduce = commands.add_parser(
        "reproduce", help="train constant and cyclical arms over seeds and report the paired difference"
    )
    add_reproduce_arguments(reproduce)

    plot = commands.add_parser("plot", help="draw the curves and knob values of a finished run to PNG")
    plot.add_argument("run_dir", metavar="DIR", help="folder written by gct train --out")
    plot.add_argument("--output", metavar="FILE.png", help="where to write the plot (default: DIR/run.png)")
    plot.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def _add_config_options(parser: argparse.ArgumentParser, keys: Sequence[str]) -> None:
    for key in keys:
        if key in BOOLEAN_FIELDS:
            parser.add_argument(option_name(key), dest=key, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=OPTION_HELP[key])
        else:
            parser.add_argument(option_name(key), dest=key, default=argparse.SUPPRESS, metavar="X",
                                help=OPTION_HELP[key])


def convert_option(key: str, value: Any) -> Any:
    """Convert a command-line string or YAML value to the type of TrainConfig field ``key``."""
    name = option_name(key)
    if value is None or key in KNOB_OPTIONS:
        return value
    if key in BOOLEAN_FIELDS:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if key in INT_FIELDS:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if key in FLOAT_FIELDS:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def parse_count(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {text!r}")
    return value


class OptionsLoader(yaml.SafeLoader):
    """A safe YAML loader without YAML 1.1's base-60 numbers.

    ``yaml.safe_load`` reads ``clip_norm: 1:10`` as the integer 70 (1 * 60 + 10). Without the
    base-60 forms, ``1:10`` stays the string that the option parser reads as EASY:HARD.
    """


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
OptionsLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
OptionsLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
OptionsLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_config_file(path: str, allowed: set[str]) -> dict:
    """Read a YAML options file with a safe loader; keys use underscores or dashes."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config file not found: {path}")
    try:
        loaded = yaml.load(file.read_text(), Loader=OptionsLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        tag = _unsupported_tag(error)
        if tag is not None:
            # safe_load builds only plain values; a tag such as !!python/object/apply would run code.
            raise ConfigError(
                f"--config {path} must contain plain values (numbers, strings, lists, true or false), "
                f"got the tag {tag} at {where}"
            ) from None
        raise ConfigError(f"--config {path} is not valid YAML at {where}: {error.problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path} must be a mapping of option names to values, got {type(loaded).__name__}")
    values = {}
    for raw_key, value in loaded.items():
        key = str(raw_key).replace("-", "_")
        if key not in allowed:
            raise ConfigError(f"--config {path}: " + unknown_key_message(str(raw_key), allowed))
        values[key] = value
    return values


def _unsupported_tag(error: yaml.MarkedYAMLError) -> str | None:
    """Return the tag that the safe loader has no constructor for, as written in the file."""
    if not isinstance(error, yaml.constructor.ConstructorError):
        return None
    match = re.search(r"constructor for the tag '([^']*)'", error.problem or "")
    if match is None:
        return None
    return match.group(1).replace("tag:yaml.org,2002:", "!!", 1)


def config_from_arguments(
    arguments: argparse.Namespace, allowed: set[str], file_allowed: set[str] | None = None
) -> TrainConfig:
    """Build the config from ``--config`` and the command line; the command line wins.

    ``file_allowed`` is the set of keys the file may contain. Keys in it but not in ``allowed`` are
    ignored, so ``gct schedule`` can read the config.yaml of a training run.
    """
    values = {}
    if arguments.config:
        from_file = read_config_file(arguments.config, file_allowed or allowed)
        values = {key: value for key, value in from_file.items() if key in allowed}
    for key in allowed:
        if hasattr(arguments, key):
            values[key] = getattr(arguments, key)
    converted = {key: convert_option(key, value) for key, value in values.items()}
    return TrainConfig(**converted).validate()


# Commands ---------------------------------------------------------------------------------------


def run_train(arguments: argparse.Namespace) -> int:
    from .train import Trainer, resume_trainer

    allowed = set(OPTION_HELP)
    trainer = None
    with _InterruptGuard() as guard:
        try:
            if arguments.resume:
                given = sorted(key for key in allowed if hasattr(arguments, key) and key not in RESUME_FIELDS)
                if given or arguments.config:
                    extra = ", ".join(option_name(key) for key in given) or "--config"
                    raise ConfigError(
                        f"--resume continues a run with its saved options; allowed beside it: "
                        f"{', '.join(sorted(option_name(key) for key in RESUME_FIELDS))}; got {extra}"
                    )
                overrides = {
                    key: convert_option(key, getattr(arguments, key))
                    for key in RESUME_FIELDS
                    if hasattr(arguments, key)
                }
                trainer = resume_trainer(arguments.resume, overrides=overrides)
                print(f"resuming {arguments.resume} after epoch {trainer.start_epoch}", flush=True)
            else:
                config = config_from_arguments(arguments, allowed)
                _check_out_is_free(config.out)
                trainer = Trainer(config, log=lambda line: print(line, flush=True))
            guard.shield_epoch_files(trainer)
            summary = trainer.fit()
        except KeyboardInterrupt:
            sys.stderr.write(f"gct train: {guard.describe(trainer)}\n")
            return guard.exit_status
    best = summary["best_test_accuracy"]
    final = summary["final_test_accuracy"]
    if final is not None:
        print(f"final test accuracy {100 * final:.2f}% (best {100 * best:.2f}% at epoch {summary['best_epoch']}), "
              f"{summary['seconds']:.1f}s")
    return 0


def _check_out_is_free(out: str | None) -> None:
    """Raise ConfigError when ``out`` already contains a run's checkpoint, which a new run would replace."""
    from .checkpoint import CHECKPOINT_NAME

    if out is not None and (Path(out) / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"--out {out} already contains a run ({CHECKPOINT_NAME}); continue it with gct train --resume {out}, "
            f"or choose another --out"
        )


class _InterruptGuard:
    """Turn SIGINT and SIGTERM into KeyboardInterrupt during ``gct train``, except while epoch files are written.

    A signal that arrives while metrics.jsonl and checkpoint.pt are written is raised once both
    are complete, so the two files always describe the same finished epochs. The current
    epoch is abandoned, and the exit status is 128 + the signal number (130 for SIGINT, 143 for
    SIGTERM), as shells report a process killed by that signal.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.saved_epochs = 0
        self._deferring = False
        self._pending = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_InterruptGuard":
        # Python accepts signal handlers only in the main thread; elsewhere Ctrl-C stays as it is.
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Hold back the KeyboardInterrupt of a signal until the block has finished."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            raise KeyboardInterrupt

    def shield_epoch_files(self, trainer) -> None:
        """Make ``trainer`` write each epoch's metrics line and checkpoint with signals deferred."""
        # NOTE: this wraps a private method of Trainer; a hook in Trainer.fit would be cleaner.
        self.saved_epochs = trainer.start_epoch
        write = trainer._write_epoch_files

        def write_deferred(*args, **kwargs):
            with self.deferred():
                write(*args, **kwargs)
                self.saved_epochs = len(trainer.history)

        trainer._write_epoch_files = write_deferred

    @property
    def exit_status(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def describe(self, trainer) -> str:
        """Return the one-line message for a run that a signal ended."""
        cause = f"interrupted by {signal.Signals(self.received).name}" if self.received else "interrupted"
        if trainer is None:
            return f"{cause} before training started"
        epochs = trainer.config.epochs
        finished = len(trainer.history)
        where = f"during epoch {finished + 1} of {epochs}" if finished < epochs else "after the last epoch"
        out = trainer.config.out
        if not out:
            return f"{cause} {where}; nothing was saved because --out was not given"
        if self.saved_epochs == 0:
            return f"{cause} {where}; no epoch finished, so {out} has no checkpoint to resume from"
        return (
            f"{cause} {where}; {out} keeps the checkpoint of epoch {self.saved_epochs}; "
            f"continue with: gct train --resume {out}"
        )


def run_schedule(arguments: argparse.Namespace) -> int:
    config = config_from_arguments(arguments, set(SCHEDULE_FIELDS), file_allowed=set(OPTION_HELP))
    steps = parse_count("--steps-per-epoch", arguments.steps_per_epoch)
    images = None if arguments.train_images is None else parse_count("--train-images", arguments.train_images)

    if arguments.plot:
        target = Path(arguments.plot)
        if target.suffix.lower() != ".png":
            raise ConfigError(f"--plot must name a .png file, got {arguments.plot!r}")
        if not target.parent.is_dir():
            raise ConfigError(f"--plot must be in an existing folder, got {arguments.plot!r}")
    rows, names = schedule_rows(config, steps, images)
    if arguments.plot:
        from .plots import plot_schedule

        plot_schedule(rows, names, arguments.plot, x_key="step" if config.cycle_unit == "step" else "epoch")
    if arguments.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        header = ["epoch", "step", "difficulty", *names] if config.cycle_unit == "step" else ["epoch", "difficulty", *names]
        writer.writerow(header)
        for row in rows:
            writer.writerow([_format_number(row[key]) for key in header])
    elif not arguments.plot or sys.stdout.isatty():
        _print_table(rows, names, config.cycle_unit)
    return 0


def schedule_rows(config: TrainConfig, steps_per_epoch: int, train_images: int | None) -> tuple[list[dict], list[str]]:
    """Return one row per epoch (or per step for a step-unit clock) with every knob's value."""
    from .train import plan_run

    plan = plan_run(config, train_images, steps_per_epoch_override=steps_per_epoch)
    batch_sizes = plan.batch_sizes
    clock, knobs = plan.clock, plan.knobs
    names = list(knobs)
    rows = []
    for epoch in range(config.epochs):
        clock.start_epoch(epoch)
        count = clock.steps_in_epoch(epoch) if config.cycle_unit == "step" else 1
        for _ in range(count):
            # Epochs count from 1, as in gct train's log and metrics.jsonl.
            row = {"epoch": epoch + 1, "step": clock.global_step, "difficulty": clock.difficulty}
            for name, knob in knobs.items():
                row[name] = batch_sizes[epoch] if name == "batch_size" else knob.at(clock)
            rows.append(row)
            clock.step()
    return rows, names


def _format_number(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _print_table(rows: list[dict], names: list[str], unit: str) -> None:
    columns = ["epoch", "step", "difficulty", *names] if unit == "step" else ["epoch", "difficulty", *names]
    widths = {column: max(len(column), 10) for column in columns}
    print("  ".join(column.rjust(widths[column]) for column in columns))
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            text = str(value) if isinstance(value, int) else f"{value:.6g}"
            cells.append(text.rjust(widths[column]))
        print("  ".join(cells))


def run_plot(arguments: argparse.Namespace) -> int:
    from .plots import plot_run

    metrics = Path(arguments.run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise DataError(f"DIR must be a folder written by gct train --out, got {arguments.run_dir} (no metrics.jsonl)")
    if not metrics.read_text().strip():
        raise DataError(f"DIR must contain at least one finished epoch, got {arguments.run_dir} (metrics.jsonl is empty)")
    path = plot_run(arguments.run_dir, arguments.output)
    print(path)
    return 0


def run_reproduce_command(arguments: argparse.Namespace) -> int:
    from .reproduce import run_reproduce

    return run_reproduce(arguments)


COMMANDS = {"train": run_train, "schedule": run_schedule, "plot": run_plot, "reproduce": run_reproduce_command}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one gct command and return its exit status.

    Every error becomes one line on standard error: status 2 for a bad option (ConfigError), 1
    for a failure at run time, 130 for Ctrl-C outside ``gct train``'s loop. ``--debug`` re-raises
    instead, so Python prints the traceback.
    """
    parser = build_parser()
    # parse_args would report unknown options as "gct: error", without the command's name.
    arguments, unknown = parser.parse_known_args(argv)
    prefix = f"gct {arguments.command}"
    if unknown:
        # Exit as argparse does for every other usage error.
        sys.stderr.write(f"{prefix}: error: unrecognized arguments: {' '.join(unknown)}\n")
        raise SystemExit(2)
    try:
        return COMMANDS[arguments.command](arguments)
    except ConfigError as error:
        if arguments.debug:
            raise
        sys.stderr.write(f"{prefix}: error: {error}\n")
        return 2
    except (DataError, CheckpointError, TrainingError) as error:
        if arguments.debug:
            raise
        sys.stderr.write(f"{prefix}: error: {error}\n")
        return 1
    except KeyboardInterrupt:
        if arguments.debug:
            raise
        sys.stderr.write(f"{prefix}: interrupted\n")
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader of the output went away (as `gct schedule --csv | head` does): not an error.
        # Point stdout at /dev/null so that Python's flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as error:
        # A file that cannot be created, read or written, such as --out naming a file.
        if arguments.debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        sys.stderr.write(f"{prefix}: error: {where}{error.strerror or error}\n")
        return 1
    except Exception as error:  # noqa: BLE001 - the last handler before Python prints a traceback
        if arguments.debug:
            raise
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        sys.stderr.write(
            f"{prefix}: error: unexpected {type(error).__name__}: {detail}; "
            "run again with --debug to see the traceback\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
