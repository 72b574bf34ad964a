"""The training loop of ``gct train``: one clock drives every knob, phase by phase.

Each step: set the knobs from the clock, take a batch, normalise and augment it on its device,
forward, loss (training logits divided by the temperature), backward, unscale and clip the
gradients, optimizer step, accumulate metrics on the device. Each epoch: evaluate without the
temperature, log one line, append to ``metrics.jsonl`` and write ``checkpoint.pt`` atomically.

Every source of randomness after initialisation is derived from (seed, epoch): the data order,
the augmentation and the training subset. Together with the clock's two integers in the
checkpoint, a run resumed after any epoch repeats the uninterrupted run bit for bit on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

from . import __version__
from .augment import augment, normalize, random_crop_flip
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .clock import Clock, difficulty, progress_at
from .config import TrainConfig, build_knob
from .curriculum import SCORES_NAME, CurriculumLoader, load_difficulty_scores, save_difficulty_scores, score_out_of_fold
from .data import BatchLoader, ImageDataset, balanced_subset, load_dataset, steps_per_epoch
from .distributed import ProcessInfo, all_reduce_sum, initialise, process_info_from_environment
from .errors import CheckpointError, ConfigError, TrainingError
from .finetune import apply_unfreeze, load_teacher, pretrained_model
from .knobs import Knob, KnobSet, WarmupCosine
from .losses import cross_entropy, cyclical_focal_loss, distillation_loss, focal_loss
from .models import build_model
from .optim import build_optimizer, split_decay_groups
from .semi_supervised import SemiSupervised, split_labeled

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"

# Short labels for the per-epoch log line.
KNOB_LABELS = {
    "lr": "lr",
    "momentum": "mom",
    "weight_decay": "wd",
    "temperature": "T",
    "clip_norm": "clip",
    "batch_size": "bs",
    "augment": "aug",
    "unlabeled_weight": "wu",
    "confidence": "conf",
    "curriculum": "q",
    "kd_weight": "kd",
    "kd_temperature": "kdT",
    "unfreeze": "unfreeze",
}


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """Seed for one random stream (data order, augmentation, ...) of one epoch."""
    return (seed * 1_000_003 + epoch) * 8 + stream


@dataclass
class Split:
    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class StreamSplit:
    """Part of an image-folder tree that is decoded from disk batch by batch."""

    samples: list
    indices: torch.Tensor
    labels: torch.Tensor


@dataclass
class StreamedData:
    """Class names, image size and channel statistics of a streamed tree, as ImageDataset has them."""

    name: str
    classes: list
    image_size: int
    mean: tuple
    std: tuple
    in_channels: int = 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# Images decoded to estimate the channel statistics of a streamed tree.
STREAM_STATISTICS_SAMPLE = 2000


class BatchScaledLR:
    """A learning-rate schedule multiplied by a per-epoch factor that follows the batch size."""

    def __init__(self, base, factors: list[float]) -> None:
        self.base, self.factors = base, factors

    def at(self, clock: Clock) -> float:
        return self.base.at(clock) * self.factors[clock.epoch]

    def describe(self) -> str:
        return f"{self.base.describe()} x batch-size scaling"


class Trainer:
    """Set up a run from a validated ``TrainConfig`` and train it with ``fit()``."""

    def __init__(
        self,
        config: TrainConfig,
        log: Callable[[str], None] = print,
        dataset: ImageDataset | None = None,
        resume_state: dict | None = None,
        resume_source: str = "checkpoint",
    ) -> None:
        self.config = config.validate()
        config.check_techniques()
        self.process = process_info_from_environment()
        # Only rank 0 prints and writes files; every rank computes the same knob values.
        self.log = log if self.process.is_main else (lambda line: None)
        self._set_up_runtime()
        if dataset is None and self._streams():
            self._set_up_streaming()
        else:
            self.dataset = dataset if dataset is not None else load_dataset(
                config.data, data_dir=config.data_dir, cache_dir=config.cache_dir, image_size=config.image_size
            )
            self.train_split, self.validation_split = self._split_training_data()
            self.test_split = Split(self.dataset.test_images, self.dataset.test_labels)
        self._set_up_semi_supervised()
        self._resuming = resume_state is not None
        self._build_model_and_optimizer()
        self._build_clock_and_knobs()
        self._set_up_curriculum()
        self.start_epoch = 0
        self.history: list[dict] = []
        self.tensorboard = None
        if resume_state is not None:
            self._load_state(resume_state, resume_source)

    # Set-up -----------------------------------------------------------------------------------

    def _set_up_runtime(self) -> None:
        config = self.config
        device_type = config.device
        if device_type == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        elif device_type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device must be auto or cpu on this machine (no CUDA device found), got 'cuda'")
        if device_type == "cuda":
            self.device = torch.device("cuda", self.process.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # Processes of one machine share its cores.
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(config.num_threads or max(1, cores // self.process.world_size))
        initialise(self.process, self.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("--precision must be fp32 or bf16 on the CPU, got 'fp16'")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        # A gradient scaler keeps small fp16 gradients from underflowing to zero; bf16 needs none.
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    def _streams(self) -> bool:
        from .streaming import should_stream

        config = self.config
        if config.data in ("digits", "cifar10", "cifar100") or not Path(config.data).is_dir():
            if config.data_mode == "stream":
                raise ConfigError(f"--data-mode stream needs an image-folder tree, got --data {config.data}")
            return False
        # With no --image-size, "auto" decides by the number of images alone.
        return should_stream(config.data, config.image_size or 1, config.data_mode)

    def _set_up_streaming(self) -> None:
        from .streaming import build_stream_loader, sample_labels, scan_image_folder

        config = self.config
        if config.validation_size:
            # NOTE: a validation split of a streamed tree is not implemented yet.
            raise ConfigError(f"--validation-size must be 0 with a streamed tree, got {config.validation_size}")
        image_size = config.image_size or 224
        index = scan_image_folder(config.data)
        train_labels = sample_labels(index.train)
        chosen = torch.arange(len(train_labels))
        if config.train_size is not None:
            chosen = balanced_subset(train_labels, config.train_size, seed=config.seed, name="--train-size")
        self.train_split = StreamSplit(index.train, chosen, train_labels[chosen])
        self.test_split = StreamSplit(index.test, torch.arange(len(index.test)), sample_labels(index.test))
        self.validation_split = None

        # Channel statistics from a seeded sample of evaluation crops of the training images.
        sample = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(config.seed))]
        sample = sample[:STREAM_STATISTICS_SAMPLE]
        loader = build_stream_loader(
            index.train, image_size, train=False, batch_size=min(256, len(sample)), seed=config.seed,
            workers=config.workers, indices=sample,
        )
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        pixels = 0
        for images, _ in loader:
            values = images.to(torch.float64) / 255.0
            total += values.sum(dim=(0, 2, 3))
            squares += (values ** 2).sum(dim=(0, 2, 3))
            pixels += values.shape[0] * values.shape[2] * values.shape[3]
        mean = total / pixels
        std = (squares / pixels - mean ** 2).clamp_min(1e-12).sqrt()
        self.dataset = StreamedData(
            name=Path(config.data).name, classes=list(index.classes), image_size=image_size,
            mean=tuple(mean.tolist()), std=tuple(std.tolist()),
        )

    def _make_train_loader(self):
        config, split = self.config, self.train_split
        if isinstance(split, StreamSplit):
            from .streaming import build_stream_loader

            return build_stream_loader(
                split.samples, self.dataset.image_size, train=True, batch_size=self.batch_sizes[0],
                seed=config.seed, workers=config.workers, rank=self.process.rank,
                world_size=self.process.world_size, drop_last=config.drop_last, indices=split.indices,
            )
        if self.difficulty_scores is not None:
            return CurriculumLoader(
                split.images, split.labels, self.difficulty_scores, self.curriculum_fractions,
                self.batch_sizes[0], seed=config.seed, drop_last=config.drop_last, device=self.device,
                rank=self.process.rank, world_size=self.process.world_size,
            )
        return BatchLoader(
            split.images, split.labels, self.batch_sizes[0], shuffle=True,
            seed=config.seed, drop_last=config.drop_last, device=self.device,
            rank=self.process.rank, world_size=self.process.world_size,
        )

    def _evaluation_batches(self, split, batch_size: int):
        """Yield (images, labels) of this rank's share of ``split`` on the device."""
        if isinstance(split, StreamSplit):
            from .streaming import build_stream_loader

            loader = build_stream_loader(
                split.samples, self.dataset.image_size, train=False,
                batch_size=min(batch_size, len(split.indices)), seed=self.config.seed,
                workers=self.config.workers, rank=self.process.rank, world_size=self.process.world_size,
                indices=split.indices,
            )
            for images, labels in loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            return
        shard = torch.arange(self.process.rank, len(split.labels), self.process.world_size)
        for start in range(0, len(shard), batch_size):
            indices = shard[start:start + batch_size]
            yield (split.images[indices].to(self.device, non_blocking=True),
                   split.labels[indices].to(self.device, non_blocking=True))

    def _split_training_data(self) -> tuple[Split, Split | None]:
        config, labels = self.config, self.dataset.train_labels
        available = torch.arange(len(labels))
        validation = None
        if config.validation_size:
            if config.validation_size >= len(labels):
                raise ConfigError(
                    f"--validation-size must be < the training split ({len(labels)} images), "
                    f"got {config.validation_size}"
                )
            held = balanced_subset(labels, config.validation_size, seed=config.seed, name="--validation-size")
            keep = torch.ones(len(labels), dtype=torch.bool)
            keep[held] = False
            available = available[keep]
            validation = Split(self.dataset.train_images[held], labels[held])
        if config.train_size is not None:
            chosen = balanced_subset(labels[available], config.train_size, seed=config.seed, name="--train-size")
            available = available[chosen]
        train = Split(self.dataset.train_images[available], labels[available])
        return train, validation

    def _build_model_and_optimizer(self) -> None:
        config, dataset = self.config, self.dataset
        model_name = config.model
        if model_name == "auto":
            if dataset.image_size <= 8:
                model_name = "digits-net"
            elif dataset.image_size <= 64:
                model_name = "fast-cnn"
            else:
                model_name = "resnet50"
        self.model_name = model_name
        torch.manual_seed(config.seed)
        if config.finetune is not None:
            model, model_name = pretrained_model(
                config.finetune, config.model, dataset.num_classes, dataset.in_channels, dataset.image_size
            )
            self.model_name = model_name
            if not self._resuming:
                self.log(f"fine-tuning from {config.finetune}")
        else:
            model = build_model(model_name, dataset.num_classes, dataset.in_channels, dataset.image_size)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.teacher = None
        if config.teacher is not None:
            teacher = load_teacher(config.teacher, dataset.num_classes, dataset.in_channels, dataset.image_size)
            self.teacher = teacher.to(self.device, memory_format=self.memory_format)
        unfreeze = config.knob_specs.get("unfreeze")
        if self.process.is_distributed and unfreeze is not None and (unfreeze.easy, unfreeze.hard) != (1.0, 1.0):
            # NOTE: DistributedDataParallel registers the parameters that need gradients once, at
            # construction, so blocks cannot be frozen and unfrozen under it.
            raise ConfigError(f"--unfreeze must be 1 under torchrun, got {config.unfreeze!r}")
        training_model = self.model
        if self.process.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            training_model = DistributedDataParallel(self.model, device_ids=device_ids)

        specs = config.knob_specs
        decay = specs.get("weight_decay")
        built_decay = 0.0 if decay is None else max(decay.easy, decay.hard)
        groups, counts = split_decay_groups(self.model, built_decay)
        self.log(f"parameters: {counts.describe()}")
        if config.loss in ("focal", "cyclical-focal") and config.label_smoothing == 0 and config.gamma_pos == 0:
            # The other classes enter the loss through their smoothed target s / K, which is 0 here.
            self.log(
                "note: with --label-smoothing 0 and --gamma-pos 0 the focal weighting equals cross entropy, "
                "and --gamma-neg has no effect; the paper's code uses --label-smoothing 0.1"
            )
        lr_spec, momentum_spec = specs["lr"], specs["momentum"]
        self.optimizer = build_optimizer(config.optimizer, groups, lr=lr_spec.easy, momentum=momentum_spec.easy)
        self.forward = torch.compile(training_model) if config.compile else training_model

    def _build_clock_and_knobs(self) -> None:
        plan = plan_run(self.config, len(self.train_split.labels), world_size=self.process.world_size)
        self.batch_sizes, self.clock = plan.batch_sizes, plan.clock
        knobs = dict(plan.knobs)
        for key in ("momentum", "weight_decay"):
            knob = knobs.get(key)
            # A constant 0 has nothing to scale: the optimizer was built with it already.
            if isinstance(knob, Knob) and knob.is_constant and knob.easy == 0:
                del knobs[key]
        self.knobs = KnobSet(self.optimizer, **knobs)
        self.trainable = list(self.model.parameters())

    def _set_up_semi_supervised(self) -> None:
        """Keep the labels of ``--labeled`` training images and move the rest to the unlabeled set."""
        config = self.config
        self.semi_supervised = None
        if config.labeled is None:
            return
        if isinstance(self.train_split, StreamSplit):
            raise ConfigError("--labeled needs in-memory data, got a streamed tree; use --data-mode memory")
        split = self.train_split
        labeled, unlabeled = split_labeled(split.labels, config.labeled, config.seed)
        self.semi_supervised = SemiSupervised(
            split.images[unlabeled], split.labels[unlabeled], config.unlabeled_ratio, config.seed,
            self.dataset.mean, self.dataset.std, self.device, self.process.rank, self.process.world_size,
        )
        self.train_split = Split(split.images[labeled], split.labels[labeled])
        self.log(f"semi-supervised: {len(labeled)} labeled and {len(unlabeled)} unlabeled training images")

    def _set_up_curriculum(self) -> None:
        """Read or compute the difficulty scores, and the curriculum's fraction for every epoch."""
        config = self.config
        self.difficulty_scores = None
        if "curriculum" not in config.knob_specs:
            return
        if isinstance(self.train_split, StreamSplit):
            raise ConfigError("--curriculum needs in-memory data, got a streamed tree; use --data-mode memory")
        split = self.train_split
        saved = Path(config.out) / SCORES_NAME if config.out else None
        if config.difficulty_scores is not None:
            scores = load_difficulty_scores(config.difficulty_scores, len(split.labels))
        elif self._resuming and saved is not None and saved.is_file():
            scores = load_difficulty_scores(saved, len(split.labels))
        else:
            self.log(f"curriculum: scoring {len(split.labels)} images with 2 out-of-fold models, "
                     f"{config.scoring_epochs} epochs each")
            dataset = self.dataset
            lr_spec = config.knob_specs["lr"]
            scores = score_out_of_fold(
                split.images, split.labels,
                lambda: build_model(self.model_name, dataset.num_classes, dataset.in_channels, dataset.image_size),
                dataset.mean, dataset.std, config.scoring_epochs, self.batch_sizes[0],
                max(lr_spec.easy, lr_spec.hard), config.seed, self.device,
            )
            if saved is not None and self.process.is_main:
                saved.parent.mkdir(parents=True, exist_ok=True)
                save_difficulty_scores(saved, scores)
        self.difficulty_scores = scores
        knob = self.knobs.knobs["curriculum"]
        self.curriculum_fractions = [
            knob.value(difficulty(progress_at(epoch, config.epochs), config.peak, config.cycle_shape, config.cycles))
            for epoch in range(config.epochs)
        ]

    def _load_state(self, state: dict, source: str = "checkpoint") -> None:
        expected = {"model_name": ("model", self.model_name), "num_classes": ("classes", self.dataset.num_classes)}
        for key, (label, value) in expected.items():
            saved = state.get(key)
            if saved is not None and saved != value:
                raise CheckpointError(
                    f"{source} was written for {label} {saved!r} and cannot resume a run with {value!r}"
                )
        saved_classes = state.get("classes")
        if saved_classes is not None and list(saved_classes) != list(self.dataset.classes):
            raise CheckpointError(
                f"{source} was written for classes {list(saved_classes)[:5]}... and the data has "
                f"{list(self.dataset.classes)[:5]}...; resume with the data it was trained on"
            )
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as error:
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise CheckpointError(
                f"{source} does not fit model {self.model_name} with {self.dataset.num_classes} classes: {detail}"
            ) from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(
                f"{source} holds optimizer state that does not fit --optimizer {self.config.optimizer}: {error}"
            ) from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.clock.load_state_dict(state["clock"])
        self.start_epoch = int(state["epoch"]) + 1
        self.history = list(state.get("history", []))

    # Training ---------------------------------------------------------------------------------

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, values: dict) -> torch.Tensor:
        config = self.config
        temperature = values.get("temperature", 1.0)
        if config.loss == "ce":
            return cross_entropy(logits, labels, temperature=temperature, label_smoothing=config.label_smoothing)
        scaled = logits / temperature
        if config.loss == "focal":
            return focal_loss(scaled, labels, config.gamma_pos, config.gamma_neg, config.label_smoothing)
        return cyclical_focal_loss(
            scaled, labels, self.clock.difficulty, config.gamma_hc, config.gamma_pos, config.gamma_neg,
            config.label_smoothing,
        )

    def supervised_loss(self, x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, values: dict) -> torch.Tensor:
        """Return the loss on labeled images: the distillation loss with ``--teacher``, else ``training_loss``."""
        if self.teacher is None:
            return self.training_loss(logits, labels, values)
        with torch.no_grad():
            teacher_logits = self.teacher(x).float()
        return distillation_loss(
            logits, teacher_logits, labels, values["kd_weight"], values["kd_temperature"], self.config.label_smoothing
        )

    def step_loss(
        self, x: torch.Tensor, labels: torch.Tensor, values: dict, epoch: int, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one training batch and return the labeled logits and the loss of every technique that is on."""
        ssl = self.semi_supervised
        if ssl is None:
            logits = self.forward(x)
            return logits, self.supervised_loss(x, logits.float(), labels, values)

        indices = ssl.batch_indices(epoch, step, self.batch_sizes[epoch])
        weak, strong = ssl.views(indices, generator)
        batch = torch.cat([x, weak, strong]).contiguous(memory_format=self.memory_format)
        logits, weak_logits, strong_logits = self.forward(batch).split([len(x), len(weak), len(strong)])
        loss = self.supervised_loss(x, logits.float(), labels, values)
        unlabeled_loss = ssl.loss(weak_logits, strong_logits, values["confidence"], indices)
        return logits, loss + values["unlabeled_weight"] * unlabeled_loss

    def prepare_batch(self, images: torch.Tensor, values: dict, generator: torch.Generator) -> torch.Tensor:
        x = normalize(images, self.dataset.mean, self.dataset.std)
        setting = self.config.augment
        if "augment" in values:
            x = augment(x, values["augment"], generator=generator)
        elif setting == "auto" and self.dataset.image_size >= 16:
            x = random_crop_flip(x, padding=4, generator=generator)
        return x.contiguous(memory_format=self.memory_format)

    def train_epoch(self, epoch: int, loader) -> dict:
        config, clock, model, optimizer = self.config, self.clock, self.model, self.optimizer
        model.train()
        trainable_blocks = None
        if "unfreeze" in self.knobs.knobs:
            trainable_blocks = apply_unfreeze(model, self.knobs.knobs["unfreeze"].at(clock))
        if self.semi_supervised is not None:
            self.semi_supervised.reset_statistics()
        # Each rank augments its own share of the batch, so each gets its own random stream.
        generator = torch.Generator().manual_seed(
            derived_seed(config.seed, epoch, stream=1) * 1024 + self.process.rank
        )
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = torch.zeros((), device=self.device, dtype=torch.long)
        norm_sum = torch.zeros((), device=self.device)
        epoch_values = None
        bar = ProgressBar(len(loader), enabled=config.progress)

        for step, (images, labels) in enumerate(loader):
            # A no-op for in-memory data, which already lives on the device.
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            # Set every knob for this step from the clock.
            values = self.knobs.apply(clock)
            if epoch_values is None:
                epoch_values = dict(values)
                # Report the batch size the loader really uses: the knob's value rounded to an integer.
                epoch_values["batch_size"] = self.batch_sizes[epoch]

            # Batch: normalise and augment on the batch's device.
            x = self.prepare_batch(images, values, generator)

            # Forward and loss; the temperature only ever divides training logits.
            with self.autocast():
                logits, loss = self.step_loss(x, labels, values, epoch, step, generator)

            # Backward, then clip the true (unscaled) gradients.
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(optimizer)
            else:
                loss.backward()
            clip = values.get("clip_norm")
            if clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
                norm_sum += grad_norm.detach()
            elif self.scaler is None:
                # The norm is needed for the guard below: an infinite gradient can come with a finite loss.
                gradients = [p.grad for p in self.trainable if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(gradients)

            # Guard: never let a non-finite loss or gradient reach the weights.
            # NOTE: this reads one value from the device per step. On a GPU that is a
            # synchronisation point, like the one the fp16 gradient scaler makes.
            if self.scaler is None:
                check = loss.detach() + grad_norm.detach()
                nonfinite = (~torch.isfinite(check)).to(torch.float32)
                # Every rank must stop together, or the others would wait forever in the next step.
                all_reduce_sum(nonfinite)
                if nonfinite.item() > 0:
                    raise TrainingError(self._nonfinite_message(epoch, step, values, loss, grad_norm))

            # Optimizer step.
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()

            # Metrics stay on the device until the end of the epoch.
            count = labels.shape[0]
            loss_sum += loss.detach() * count
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += count
            if self.tensorboard is not None:
                # NOTE: add_scalar reads the loss from the device: one synchronisation per step,
                # paid only when --tensorboard is on.
                self.tensorboard.add_scalar("train/loss", loss.detach(), clock.global_step)
                for name, value in values.items():
                    self.tensorboard.add_scalar(f"knobs/{name}", value, clock.global_step)
            clock.step()
            bar.update(step + 1)
        bar.close()

        all_reduce_sum(loss_sum, correct, seen, norm_sum)
        count = max(seen.item(), 1)
        record = {
            "train_loss": loss_sum.item() / count,
            "train_accuracy": correct.item() / count,
            "knobs": epoch_values or self.knobs.values(clock),
        }
        if "clip_norm" in record["knobs"]:
            record["grad_norm_mean"] = norm_sum.item() / (max(len(loader), 1) * self.process.world_size)
        if self.semi_supervised is not None:
            ssl = self.semi_supervised
            all_reduce_sum(ssl.loss_sum, ssl.confident, ssl.correct, ssl.seen)
            record.update(ssl.epoch_record())
        if trainable_blocks is not None:
            record["trainable_blocks"] = trainable_blocks
        return record

    def _nonfinite_message(
        self, epoch: int, step: int, values: dict, loss: torch.Tensor, grad_norm: torch.Tensor
    ) -> str:
        knob_text = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
        return (
            f"training stopped: the loss or gradient norm is not finite (loss {loss.item():.6g}, "
            f"gradient norm {grad_norm.item():.6g}) at epoch "
            f"{epoch + 1}, step {step + 1}, with {knob_text}; the last finished epoch's checkpoint is kept. "
            "Lower --lr, add --clip-norm, or raise --temperature"
        )

    @torch.no_grad()
    def evaluate(self, split: Split, batch_size: int = 1024) -> dict:
        """Mean loss and accuracy on ``split``, with no temperature and no augmentation.

        Under DDP each rank evaluates every world_size-th image and the sums are reduced.
        """
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for images, labels in self._evaluation_batches(split, batch_size):
            x = normalize(images, self.dataset.mean, self.dataset.std).contiguous(memory_format=self.memory_format)
            with self.autocast():
                logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
        all_reduce_sum(loss_sum, correct)
        count = max(len(split.labels), 1)
        return {"loss": loss_sum.item() / count, "accuracy": correct.item() / count}

    def fit(self) -> dict:
        config = self.config
        out = Path(config.out) if config.out and self.process.is_main else None
        self.tensorboard = None
        if out is not None:
            self._write_start_files(out)
            if config.tensorboard:
                self.tensorboard = open_tensorboard(out / "tensorboard")
        self.log(self._start_line())
        loader = self._make_train_loader()
        started = time.perf_counter()
        for epoch in range(self.start_epoch, config.epochs):
            epoch_started = time.perf_counter()
            self.clock.start_epoch(epoch)
            loader.set_epoch(epoch, self.batch_sizes[epoch])

            record = {"epoch": epoch + 1}
            record.update(self.train_epoch(epoch, loader))
            if self.validation_split is not None:
                validation = self.evaluate(self.validation_split)
                record["validation_loss"], record["validation_accuracy"] = validation["loss"], validation["accuracy"]
            test = self.evaluate(self.test_split)
            record["test_loss"], record["test_accuracy"] = test["loss"], test["accuracy"]
            record["seconds"] = time.perf_counter() - epoch_started

            # Files first: an interrupt from here on never loses this finished epoch.
            self.history.append(record)
            if out is not None:
                self._write_epoch_files(out, epoch, record)
            if self.tensorboard is not None:
                for key in ("train_accuracy", "validation_accuracy", "test_accuracy", "test_loss"):
                    if key in record:
                        split, metric = key.split("_")
                        self.tensorboard.add_scalar(f"{split}/{metric}", record[key], self.clock.global_step)
                self.tensorboard.flush()
            self.log(format_epoch_line(record, config.epochs))

        if self.tensorboard is not None:
            self.tensorboard.close()
        summary = self._summary(time.perf_counter() - started)
        if out is not None:
            (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # Files ------------------------------------------------------------------------------------

    def _start_line(self) -> str:
        dataset = self.dataset
        knob_text = ", ".join(f"{name} {text}" for name, text in self.knobs.describe().items())
        return (
            f"data {dataset.name}: {len(self.train_split.labels)} training and {len(self.test_split.labels)} "
            f"test images, {dataset.num_classes} classes, {dataset.in_channels}x{dataset.image_size}x"
            f"{dataset.image_size}; model {self.model_name}; {self.config.optimizer}; device {self.device}; "
            f"{self.clock.total_steps} steps; knobs: {knob_text}"
        )

    def _write_start_files(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        metrics = out / METRICS_NAME
        if self.start_epoch == 0:
            metrics.write_text("")
        else:
            # Drop records of epochs after the checkpoint (an epoch that was interrupted).
            kept = [line for line in _read_lines(metrics) if json.loads(line)["epoch"] <= self.start_epoch]
            metrics.write_text("".join(line + "\n" for line in kept))

    def _write_epoch_files(self, out: Path, epoch: int, record: dict) -> None:
        with open(out / METRICS_NAME, "a") as file:
            file.write(json.dumps(record) + "\n")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": epoch,
            "clock": self.clock.state_dict(),
            "history": self.history,
            "config": self.config.to_dict(),
            "model_name": self.model_name,
            "num_classes": self.dataset.num_classes,
            "classes": list(self.dataset.classes),
        }
        save_checkpoint(out / CHECKPOINT_NAME, state)

    def _summary(self, seconds: float) -> dict:
        tests = [record["test_accuracy"] for record in self.history]
        best = max(range(len(tests)), key=tests.__getitem__) if tests else None
        epoch_seconds = [record["seconds"] for record in self.history]
        return {
            "final_test_accuracy": tests[-1] if tests else None,
            "best_test_accuracy": tests[best] if tests else None,
            "best_epoch": self.history[best]["epoch"] if tests else None,
            "final_validation_accuracy": self.history[-1].get("validation_accuracy") if tests else None,
            "epochs": self.config.epochs,
            # Summed over epochs, so a resumed run counts the time of every invocation.
            "seconds": sum(epoch_seconds),
            "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
            "seed": self.config.seed,
            "model": self.model_name,
            "data": self.dataset.name,
            "train_images": len(self.train_split.labels),
            "device": str(self.device),
            "versions": {
                "cyclical_training": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }


@dataclass
class RunPlan:
    """Batch size per epoch, clock and knobs of a run, built before it starts."""

    batch_sizes: list[int]
    clock: Clock
    knobs: dict


def plan_run(
    config: TrainConfig,
    train_images: int | None,
    steps_per_epoch_override: int | None = None,
    world_size: int = 1,
) -> RunPlan:
    """Build the clock and every knob of a run over ``train_images`` training images.

    The batch size follows the clock at epoch granularity whatever the unit, so the number of
    steps in every epoch, and therefore the length of a step-unit clock, is known up front.
    For a preview without data, ``train_images=None`` and ``steps_per_epoch_override`` gives
    every epoch the same number of steps.
    """
    specs = config.validate().knob_specs
    batch_knob = build_knob("batch_size", specs["batch_size"])
    batch_sizes = []
    for epoch in range(config.epochs):
        d = difficulty(progress_at(epoch, config.epochs), config.peak, config.cycle_shape, config.cycles)
        batch_sizes.append(int(round(batch_knob.value(d))))
    if train_images is None:
        steps = [steps_per_epoch_override or 1] * config.epochs
    else:
        largest = max(batch_sizes)
        if largest > train_images:
            raise ConfigError(f"--batch-size must be <= the training set ({train_images} images), got {largest}")
        steps = [batches_per_epoch(train_images, size, config.drop_last, world_size) for size in batch_sizes]
    clock = Clock(
        epochs=config.epochs, steps_per_epoch=steps, peak=config.peak,
        shape=config.cycle_shape, cycles=config.cycles, unit=config.cycle_unit,
    )

    lr_spec = specs["lr"]
    if lr_spec.is_constant and config.lr_schedule == "warmup-cosine":
        warmup = round(config.warmup_epochs / config.epochs * clock.total_steps)
        lr = WarmupCosine(lr_spec.easy, warmup_steps=warmup)
    else:
        lr = build_knob("lr", lr_spec)
    if config.lr_scaling != "none":
        ratios = [size / batch_sizes[0] for size in batch_sizes]
        factors = ratios if config.lr_scaling == "linear" else [math.sqrt(ratio) for ratio in ratios]
        lr = BatchScaledLR(lr, factors)

    knobs = {"lr": lr}
    for key in (
        "momentum", "weight_decay", "temperature", "clip_norm", "augment", "batch_size",
        "unlabeled_weight", "confidence", "curriculum", "kd_weight", "kd_temperature", "unfreeze",
    ):
        if key in specs:
            knobs[key] = batch_knob if key == "batch_size" else build_knob(key, specs[key])
    return RunPlan(batch_sizes, clock, knobs)


def batches_per_epoch(train_images: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Optimizer steps in one epoch; under DDP a final global batch smaller than world_size is dropped."""
    steps = steps_per_epoch(train_images, batch_size, drop_last)
    last = train_images - (steps - 1) * batch_size
    if world_size > 1 and last < world_size:
        steps -= 1
    if steps < 1:
        raise ConfigError(f"--batch-size must leave at least one batch per epoch, got {batch_size}")
    return steps


def open_tensorboard(folder: Path):
    """Open a TensorBoard event writer in ``folder`` (the optional tensorboard extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'cyclical-training[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(folder))


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]


def format_epoch_line(record: dict, epochs: int) -> str:
    width = len(str(epochs))
    parts = [
        f"epoch {record['epoch']:>{width}}/{epochs}",
        f"train loss {record['train_loss']:.4f} acc {100 * record['train_accuracy']:5.2f}%",
    ]
    if "validation_accuracy" in record:
        parts.append(f"val acc {100 * record['validation_accuracy']:5.2f}%")
    parts.append(f"test loss {record['test_loss']:.4f} acc {100 * record['test_accuracy']:5.2f}%")
    if "pseudo_label_share" in record:
        accuracy = record["pseudo_label_accuracy"]
        accuracy_text = "-" if accuracy is None else f"{100 * accuracy:5.2f}%"
        parts.append(f"pseudo-labels {100 * record['pseudo_label_share']:5.2f}% acc {accuracy_text}")
    if "trainable_blocks" in record:
        parts.append(f"trainable blocks {record['trainable_blocks']}")
    knob_text = " ".join(f"{KNOB_LABELS.get(name, name)} {value:.4g}" for name, value in record["knobs"].items())
    parts.append(knob_text)
    parts.append(f"{record['seconds']:.1f}s")
    return " | ".join(parts)


class ProgressBar:
    """A one-line progress bar on standard error, drawn only when it is a terminal."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.last_drawn = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        filled = int(30 * done / max(self.total, 1))
        if filled == self.last_drawn and done != self.total:
            return
        self.last_drawn = filled
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def resume_trainer(run_dir: str | Path, log: Callable[[str], None] = print, overrides: dict | None = None) -> Trainer:
    """Rebuild the run in ``run_dir`` from its config and checkpoint, ready to continue with ``fit()``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume folder not found: {run_dir}")
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    values = dict(state.get("config") or {})
    values.update(overrides or {})
    values["out"] = str(run_dir)
    config = TrainConfig.from_dict(values)
    return Trainer(config, log=log, resume_state=state, resume_source=f"checkpoint {run_dir / CHECKPOINT_NAME}")
