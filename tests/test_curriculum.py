"""Cyclical data curriculum: pools of the easiest images, score files and out-of-fold scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cyclical_training.config import TrainConfig
from cyclical_training.curriculum import SCORES_NAME, CurriculumLoader, load_difficulty_scores, pool_size
from cyclical_training.data import load_dataset
from cyclical_training.errors import DataError
from cyclical_training.train import Trainer, plan_run


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def quiet(_line: str) -> None:
    pass


def make_trainer(digits, **options) -> Trainer:
    values = {"epochs": 3, "batch_size": 128, "progress": False, "num_threads": 2, "curriculum": "0.3:1"}
    values.update(options)
    return Trainer(TrainConfig(**values), log=quiet, dataset=digits)


def easiest(scores: torch.Tensor, fraction: float, labels: torch.Tensor | None = None) -> set[int]:
    """The easiest ``fraction`` of each class, computed class by class with a plain sort."""
    labels = torch.zeros(len(scores), dtype=torch.long) if labels is None else labels
    chosen = set()
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).squeeze(1)
        ranked = members[torch.argsort(scores[members], stable=True)]
        chosen |= set(ranked[: pool_size(fraction, len(members))].tolist())
    return chosen


def test_draws_at_easy_end_from_easiest_fraction():
    count = 1000
    scores = torch.rand(count, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    images = torch.zeros(count, 1, 2, 2, dtype=torch.uint8)
    labels = torch.zeros(count, dtype=torch.long)
    loader = CurriculumLoader(images, labels, scores, [0.3, 1.0, 0.3], batch_size=64, seed=0)

    drawn = loader.indices.tolist()
    assert len(drawn) == count
    assert set(drawn) == easiest(scores, 0.3)
    # 1000 draws from a pool of 300: every pool image 3 or 4 times.
    repeats = np.bincount(drawn, minlength=count)[sorted(easiest(scores, 0.3))]
    assert set(repeats.tolist()) <= {3, 4}
    assert len(loader) == math.ceil(count / 64)

    loader.set_epoch(1)
    assert sorted(loader.indices.tolist()) == list(range(count))


def test_batches_come_from_pool():
    count = 100
    scores = torch.arange(count, dtype=torch.float64)
    # Each image's pixel value is its own index, so a batch shows which images it drew.
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1)
    labels = torch.zeros(count, dtype=torch.long)
    loader = CurriculumLoader(images, labels, scores, [0.25], batch_size=30, seed=2)
    seen = torch.cat([batch_images.flatten() for batch_images, _ in loader])
    assert len(seen) == count
    assert int(seen.max()) < 25


def test_pool_is_ranked_within_each_class():
    # Class 0 contains the 60 easiest images overall, so a global 30% pool would contain class 0 only.
    scores = torch.arange(100, dtype=torch.float64)
    labels = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    loader = CurriculumLoader(torch.zeros(100, 1, 1, 1, dtype=torch.uint8), labels, scores, [0.3, 1.0],
                              batch_size=10, seed=0)
    # The easiest 30% of each class: 18 of class 0 (indices 0-17) and 12 of class 1 (60-71).
    assert set(loader.indices.tolist()) == set(range(18)) | set(range(60, 72))
    assert easiest(scores, 0.3, labels) == set(range(18)) | set(range(60, 72))


def test_equal_scores_keep_lower_indices():
    scores = torch.zeros(10, dtype=torch.float64)
    loader = CurriculumLoader(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.zeros(10, dtype=torch.long),
                              scores, [0.5], batch_size=5, seed=0)
    assert set(loader.indices.tolist()) == {0, 1, 2, 3, 4}


def test_pool_size_rounds_and_keeps_one():
    assert pool_size(0.3, 1000) == 300
    assert pool_size(0.3, 5) == 2
    assert pool_size(0.001, 10) == 1
    assert pool_size(1.0, 7) == 7


def test_trainer_uses_score_file(digits, tmp_path):
    count = 400
    scores = np.random.default_rng(3).random(count)
    path = tmp_path / "scores.txt"
    np.savetxt(path, scores)
    trainer = make_trainer(digits, difficulty_scores=str(path), epochs=3, train_size=count)
    loader = trainer._make_train_loader()
    assert set(loader.indices.tolist()) == easiest(torch.from_numpy(scores), 0.3, trainer.train_split.labels)
    # Steps per epoch do not depend on the curriculum.
    plain = plan_run(TrainConfig(epochs=3, batch_size=128, train_size=count), count)
    assert trainer.clock.total_steps == plain.clock.total_steps
    assert trainer.curriculum_fractions == pytest.approx([0.3, 1.0, 0.3])

    trainer.fit()
    assert [record["knobs"]["curriculum"] for record in trainer.history] == pytest.approx([0.3, 1.0, 0.3])


def test_score_file_npy_and_wrong_length(tmp_path):
    values = np.arange(5, dtype=np.float64)
    np.save(tmp_path / "scores.npy", values)
    assert load_difficulty_scores(tmp_path / "scores.npy", 5).tolist() == values.tolist()
    with pytest.raises(DataError, match=r"one score per training image \(6\), got 5"):
        load_difficulty_scores(tmp_path / "scores.npy", 6)
    (tmp_path / "bad.txt").write_text("1\nnan\n")
    with pytest.raises(DataError, match="finite"):
        load_difficulty_scores(tmp_path / "bad.txt", 2)
    with pytest.raises(DataError, match="not found"):
        load_difficulty_scores(tmp_path / "missing.txt", 2)


def test_out_of_fold_scores_written_and_repeatable(digits, tmp_path):
    options = dict(train_size=300, batch_size=50, scoring_epochs=2, epochs=1)
    first = make_trainer(digits, out=str(tmp_path / "run"), **options)
    second = make_trainer(digits, **options)
    assert torch.equal(first.difficulty_scores, second.difficulty_scores)
    written = load_difficulty_scores(tmp_path / "run" / SCORES_NAME, 300)
    assert torch.allclose(written, first.difficulty_scores, rtol=1e-8)
    assert bool(torch.isfinite(first.difficulty_scores).all())
    # After a little training most images have a small loss and a few a large one, so the mean
    # of the scores lies above their median.
    scores = first.difficulty_scores
    assert float(scores.median()) < float(scores.mean())


def test_scoring_leaves_model_init_unchanged(digits):
    with_curriculum = make_trainer(digits, train_size=300, batch_size=50, scoring_epochs=1, epochs=1)
    without = Trainer(TrainConfig(epochs=1, train_size=300, batch_size=50, progress=False, num_threads=2),
                      log=quiet, dataset=digits)
    for a, b in zip(with_curriculum.model.state_dict().values(), without.model.state_dict().values()):
        assert torch.equal(a, b)
