"""Cyclical data curriculum: each epoch samples from the easiest fraction of the training set.

Every training image has a difficulty score (higher is harder). The ``--curriculum`` knob gives a
fraction ``q = q_easy + d * (1 - q_easy)`` at the clock's difficulty d, and each epoch samples from
the easiest fraction q of every class: the ``max(1, round(q * N_c))`` easiest of the N_c images
of class c. So ``--curriculum 0.3:1`` samples from the easiest 30% of each class at the start and
the end and from all images at the hardest point. Ties go to the lower index.

The pool is ranked within each class because a ranking over the whole set drops classes. On 4,000
CIFAR-10 images scored by the out-of-fold runs below, the easiest 30% overall held no image of 5 of
the 10 classes. A 10-epoch run with ``--curriculum 0.3:1`` on that pool ended 18 points below one
without a curriculum.

An epoch has as many steps as a pass over all N images would (ceil(N / batch) without
``drop_last``), so the clock and the learning-rate schedule do not depend on the curriculum. Its N
draws are seeded permutations of the pool, concatenated and cut at N: every pool image is drawn
floor(N / pool) or ceil(N / pool) times, and exactly once when the pool is the whole set.

Scores come from a file or from two short out-of-fold scoring runs: the training set is split
in two halves by a seeded permutation, a fresh model trains on each half for a few epochs, and
every image is scored by the cross entropy of the model that did not see it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment import normalize
from .errors import ConfigError, DataError
from .optim import build_optimizer, split_decay_groups

SCORES_NAME = "difficulty_scores.txt"
# Random stream of the curriculum draws, as numbered by train.derived_seed.
CURRICULUM_STREAM = 3
SCORING_FOLDS = 2


def load_difficulty_scores(path: str | Path, count: int) -> torch.Tensor:
    """Read one float score per training image from a .npy file or a whitespace-separated text file.

    Raises DataError for a missing or unreadable file, a wrong number of scores, or a score that
    is not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--difficulty-scores file not found: {path}")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (OSError, ValueError) as error:
        raise DataError(f"--difficulty-scores {path} could not be read as numbers: {error}") from None
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != count:
        raise DataError(
            f"--difficulty-scores {path} must have one score per training image ({count}), got {values.shape[0]}"
        )
    if not np.isfinite(values).all():
        raise DataError(f"--difficulty-scores {path} must contain finite numbers only")
    return torch.from_numpy(values.copy())


def save_difficulty_scores(path: Path, scores: torch.Tensor) -> None:
    np.savetxt(path, scores.numpy(), fmt="%.9g")


def pool_size(fraction: float, count: int) -> int:
    """Return the number of easiest images a fraction q of one class's ``count`` allows: max(1, round(q * count))."""
    return max(1, round(fraction * count))


def score_out_of_fold(
    images: torch.Tensor,
    labels: torch.Tensor,
    make_model: Callable[[], torch.nn.Module],
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Score every image by the cross entropy of a model trained on the other half of the set.

    Each fold model trains for ``epochs`` epochs with SGD (Nesterov momentum 0.9, weight decay
    5e-4, constant ``lr``) on un-augmented images. The global torch random state is restored
    afterwards, so scoring leaves the main run's randomness untouched.
    """
    count = len(labels)
    if count < SCORING_FOLDS:
        raise ConfigError(f"--curriculum needs at least {SCORING_FOLDS} training images to score, got {count}")
    generator = torch.Generator().manual_seed(seed)
    folds = torch.tensor_split(torch.randperm(count, generator=generator), SCORING_FOLDS)
    scores = torch.empty(count, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        for fold, held_out in enumerate(folds):
            train_part = torch.cat([part for index, part in enumerate(folds) if index != fold])
            torch.manual_seed(seed * SCORING_FOLDS + fold)
            model = make_model().to(device)
            _train_scoring_model(
                model, images[train_part], labels[train_part], mean, std, epochs,
                min(batch_size, len(train_part)), lr, generator, device,
            )
            scores[held_out] = _per_image_loss(model, images[held_out], labels[held_out], mean, std, device)
    return scores


def _train_scoring_model(model, images, labels, mean, std, epochs, batch_size, lr, generator, device) -> None:
    groups, _ = split_decay_groups(model, 5e-4)
    optimizer = build_optimizer("sgd", groups, lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            x = normalize(images[batch].to(device), mean, std)
            loss = F.cross_entropy(model(x), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def _per_image_loss(model, images, labels, mean, std, device, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    losses = []
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start:start + batch_size].to(device), mean, std)
        logits = model(x).float()
        losses.append(F.cross_entropy(logits, labels[start:start + batch_size].to(device), reduction="none").cpu())
    return torch.cat(losses).to(torch.float64)


class CurriculumLoader:
    """Batches drawn from the easiest fraction of an in-memory training set, one fraction per epoch.

    It has the interface of ``data.BatchLoader`` (``set_epoch``, ``len``, iteration) and the same
    number of batches per epoch, and splits each global batch across ranks the same way.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        scores: torch.Tensor,
        fractions: Sequence[float],
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(scores) != len(labels):
            raise ConfigError(f"scores must have one value per image ({len(labels)}), got {len(scores)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        # Easiest first within each class; the stable sort sends ties to the lower index.
        easiest_first = torch.argsort(scores, stable=True)
        labels_in_order = labels.cpu()[easiest_first]
        self.class_orders = [easiest_first[labels_in_order == label] for label in torch.unique(labels_in_order)]
        self.fractions = list(fractions)
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.set_epoch(0, batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def set_epoch(self, epoch: int, batch_size: int | None = None) -> None:
        """Draw the sample order of ``epoch`` from its pool and, when given, set a new global batch size."""
        from .train import derived_seed

        if batch_size is not None:
            self.batch_size = batch_size
        self.epoch = epoch
        fraction = self.fractions[epoch]
        pool = torch.cat([order[: pool_size(fraction, len(order))] for order in self.class_orders]).sort().values
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, CURRICULUM_STREAM))
        repeats = math.ceil(self.num_samples / len(pool))
        draws = [pool[torch.randperm(len(pool), generator=generator)] for _ in range(repeats)]
        # Training-set indices of this epoch's samples, in the order they are used.
        self.indices = torch.cat(draws)[: self.num_samples]
        self._order = self.indices.to(self.device)

    def __len__(self) -> int:
        full_batches, remainder = divmod(self.num_samples, self.batch_size)
        keeps_last = not self.drop_last and remainder >= self.world_size
        return full_batches + int(keeps_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in range(len(self)):
            start = index * self.batch_size
            global_batch = self._order[start:start + self.batch_size]
            local = torch.tensor_split(global_batch, self.world_size)[self.rank]
            yield self.images.index_select(0, local), self.labels.index_select(0, local)
