"""Train digits under torchrun and record what this rank saw, for tests/test_distributed.py.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N ddp_worker.py OUT_DIR
Each rank writes OUT_DIR/rank<r>.json with the knob values of every step, the training-sample
indices of every epoch, and the final summary.
"""

import json
import sys
from pathlib import Path

import torch

from cyclical_training.config import TrainConfig
from cyclical_training.data import load_dataset
from cyclical_training.train import Trainer

out = Path(sys.argv[1])
dataset = load_dataset("digits")
# Write each training image's index into its first two pixels, so a rank's batches tell which
# samples it received.
count = len(dataset.train_labels)
dataset.train_images[:, 0, 0, 0] = (torch.arange(count) // 256).to(torch.uint8)
dataset.train_images[:, 0, 0, 1] = (torch.arange(count) % 256).to(torch.uint8)

config = TrainConfig(
    epochs=3, batch_size="256:128", weight_decay="5e-4:5e-3", temperature="0.5:2", clip_norm="1:10",
    cycle_unit="step", seed=1, progress=False, num_threads=1, out=str(out / "run"),
)
trainer = Trainer(config, log=lambda line: None, dataset=dataset)

knob_values, epoch_indices = [], {}
apply = trainer.knobs.apply
prepare = trainer.prepare_batch


def recording_apply(clock):
    values = apply(clock)
    knob_values.append(values)
    return values


def recording_prepare(images, values, generator):
    decoded = images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()
    epoch_indices.setdefault(trainer.clock.epoch, []).extend(decoded.tolist())
    return prepare(images, values, generator)


trainer.knobs.apply = recording_apply
trainer.prepare_batch = recording_prepare
summary = trainer.fit()
(out / f"rank{trainer.process.rank}.json").write_text(json.dumps({
    "world_size": trainer.process.world_size,
    "knobs": knob_values,
    "indices": epoch_indices,
    "summary": summary,
    "train_images": count,
}))
