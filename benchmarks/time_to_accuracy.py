"""Wall time until a model first reaches a test accuracy, timed per epoch through the Trainer API.

The default is fast-cnn on 4K CIFAR-10 (4,000 class-balanced training images, the full
10,000-image test split) with a target of 75 % test accuracy. A log callback timestamps every
epoch: ``Trainer.fit`` appends the epoch's record to ``trainer.history`` and then logs its
line, so the callback reads the finished epoch's record, test accuracy included.

The run stops after the first epoch that reaches the target (``--run-all-epochs`` turns this
off) or after the first epoch that ends past ``--max-minutes``. Either way the JSON records
every finished epoch, the best accuracy and when it was reached.

    python benchmarks/time_to_accuracy.py                 # about 10-25 minutes on 2 CPU cores
    python benchmarks/time_to_accuracy.py --set epochs=40 --set lr=0.2
    python benchmarks/time_to_accuracy.py --quick         # digits-net on digits, 2 epochs, seconds
"""

from __future__ import annotations

import time

from common import (
    CIFAR_ARCHIVE, base_parser, command_line, machine_info, pick_device, precision_for, print_table,
    result_path, write_result,
)
from cyclical_training.config import TrainConfig
from cyclical_training.train import Trainer

# The settings of the recorded run. They were chosen by reasoning from one earlier 4K run of
# fast-cnn (batch 128, lr 0.1), not by a search, so faster settings may well exist.
DEFAULT_SETTINGS = {
    "model": "fast-cnn",
    "epochs": 45,
    "batch_size": 128,
    "lr": 0.1,
    "warmup_epochs": 2.0,
    "momentum": 0.9,
    "weight_decay": "5e-4:2e-3",
    "label_smoothing": 0.1,
    "augment": "auto",
}

# One thread: with OpenMP's default active waiting, 2 threads on a busy 2-core machine were
# up to 5x slower than 1 in a short probe.
QUICK_SETTINGS = {
    "model": "digits-net",
    "epochs": 2,
    "batch_size": 128,
    "lr": 0.1,
    "warmup_epochs": 1.0,
    "num_threads": 1,
}


class StopRun(Exception):
    """Raised from the log callback to end ``fit`` after an epoch."""


class EpochLog:
    """Log callback that timestamps each finished epoch and stops the run when it is done."""

    def __init__(self, started: float, target: float, stop_at_target: bool, max_seconds: float) -> None:
        self.started = started
        self.target = target
        self.stop_at_target = stop_at_target
        self.max_seconds = max_seconds
        self.trainer: Trainer | None = None
        self.fit_started: float | None = None
        self.epochs: list[dict] = []
        self.stop_reason = "all epochs finished"

    def __call__(self, line: str) -> None:
        now = time.perf_counter()
        print(line, flush=True)
        if self.trainer is None or len(self.trainer.history) == len(self.epochs):
            return  # a set-up line, not the end of an epoch

        record = self.trainer.history[-1]
        self.epochs.append({
            "epoch": record["epoch"],
            "test_accuracy": record["test_accuracy"],
            "train_accuracy": record["train_accuracy"],
            "epoch_seconds": record["seconds"],
            "seconds_since_fit_start": now - self.fit_started,
            "seconds_since_script_start": now - self.started,
        })
        if self.stop_at_target and record["test_accuracy"] >= self.target:
            self.stop_reason = "target reached"
            raise StopRun
        if now - self.fit_started > self.max_seconds:
            self.stop_reason = "time cap reached"
            raise StopRun


def parse_setting(text: str) -> tuple[str, object]:
    """Parse ``KEY=VALUE`` into a TrainConfig field name and an int, float or string value."""
    key, separator, raw = text.partition("=")
    if not separator:
        raise SystemExit(f"--set must be KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key.replace("-", "_"), convert(raw)
        except ValueError:
            pass
    return key.replace("-", "_"), raw


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=CIFAR_ARCHIVE, help=f"data set or archive (default: {CIFAR_ARCHIVE})")
    parser.add_argument("--train-size", type=int, default=4000, help="training images (default 4000)")
    parser.add_argument("--target", type=float, default=0.75, help="test accuracy to reach, in [0, 1] (default 0.75)")
    parser.add_argument("--max-minutes", type=float, default=25.0,
                        help="stop after the first epoch that ends past this many minutes of training (default 25)")
    parser.add_argument("--run-all-epochs", action="store_true", help="keep training after the target is reached")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field of the default settings, e.g. --set epochs=40")
    args = parser.parse_args()

    device = pick_device()
    machine = machine_info(device)
    settings = dict(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
    settings.update(parse_setting(text) for text in args.set)
    data, train_size, target = args.data, args.train_size, args.target
    if args.quick:
        # The embedded 8x8 digits need no file, so the smoke run works anywhere.
        data, train_size, target = "digits", None, 0.5
    config = TrainConfig(
        data=data, train_size=train_size, seed=args.seed, progress=False,
        precision=precision_for(device), **settings,
    )

    started = time.perf_counter()
    log = EpochLog(started, target, not args.run_all_epochs, args.max_minutes * 60.0)
    trainer = Trainer(config, log=log)
    log.trainer = trainer
    setup_seconds = time.perf_counter() - started

    log.fit_started = time.perf_counter()
    try:
        trainer.fit()
    except StopRun:
        pass
    payload = build_result(args, config, trainer, log, target, setup_seconds, machine)
    write_result(result_path(args.out, "time_to_accuracy", args.quick), payload)
    print_summary(payload)


def build_result(args, config: TrainConfig, trainer: Trainer, log: EpochLog, target: float,
                 setup_seconds: float, machine: dict) -> dict:
    epochs = log.epochs
    reached = next((epoch for epoch in epochs if epoch["test_accuracy"] >= target), None)
    best = max(epochs, key=lambda epoch: epoch["test_accuracy"]) if epochs else None
    return {
        "benchmark": "time_to_accuracy",
        "quick": args.quick,
        "machine": machine,
        "command": command_line(),
        "settings": {key: value for key, value in config.to_dict().items()},
        "train_images": len(trainer.train_split.labels),
        "test_images": len(trainer.test_split.labels),
        "target_accuracy": target,
        "max_minutes": args.max_minutes,
        "setup_seconds": setup_seconds,
        "reached_target": reached is not None,
        "first_reach": reached,
        "best": best,
        "stop_reason": log.stop_reason,
        "epochs": epochs,
    }


def print_summary(payload: dict) -> None:
    rows = []
    for label, epoch in (("first reach of target", payload["first_reach"]), ("best", payload["best"])):
        if epoch is None:
            rows.append((label, "-", "-", "-"))
        else:
            rows.append((label, epoch["epoch"], epoch["test_accuracy"], epoch["seconds_since_fit_start"]))
    print_table(("", "epoch", "test accuracy", "seconds since fit start"), rows)
    print(f"target {payload['target_accuracy']:.2%}, stopped: {payload['stop_reason']}")


if __name__ == "__main__":
    main()
