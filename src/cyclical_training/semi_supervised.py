"""Cyclical semi-supervised learning: pseudo-labels from a weak view train a strong view.

The method is FixMatch-style pseudo-labelling. Each step takes ``unlabeled_ratio`` unlabeled
images per labeled image. The model's softmax on a weakly augmented view of each unlabeled image
gives a pseudo-label (the arg max) wherever its maximum probability is at least the confidence
threshold. The cross entropy of the strongly augmented view toward that pseudo-label, averaged
over all unlabeled images of the step with 0 for the images under the threshold, is the
unlabeled loss. Total loss = labeled loss + unlabeled_weight * unlabeled loss. Labeled, weak and
strong images go through one forward pass, so BatchNorm sees them as one batch.

The labels of unlabeled images are read only to report how often the pseudo-labels are right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import _cutout, _jitter, augment, normalize, random_crop_flip
from .data import balanced_subset
from .errors import ConfigError

# Images smaller than this get no weak augmentation: a 4-pixel crop of an 8x8 digit moves half of it.
WEAK_MIN_SIZE = 16
WEAK_PADDING = 4
# Brightness and contrast jitter of the strong view, as in augment at magnitude 1.
STRONG_JITTER = 0.4
# Random stream of the unlabeled order. Streams 0 and 1 are the labeled order and the augmentation.
UNLABELED_ORDER_STREAM = 2


def split_labeled(labels: torch.Tensor, labeled: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the sorted indices of a class-balanced labeled subset of ``labeled`` images and of the rest.

    Raises ConfigError unless ``labeled`` is smaller than the training set.
    """
    if labeled >= len(labels):
        raise ConfigError(
            f"--labeled must be < the training set ({len(labels)} images) so that some images stay "
            f"unlabeled, got --labeled {labeled}"
        )
    chosen = balanced_subset(labels, labeled, seed=seed, name="--labeled")
    is_unlabeled = torch.ones(len(labels), dtype=torch.bool)
    is_unlabeled[chosen] = False
    return chosen, torch.nonzero(is_unlabeled).squeeze(1)


def weak_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip and translate by up to 4 pixels, but return images under 16 pixels unchanged."""
    if min(images.shape[-2:]) < WEAK_MIN_SIZE:
        return images
    return random_crop_flip(images, padding=WEAK_PADDING, generator=generator)


def strong_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply ``augment`` at magnitude 1 with limits scaled to the image side S.

    Translation is up to S // 8 pixels (4 at 32 px) and the cutout square has side S // 2 (16 at
    32 px). Images under 16 pixels get only the brightness and contrast jitter (factors in
    [0.6, 1.4]) and the cutout, because a flipped or shifted 8x8 digit can look like another digit.
    """
    side = min(images.shape[-2:])
    if side < WEAK_MIN_SIZE:
        jittered = _jitter(images, STRONG_JITTER, generator)
        return _cutout(jittered, side // 2, 1.0, generator)
    return augment(images, 1.0, generator=generator, max_translate=side // 8, max_cutout=side // 2,
                   max_jitter=STRONG_JITTER)


def pseudo_label_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (masked mean cross entropy, confidence mask, pseudo-labels) for one unlabeled batch.

    The pseudo-labels come from the detached weak logits, so no gradient flows through them.
    """
    probabilities = torch.softmax(weak_logits.detach().float(), dim=1)
    confidence, pseudo_labels = probabilities.max(dim=1)
    mask = confidence >= threshold
    per_image = F.cross_entropy(strong_logits.float(), pseudo_labels, reduction="none")
    return (per_image * mask).mean(), mask, pseudo_labels


class SemiSupervised:
    """The unlabeled images of a run, their batches, and the statistics of one epoch."""

    def __init__(
        self,
        images: torch.Tensor,
        held_labels: torch.Tensor,
        ratio: int,
        seed: int,
        mean: tuple,
        std: tuple,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images = images.to(device)
        # Used only for the pseudo-label accuracy report, never for training.
        self.held_labels = held_labels.to(device)
        self.ratio, self.seed = ratio, seed
        self.mean, self.std = mean, std
        self.device, self.rank, self.world_size = device, rank, world_size
        self._order_epoch: int | None = None
        self._order = torch.empty(0, dtype=torch.long)
        self.reset_statistics()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch_indices(self, epoch: int, step: int, labeled_batch: int) -> torch.Tensor:
        """Return this rank's unlabeled indices for ``step`` of ``epoch``.

        Each epoch reads a permutation seeded by (seed, epoch) in consecutive slices of
        ``ratio * labeled_batch`` images, wrapping around at the end, so a resumed run draws the
        same images without saved state.
        """
        if self._order_epoch != epoch:
            from .train import derived_seed

            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, UNLABELED_ORDER_STREAM))
            self._order = torch.randperm(len(self), generator=generator)
            self._order_epoch = epoch
        size = self.ratio * labeled_batch
        positions = (step * size + torch.arange(size)) % len(self)
        return torch.tensor_split(self._order[positions], self.world_size)[self.rank]

    def views(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the normalised weak and strong views of the unlabeled images ``indices``."""
        x = normalize(self.images[indices.to(self.device)], self.mean, self.std)
        return weak_view(x, generator), strong_view(x, generator)

    def reset_statistics(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.loss_sum = zero.clone()
        self.confident = zero.clone().long()
        self.correct = zero.clone().long()
        self.seen = zero.clone().long()

    def loss(
        self, weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float, indices: torch.Tensor
    ) -> torch.Tensor:
        """Return the unlabeled loss of one step and add its statistics to the epoch's."""
        loss, mask, pseudo_labels = pseudo_label_loss(weak_logits, strong_logits, threshold)
        true_labels = self.held_labels[indices.to(self.device)]
        count = mask.shape[0]
        self.loss_sum += loss.detach() * count
        self.confident += mask.sum()
        self.correct += ((pseudo_labels == true_labels) & mask).sum()
        self.seen += count
        return loss

    def epoch_record(self) -> dict:
        """Return the epoch's unlabeled loss, share of confident images and pseudo-label accuracy.

        The sums must already be reduced across ranks. The accuracy is None when no image
        reached the threshold.
        """
        seen, confident = self.seen.item(), self.confident.item()
        return {
            "unlabeled_loss": self.loss_sum.item() / max(seen, 1),
            "pseudo_label_share": confident / max(seen, 1),
            "pseudo_label_accuracy": self.correct.item() / confident if confident else None,
        }
