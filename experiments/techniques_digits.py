"""Each technique of docs/techniques.md on digits, over several seeds, against its constant-knob run.

A single digits run of 100 to 200 images swings by tens of points from one seed to the next. At
the default peak learning rate of 0.1 a run can stall near chance, so one seed per arm shows
nothing. This script trains every arm with seeds 0..N-1, paired so that seed k draws the same
subsets in every arm. It writes the final test accuracy of every run to a JSON file and prints a
Markdown table of mean, standard deviation and per-seed values.

    python experiments/techniques_digits.py                # about 10 minutes on one CPU thread
    python experiments/techniques_digits.py --seeds 2      # fewer seeds
    python experiments/techniques_digits.py --lr 0.02 --out experiments/results/techniques_digits_lr0.02.json

The teacher for distillation and the pretrained model for fine-tuning are trained once, with
seed 0, before the arms. Every run uses one CPU thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from cyclical_training import __version__
from cyclical_training.config import TrainConfig
from cyclical_training.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"

SSL = {"epochs": 30, "batch_size": 20, "unlabeled_ratio": 7}
KD = {"epochs": 15, "batch_size": 32, "train_size": 200}
CURRICULUM = {"epochs": 15, "batch_size": 64}
FINETUNE = {"epochs": 10, "batch_size": 20, "train_size": 100}

# (technique, arm, options); "{teacher}", "{pretrained}" and "{scores}" are filled in per run.
ARMS = [
    ("semi-supervised", "labeled images only", {**SSL, "train_size": 100}),
    ("semi-supervised", "cyclical", {**SSL, "labeled": 100, "unlabeled_weight": "0:1", "confidence": "0.98:0.9"}),
    ("semi-supervised", "constant", {**SSL, "labeled": 100, "unlabeled_weight": "1", "confidence": "0.95"}),
    ("curriculum", "no curriculum", CURRICULUM),
    ("curriculum", "cyclical", {**CURRICULUM, "curriculum": "0.3:1"}),
    ("curriculum", "constant", {**CURRICULUM, "curriculum": "1", "difficulty_scores": "{scores}"}),
    ("distillation", "no teacher", KD),
    ("distillation", "cyclical", {**KD, "teacher": "{teacher}", "kd_weight": "0.9:0.1"}),
    ("distillation", "constant", {**KD, "teacher": "{teacher}", "kd_weight": "0.5"}),
    ("fine-tuning", "from scratch", FINETUNE),
    ("fine-tuning", "cyclical", {**FINETUNE, "finetune": "{pretrained}", "unfreeze": "0:1"}),
    ("fine-tuning", "constant", {**FINETUNE, "finetune": "{pretrained}", "unfreeze": "1"}),
]
TEACHER = {"epochs": 20, "batch_size": 64, "seed": 0}
PRETRAINED = {"epochs": 15, "batch_size": 64, "train_size": 700, "seed": 1}


def train(options: dict, out: Path) -> dict:
    config = TrainConfig(**options, out=str(out), progress=False, num_threads=1)
    trainer = Trainer(config, log=lambda line: None)
    trainer.fit()
    tests = [record["test_accuracy"] for record in trainer.history]
    return {"final_test_accuracy": tests[-1], "best_test_accuracy": max(tests)}


def fill(options: dict, values: dict) -> dict:
    return {key: value.format(**values) if isinstance(value, str) else value for key, value in options.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of every arm (default: gct train's 0.1); "
                        "the teacher and the pretrained model keep the default")
    parser.add_argument("--work", default="runs/techniques-digits", help="folder for the runs' checkpoints")
    parser.add_argument("--out", default=str(RESULTS / "techniques_digits.json"), help="result JSON file")
    arguments = parser.parse_args()
    if arguments.seeds < 1:
        parser.error(f"--seeds must be an integer >= 1, got {arguments.seeds}")
    if arguments.lr is not None and not arguments.lr > 0:
        parser.error(f"--lr must be > 0, got {arguments.lr}")
    work = Path(arguments.work)
    started = time.perf_counter()

    teacher = train(TEACHER, work / "teacher")
    pretrained = train(PRETRAINED, work / "pretrained")
    print(f"teacher {teacher['final_test_accuracy']:.2%}, pretrained {pretrained['final_test_accuracy']:.2%}", flush=True)
    runs = []
    for seed in range(arguments.seeds):
        for technique, arm, options in ARMS:
            slug = f"{technique}-{arm.replace(' ', '-')}-seed{seed}"
            values = {
                "teacher": str(work / "teacher"),
                "pretrained": str(work / "pretrained"),
                "scores": str(work / f"curriculum-cyclical-seed{seed}" / "difficulty_scores.txt"),
            }
            run_options = {**fill(options, values), "seed": seed}
            if arguments.lr is not None:
                run_options["lr"] = arguments.lr
            result = train(run_options, work / slug)
            runs.append({"technique": technique, "arm": arm, "seed": seed, "options": run_options, **result})
            print(f"{technique} / {arm} / seed {seed}: {result['final_test_accuracy']:.2%}", flush=True)

    payload = {
        "command": shlex.join(["python", *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"cyclical_training": __version__, "torch": torch.__version__},
        "seconds": time.perf_counter() - started,
        "teacher": {"options": TEACHER, **teacher},
        "pretrained": {"options": PRETRAINED, **pretrained},
        "runs": runs,
    }
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(payload, indent=1) + "\n")
    print_table(runs)
    return 0


def print_table(runs: list[dict]) -> None:
    print("| technique | arm | mean | std | per seed |")
    print("| --- | --- | --- | --- | --- |")
    for technique, arm, _ in ARMS:
        values = [run["final_test_accuracy"] * 100 for run in runs if run["technique"] == technique and run["arm"] == arm]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        seeds = ", ".join(f"{value:.1f}" for value in values)
        print(f"| {technique} | {arm} | {statistics.mean(values):.2f}% | {spread:.2f} | {seeds} |")


if __name__ == "__main__":
    raise SystemExit(main())
