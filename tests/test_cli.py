"""The gct command line: schedule output against the published schedule, train runs, errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from cyclical_training.cli import main


def run_cli(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def paper_eta(epoch: int, epochs: int, factor: int) -> float:
    """The per-epoch eta of Smith's General Cyclical Training code (1 = easy, 0 = hard)."""
    if factor * epoch < epochs:
        return 1.0 - factor * epoch / (epochs - 1)
    if factor == 1:
        return 0.0
    return (factor * epoch / (epochs - 1) - 1.0) / (factor - 1)


def test_schedule_csv_matches_paper_for_all_factors(capsys):
    easy, hard = 5e-5, 5e-4
    mismatches = []
    for factor in range(1, 5):
        for epochs in range(2, 301):
            code, out, _ = run_cli(
                capsys, "schedule", "--epochs", str(epochs), "--cycle-factor", str(factor),
                "--weight-decay", f"{easy}:{hard}", "--csv",
            )
            assert code == 0
            rows = list(csv.DictReader(io.StringIO(out)))
            assert len(rows) == epochs
            for row in rows:
                # The CSV counts epochs from 1; the paper's e counts from 0.
                eta = paper_eta(int(row["epoch"]) - 1, epochs, factor)
                expected = eta * easy + (1 - eta) * hard
                if abs(float(row["weight_decay"]) - expected) > 1e-15:
                    mismatches.append((factor, epochs, row["epoch"], row["weight_decay"], expected))
    assert mismatches == []


def test_schedule_csv_header_and_values(capsys):
    code, out, _ = run_cli(
        capsys, "schedule", "--epochs", "5", "--weight-decay", "1e-4:1e-3", "--temperature", "0.5:2",
        "--clip-norm", "1:10", "--lr-schedule", "constant", "--csv",
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["epoch", "difficulty", "lr", "momentum", "weight_decay", "temperature", "clip_norm", "batch_size"]
    assert [float(r["difficulty"]) for r in rows] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert [float(r["temperature"]) for r in rows] == [0.5, 1.25, 2.0, 1.25, 0.5]
    assert [float(r["clip_norm"]) for r in rows] == [1.0, 5.5, 10.0, 5.5, 1.0]


def test_schedule_per_step(capsys):
    code, out, _ = run_cli(
        capsys, "schedule", "--epochs", "2", "--steps-per-epoch", "3", "--cycle-unit", "step",
        "--cycle-peak", "1", "--temperature", "1:2", "--csv",
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [float(r["temperature"]) for r in rows] == pytest.approx([1.0, 1.2, 1.4, 1.6, 1.8, 2.0])


def test_schedule_plot_writes_png(capsys, tmp_path):
    target = tmp_path / "schedule.png"
    code, _, _ = run_cli(capsys, "schedule", "--epochs", "10", "--weight-decay", "1e-4:1e-3", "--plot", str(target))
    assert code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_digits_writes_run_files(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        capsys, "train", "--epochs", "2", "--weight-decay", "5e-4:5e-3", "--temperature", "0.5:2",
        "--clip-norm", "1:10", "--out", str(out), "--no-progress",
    )
    assert code == 0
    assert "parameters: weight decay on" in stdout
    assert "epoch 2/2" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]["knobs"]) >= {"lr", "weight_decay", "temperature", "clip_norm"}
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert (out / "checkpoint.pt").is_file()
    assert "weight_decay: 5e-4:5e-3" in (out / "config.yaml").read_text()


def test_config_file_with_command_line_override(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nweight-decay: 1e-4:1e-3\ntemperature: 0.5\n")
    code, out, _ = run_cli(capsys, "schedule", "--config", str(config), "--temperature", "2", "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3
    assert {float(r["temperature"]) for r in rows} == {2.0}
    assert [float(r["weight_decay"]) for r in rows] == pytest.approx([1e-4, 1e-3, 1e-4])


def test_schedule_reads_train_config(capsys, tmp_path):
    # Options that only gct train uses, as in the config.yaml a run writes, are ignored.
    config = tmp_path / "config.yaml"
    config.write_text("data: digits\nout: runs/x\nnum_threads: 1\nepochs: 3\nweight_decay: '1e-4:1e-3'\n")
    code, out, _ = run_cli(capsys, "schedule", "--config", str(config), "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["weight_decay"]) for r in rows] == pytest.approx([1e-4, 1e-3, 1e-4])


def test_config_file_reads_colon_pairs_as_cycles(capsys, tmp_path):
    # YAML 1.1 would read 1:10 as the base-60 integer 70.
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nclip-norm: 1:10\ntemperature: 1:2\n")
    code, out, _ = run_cli(capsys, "schedule", "--config", str(config), "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["clip_norm"]) for r in rows] == [1.0, 10.0, 1.0]
    assert [float(r["temperature"]) for r in rows] == [1.0, 2.0, 1.0]


BAD_OPTIONS = [
    (["--weight-decay", "1e-3:"], "--weight-decay must be a number X or a cycle EASY:HARD of two numbers, got '1e-3:'"),
    (["--weight-decay", "a:b"], "--weight-decay must be a number X or a cycle EASY:HARD of two numbers, got 'a:b'"),
    (["--weight-decay", "1:2:3"], "--weight-decay must be a number X or a cycle EASY:HARD (optionally EASY:HARD:log), got '1:2:3'"),
    (["--weight-decay", "nan"], "--weight-decay must contain finite numbers, got 'nan'"),
    (["--temperature", "inf:1"], "--temperature must contain finite numbers, got 'inf:1'"),
    (["--weight-decay=-1e-4"], "--weight-decay must be >= 0, got -0.0001"),
    (["--temperature", "0"], "--temperature must be > 0, got 0"),
    (["--temperature=-1:2"], "--temperature must be > 0, got -1"),
    (["--clip-norm", "0:5"], "--clip-norm must be > 0, got 0"),
    (["--cycle-peak", "0"], "--cycle-peak must be in (0, 1], got 0"),
    (["--cycle-peak", "1.5"], "--cycle-peak must be in (0, 1], got 1.5"),
    (["--cycle-factor", "0.5"], "--cycle-factor must be >= 1, got 0.5"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--epochs", "ten"], "--epochs must be an integer, got 'ten'"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "12.5"], "--batch-size must be integers >= 1, got '12.5'"),
    (["--cycle-shape", "square"], "--cycle-shape must be one of linear, cosine, got 'square'"),
    (["--cycle-unit", "batch"], "--cycle-unit must be one of epoch, step, got 'batch'"),
    (["--cycles", "0"], "--cycles must be an integer >= 1, got 0"),
    (["--weight-decay", "0:1e-3:log"], "--weight-decay with log interpolation must have both ends > 0, got 0:0.001"),
]


@pytest.mark.parametrize("arguments, message", BAD_OPTIONS)
def test_bad_option_one_line_exit_2(capsys, arguments, message):
    code, out, err = run_cli(capsys, "schedule", "--epochs", "5", *arguments)
    assert code == 2
    assert err == f"gct schedule: error: {message}\n"
    assert out == ""


def test_train_rejects_unknown_model(capsys):
    code, _, err = run_cli(capsys, "train", "--model", "vgg")
    assert code == 2
    assert err == "gct train: error: --model must be one of auto, fast-cnn, fast-cnn-wide, resnet18, digits-net, resnet50, got 'vgg'\n"


def test_unknown_config_key_suggests_name(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 2\nweight_decy: 1e-4\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2
    assert err == f"gct train: error: --config {config}: unknown option 'weight_decy' in config; did you mean 'weight_decay'?\n"


def test_config_yaml_syntax_error_names_line(capsys, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("epochs: 2\nlr: [0.1\nseed: 1\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2
    assert err.startswith(f"gct train: error: --config {config} is not valid YAML at line 3")
    assert err.count("\n") == 1


def test_config_wrong_type(capsys, tmp_path):
    config = tmp_path / "typed.yaml"
    config.write_text("epochs: [1, 2]\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2
    assert err == "gct train: error: --epochs must be an integer, got [1, 2]\n"


def test_unknown_flag_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--learning-rate", "0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unrecognized arguments: --learning-rate 0.1" in err


def test_missing_data_path_exit_1(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "nowhere.tar.gz"), "--epochs", "1")
    assert code == 1
    assert str(tmp_path / "nowhere.tar.gz") in err
    assert err.count("\n") == 1


def test_console_script_module_entry():
    result = subprocess.run(
        [sys.executable, "-m", "cyclical_training", "schedule", "--epochs", "3", "--csv"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0
    assert result.stdout.splitlines()[0].startswith("epoch,difficulty,lr")


def test_plot_draws_finished_run(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--temperature", "0.5:2", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    code, stdout, _ = run_cli(capsys, "plot", str(out))
    assert code == 0
    assert stdout.strip() == str(out / "run.png")
    assert (out / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_rejects_folder_without_metrics(capsys, tmp_path):
    code, _, err = run_cli(capsys, "plot", str(tmp_path))
    assert code == 1
    assert err == f"gct plot: error: DIR must be a folder written by gct train --out, got {tmp_path} (no metrics.jsonl)\n"


def test_tensorboard_writes_event_files(capsys, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--epochs", "2", "--weight-decay", "1e-4:1e-3", "--out", str(out),
                         "--tensorboard", "--no-progress")
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "knobs/weight_decay", "knobs/lr", "test/accuracy"} <= tags
    steps = [event.step for event in events.Scalars("knobs/weight_decay")]
    assert steps == list(range(len(steps)))
    assert len(steps) == 12


@pytest.mark.parametrize(
    "target, message",
    [
        ("x.txt", "--plot must name a .png file, got 'x.txt'"),
        ("missing-folder/x.png", "--plot must be in an existing folder, got 'missing-folder/x.png'"),
    ],
)
def test_schedule_plot_rejects_bad_target(capsys, tmp_path, monkeypatch, target, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "schedule", "--epochs", "3", "--plot", target)
    assert code == 2
    assert err == f"gct schedule: error: {message}\n"
    assert not (tmp_path / "missing-folder").exists()


def test_schedule_csv_into_closed_pipe():
    result = subprocess.run(
        f"{sys.executable} -m cyclical_training schedule --epochs 3000 --csv | head -1",
        shell=True, capture_output=True, text=True, timeout=120,
    )
    assert result.stdout.startswith("epoch,difficulty")
    assert result.stderr == ""
