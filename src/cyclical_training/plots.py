"""PNG plots of knob schedules and of finished runs, drawn with matplotlib's file-only backend."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or opened
import matplotlib.pyplot as plt  # noqa: E402


def plot_schedule(rows: list[dict], names: list[str], path: str | Path, x_key: str = "epoch") -> Path:
    """Draw the difficulty and each knob against ``x_key``, one panel each, to ``path``."""
    panels = ["difficulty", *names]
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 1.7 * len(panels)), sharex=True, squeeze=False)
    xs = [row[x_key] for row in rows]
    for axis, name in zip(axes[:, 0], panels):
        axis.plot(xs, [row[name] for row in rows], drawstyle="steps-post" if x_key == "epoch" else "default")
        axis.set_ylabel(name, rotation=0, ha="right", va="center")
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x_key)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw the train and test curves and every knob of the run in ``run_dir`` (its metrics.jsonl)."""
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    knob_names = list(records[0]["knobs"]) if records else []
    panels = 2 + len(knob_names)
    figure, axes = plt.subplots(panels, 1, figsize=(7, 1.9 * panels), sharex=True, squeeze=False)
    epochs = [record["epoch"] for record in records]

    loss_axis, accuracy_axis = axes[0, 0], axes[1, 0]
    loss_axis.plot(epochs, [r["train_loss"] for r in records], label="train")
    loss_axis.plot(epochs, [r["test_loss"] for r in records], label="test")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [100 * r["train_accuracy"] for r in records], label="train")
    accuracy_axis.plot(epochs, [100 * r["test_accuracy"] for r in records], label="test")
    accuracy_axis.set_ylabel("accuracy %")
    accuracy_axis.legend()
    for axis, name in zip(axes[2:, 0], knob_names):
        axis.plot(epochs, [r["knobs"][name] for r in records], marker=".")
        axis.set_ylabel(name)
    for axis in axes[:, 0]:
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch")
    figure.tight_layout()
    path = Path(path) if path else run_dir / "run.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
