"""Faults during training: signals, SIGKILL while saving, non-finite numbers, reproducibility.

The subprocess tests start the installed gct console script on the embedded digits data with
one CPU thread: an epoch then takes a fraction of a second, and runs repeat exactly. Messages
come from the templates in tests/error_cases.py, which docs/errors.md shows.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cyclical_training.train as train_module
from cyclical_training.checkpoint import load_checkpoint, save_checkpoint, temporary_path
from cyclical_training.cli import main
from cyclical_training.config import TrainConfig
from cyclical_training.data import load_dataset
from cyclical_training.errors import CheckpointError, TrainingError
from cyclical_training.train import Trainer

from error_cases import (
    INTERRUPT_BEFORE_TRAINING,
    INTERRUPT_KEPT,
    INTERRUPT_NO_CHECKPOINT,
    INTERRUPT_NO_OUT,
    LOCKED_CHECKPOINT,
    NAN_RUN,
    NONFINITE_WEIGHTS,
    gct_command,
)

EPOCHS = 6
# Batches of 64 give 23 steps per epoch. An epoch took 0.3 s on one thread of a busy 2-core VM,
# long enough to send a signal in the middle of the run and short enough to keep the file fast.
RUN_OPTIONS = ("--epochs", str(EPOCHS), "--batch-size", "64", "--num-threads", "1", "--seed", "3")
PROCESS_TIMEOUT = 300


def quiet(_line: str) -> None:
    pass


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def finished_lines(path: Path) -> int:
    """Return the number of complete lines in ``path``, 0 when it does not exist yet."""
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def start_gct(arguments: list[str], folder: Path, name: str) -> subprocess.Popen:
    """Start ``gct ARGUMENTS`` in ``folder``, with output in NAME.out and NAME.err there."""
    with open(folder / f"{name}.out", "w") as stdout, open(folder / f"{name}.err", "w") as stderr:
        return subprocess.Popen([*gct_command(), *arguments], cwd=folder, stdout=stdout, stderr=stderr)


def all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors.values() if tensor.is_floating_point())


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Subprocess runs ---------------------------------------------------------------------------------

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class InterruptedRun:
    """A run that got a signal after its first epoch and was then resumed."""

    out: Path
    status: int
    err: str
    finished: int
    state: dict
    resumed: subprocess.CompletedProcess


@dataclass
class DigitsRuns:
    """Metrics of the runs without a break, and the interrupted runs by signal number."""

    uninterrupted: list[list[dict]]
    interrupted: dict[int, InterruptedRun]


def signal_after_first_epoch(processes: dict[int, subprocess.Popen], outs: dict[int, Path]) -> None:
    """Send each process its signal as soon as its metrics.jsonl has one line."""
    waiting = dict(processes)
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while waiting:
        for signum, process in list(waiting.items()):
            if finished_lines(outs[signum] / "metrics.jsonl") >= 1:
                process.send_signal(signum)
                del waiting[signum]
            elif process.poll() is not None:
                pytest.fail(f"gct exited with status {process.returncode} before its first epoch ended")
        if time.monotonic() > deadline:
            pytest.fail(f"no epoch finished in {PROCESS_TIMEOUT} s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> DigitsRuns:
    """Run RUN_OPTIONS twice without a break and once per signal with a break and a resume.

    The four first runs go at the same time, and so do the two resumes, to keep the file fast.
    """
    folder = tmp_path_factory.mktemp("digits-runs")
    outs = {signum: folder / signum.name for signum in SIGNALS}
    started = []
    try:
        plain = [start_gct(["train", *RUN_OPTIONS, "--out", str(folder / f"plain{index}")], folder, f"plain{index}")
                 for index in range(2)]
        started += plain
        first = {signum: start_gct(["train", *RUN_OPTIONS, "--out", str(outs[signum])], folder, signum.name)
                 for signum in SIGNALS}
        started += first.values()

        signal_after_first_epoch(first, outs)
        statuses = {signum: process.wait(timeout=PROCESS_TIMEOUT) for signum, process in first.items()}
        finished = {signum: finished_lines(outs[signum] / "metrics.jsonl") for signum in SIGNALS}
        states = {signum: load_checkpoint(outs[signum]) for signum in SIGNALS}

        resumes = {
            signum: subprocess.Popen([*gct_command(), "train", "--resume", str(outs[signum])], cwd=folder,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for signum in SIGNALS
        }
        started += resumes.values()
        resumed = {}
        for signum, process in resumes.items():
            stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
            resumed[signum] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        for index, process in enumerate(plain):
            assert process.wait(timeout=PROCESS_TIMEOUT) == 0, (folder / f"plain{index}.err").read_text()
    finally:
        # A failed wait or check above must not leave training processes behind.
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()

    interrupted = {
        signum: InterruptedRun(outs[signum], statuses[signum], (folder / f"{signum.name}.err").read_text(),
                               finished[signum], states[signum], resumed[signum])
        for signum in SIGNALS
    }
    uninterrupted = [without_seconds(read_metrics(folder / f"plain{index}")) for index in range(2)]
    return DigitsRuns(uninterrupted, interrupted)


def test_same_seed_same_metrics(digits_runs):
    first, second = digits_runs.uninterrupted

    assert len(first) == EPOCHS
    assert first == second


@pytest.mark.parametrize("signum", SIGNALS, ids=[signum.name for signum in SIGNALS])
def test_signal_keeps_checkpoint(signum, digits_runs):
    run = digits_runs.interrupted[signum]

    assert 1 <= run.finished < EPOCHS, "the signal arrived after the run had finished"
    assert run.status == 128 + signum
    assert run.err == INTERRUPT_KEPT.format(
        signal=signum.name, epoch=run.finished + 1, epochs=EPOCHS, out=run.out, saved=run.finished) + "\n"
    assert run.state["epoch"] == run.finished - 1
    assert all_finite(run.state["model"])


@pytest.mark.parametrize("signum", SIGNALS, ids=[signum.name for signum in SIGNALS])
def test_resume_after_signal_finishes(signum, digits_runs):
    run = digits_runs.interrupted[signum]

    assert run.resumed.returncode == 0, run.resumed.stderr
    assert f"resuming {run.out} after epoch {run.finished}\n" in run.resumed.stdout
    assert without_seconds(read_metrics(run.out)) == digits_runs.uninterrupted[0]
    assert load_checkpoint(run.out)["epoch"] == EPOCHS - 1


# Signals in process ------------------------------------------------------------------------------


def signal_self(signum: signal.Signals):
    """Return a replacement method that sends ``signum`` to this process."""
    def send(*args, **kwargs):
        os.kill(os.getpid(), signum)
        # The handler raises KeyboardInterrupt at the next bytecode of the main thread.
        time.sleep(5)
        raise AssertionError(f"{signum.name} was not turned into KeyboardInterrupt")

    return send


def test_signal_in_first_epoch_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "train_epoch", signal_self(signal.SIGTERM))
    out = tmp_path / "run"

    status = main(["train", "--epochs", "3", "--num-threads", "1", "--out", str(out)])

    assert capsys.readouterr().err == INTERRUPT_NO_CHECKPOINT.format(signal="SIGTERM", epochs=3, out=out) + "\n"
    assert status == 128 + signal.SIGTERM
    assert not (out / "checkpoint.pt").exists()


def test_signal_without_out_message(monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "train_epoch", signal_self(signal.SIGINT))

    status = main(["train", "--epochs", "3", "--num-threads", "1"])

    assert capsys.readouterr().err == INTERRUPT_NO_OUT.format(signal="SIGINT", epoch=1, epochs=3) + "\n"
    assert status == 128 + signal.SIGINT


def test_signal_before_training_message(monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "_build_model_and_optimizer", signal_self(signal.SIGTERM))

    status = main(["train", "--epochs", "3", "--num-threads", "1"])

    assert capsys.readouterr().err == INTERRUPT_BEFORE_TRAINING.format(signal="SIGTERM") + "\n"
    assert status == 128 + signal.SIGTERM


def test_signal_while_saving_waits_for_files(tmp_path, monkeypatch, capsys):
    # A signal that arrives during the first save is raised only after metrics.jsonl and
    # checkpoint.pt both describe epoch 1.
    save = train_module.save_checkpoint

    def save_after_signal(path, state):
        os.kill(os.getpid(), signal.SIGINT)
        save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", save_after_signal)
    out = tmp_path / "run"

    status = main(["train", "--epochs", "3", "--num-threads", "1", "--out", str(out)])

    assert capsys.readouterr().err == INTERRUPT_KEPT.format(
        signal="SIGINT", epoch=2, epochs=3, out=out, saved=1) + "\n"
    assert status == 128 + signal.SIGINT
    assert finished_lines(out / "metrics.jsonl") == 1
    assert load_checkpoint(out)["epoch"] == 0


# Checkpoint files ------------------------------------------------------------------------------

# Imports torch once, writes a first checkpoint, then for every line on standard input forks a
# child that saves checkpoints in a loop until it is killed. It prints the child's pid and, once
# the child is gone, its wait status. Forking skips the seconds that importing torch takes.
SAVE_LOOP = r"""
import os
import sys

import torch

torch.set_num_threads(1)
from cyclical_training.checkpoint import save_checkpoint

path, elements = sys.argv[1], int(sys.argv[2])
weights = torch.arange(elements, dtype=torch.float32)
save_checkpoint(path, {"model": {"weight": weights}, "epoch": 0})
print("ready", flush=True)
for _ in sys.stdin:
    child = os.fork()
    if child == 0:
        for epoch in range(1, 1 << 30):
            save_checkpoint(path, {"model": {"weight": weights}, "epoch": epoch})
    print(child, flush=True)
    print(os.waitpid(child, 0)[1], flush=True)
"""

# 6 million float32 values: a 24 MB checkpoint, an estimated 0.1 to 0.3 s to write.
SAVE_ELEMENTS = 6_000_000
KILLS = 20


def test_sigkill_while_saving_keeps_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    temporary = temporary_path(checkpoint)
    expected = torch.arange(SAVE_ELEMENTS, dtype=torch.float32)
    saver = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(checkpoint), str(SAVE_ELEMENTS)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    delays = random.Random(0)
    killed_while_writing = 0
    try:
        assert saver.stdout.readline() == "ready\n"
        for _ in range(KILLS):
            before = temporary.stat().st_mtime_ns if temporary.exists() else 0
            saver.stdin.write("go\n")
            saver.stdin.flush()
            child = int(saver.stdout.readline())
            time.sleep(delays.uniform(0.0, 0.3))
            os.kill(child, signal.SIGKILL)
            status = int(saver.stdout.readline())

            state = load_checkpoint(checkpoint, required=("model", "epoch"))
            leftovers = sorted(path.name for path in tmp_path.iterdir() if path != checkpoint)
            assert os.WIFSIGNALED(status)
            assert os.WTERMSIG(status) == signal.SIGKILL
            assert torch.equal(state["model"]["weight"], expected)
            assert leftovers in ([], [temporary.name])
            if temporary.exists() and temporary.stat().st_mtime_ns > before:
                killed_while_writing += 1
    finally:
        saver.kill()
        saver.wait(timeout=PROCESS_TIMEOUT)

    # Nearly every kill lands in torch.save or fsync, because the child does nothing else.
    assert killed_while_writing >= 1
    save_checkpoint(checkpoint, {"model": {"weight": expected}, "epoch": 0})
    assert not temporary.exists()


def test_save_while_another_process_writes(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {"model": {"weight": torch.ones(3)}, "epoch": 0})
    before = file_hash(checkpoint)

    with open(temporary_path(checkpoint), "wb") as other_writer:
        fcntl.flock(other_writer.fileno(), fcntl.LOCK_EX)
        with pytest.raises(CheckpointError) as error:
            save_checkpoint(checkpoint, {"model": {"weight": torch.zeros(3)}, "epoch": 1})

    assert str(error.value) == LOCKED_CHECKPOINT.format(folder=tmp_path)
    assert file_hash(checkpoint) == before


# Numbers that are no longer finite ------------------------------------------------------------


def test_nonfinite_loss_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    saved_hashes = []
    save = train_module.save_checkpoint

    def save_and_hash(path, state):
        save(path, state)
        saved_hashes.append(file_hash(Path(path)))

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_hash)
    out = tmp_path / "run"

    status = main(["train", *(argument.replace("<tmp>", str(tmp_path)) for argument in NAN_RUN)])

    err = capsys.readouterr().err
    state = load_checkpoint(out)
    assert status == 1
    assert "training stopped: the loss or gradient norm is not finite (loss " in err
    assert ") at epoch 2, step " in err
    assert "Lower --lr, add --clip-norm, or raise --temperature" in err
    assert len(saved_hashes) == 1
    assert file_hash(out / "checkpoint.pt") == saved_hashes[0]
    assert state["epoch"] == 0
    assert all_finite(state["model"])
    assert finished_lines(out / "metrics.jsonl") == 1


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# With batches of 256, an epoch of the 1,438 digits training images has 6 steps.
STEPS_PER_EPOCH = 6


def poisoned_trainer(digits, out: Path, poisoned_step: int, **options) -> tuple[Trainer, str]:
    """Build a 3-epoch trainer whose first parameter gets an infinite gradient at ``poisoned_step``.

    Returns the trainer and the name of the poisoned parameter. Steps count from 1 over the run.
    """
    config = TrainConfig(epochs=3, batch_size=256, num_threads=1, progress=False, out=str(out), **options)
    trainer = Trainer(config, log=quiet, dataset=digits)
    name, parameter = next(iter(trainer.model.named_parameters()))
    steps = itertools.count(1)

    def poison(gradient: torch.Tensor) -> torch.Tensor:
        if next(steps) == poisoned_step:
            return torch.full_like(gradient, float("inf"))
        return gradient

    parameter.register_hook(poison)
    return trainer, name


def test_infinite_gradient_with_clipping_stops(digits, tmp_path):
    trainer, _ = poisoned_trainer(digits, tmp_path / "run", poisoned_step=3, clip_norm=10.0)

    with pytest.raises(TrainingError, match=r"not finite \(loss [0-9.]+, gradient norm inf\) at epoch 1, step 3, "):
        trainer.fit()

    assert all_finite(trainer.model.state_dict())


def test_infinite_gradient_without_clipping_stops(digits, tmp_path):
    trainer, _ = poisoned_trainer(digits, tmp_path / "run", poisoned_step=3)

    with pytest.raises(TrainingError, match=r"at epoch 1, step 3, "):
        trainer.fit()

    assert all_finite(trainer.model.state_dict())


def test_infinite_gradient_stops_before_weights_change(digits, tmp_path):
    # The guard reads the gradient norm even without clipping, so the poisoned step never runs.
    out = tmp_path / "run"
    trainer, _ = poisoned_trainer(digits, out, poisoned_step=2 * STEPS_PER_EPOCH)

    with pytest.raises(TrainingError, match=r"gradient norm inf\) at epoch 2, step 6, "):
        trainer.fit()

    state = load_checkpoint(out)
    assert state["epoch"] == 0
    assert all_finite(state["model"])
    assert all_finite(trainer.model.state_dict())


def test_infinite_weights_never_saved(digits, tmp_path):
    # A second line of defence: save_checkpoint itself refuses weights that are not finite.
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(epochs=1, batch_size=256, num_threads=1, progress=False, out=str(out)),
                   log=quiet, dataset=digits)
    trainer.fit()
    before = file_hash(out / "checkpoint.pt")
    state = load_checkpoint(out)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("inf"))

    with pytest.raises(TrainingError) as error:
        save_checkpoint(out / "checkpoint.pt", state)

    assert str(error.value) == NONFINITE_WEIGHTS.format(folder=out, tensor=name)
    assert file_hash(out / "checkpoint.pt") == before
    assert not temporary_path(out / "checkpoint.pt").exists()
