"""gct train on an image-folder tree that is streamed from disk instead of held in memory."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cyclical_training.cli import main


def make_tree(root, per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 3)):
        for label, name in enumerate(("cat", "dog", "fox")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                height, width = int(rng.integers(24, 60)), int(rng.integers(24, 60))
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                pixels[..., label] = 255  # one colour channel tells the class apart
                Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)


def test_stream_mode_trains_mixed_size_jpegs(tmp_path, capsys):
    make_tree(tmp_path / "tree")
    out = tmp_path / "run"
    code = main([
        "train", "--data", str(tmp_path / "tree"), "--data-mode", "stream", "--image-size", "32",
        "--workers", "0", "--epochs", "2", "--batch-size", "8", "--weight-decay", "1e-4:1e-3",
        "--out", str(out), "--no-progress",
    ])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "24 training and 9 test images, 3 classes, 3x32x32; model fast-cnn" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["knobs"]["weight_decay"] for record in records] == [1e-4, 1e-4]
    assert 0.0 <= records[-1]["test_accuracy"] <= 1.0


def test_stream_mode_train_size_subset(tmp_path, capsys):
    make_tree(tmp_path / "tree")
    code = main([
        "train", "--data", str(tmp_path / "tree"), "--data-mode", "stream", "--image-size", "32",
        "--workers", "0", "--epochs", "1", "--batch-size", "6", "--train-size", "12", "--no-progress",
    ])
    assert code == 0
    assert "12 training and 9 test images" in capsys.readouterr().out


def test_stream_mode_rejects_archive(tmp_path, capsys):
    archive = tmp_path / "data.tar"
    archive.write_bytes(b"")
    code = main(["train", "--data", str(archive), "--data-mode", "stream", "--epochs", "1"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"gct train: error: --data-mode stream needs an image-folder tree, got --data {archive}\n"
    )
