"""Process-group set-up and reductions for DistributedDataParallel runs under ``torchrun``.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``. Every process builds the same clock from the same options, so every rank
computes the same knob values without any communication; only metrics are reduced.
NCCL is the backend on GPUs and Gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def process_info_from_environment() -> ProcessInfo:
    """Read the rank and world size that ``torchrun`` sets; a plain run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessInfo()
    return ProcessInfo(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def initialise(info: ProcessInfo, device: torch.device) -> None:
    """Join the process group of a ``torchrun`` launch, once per process."""
    if not info.is_distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks in place; does nothing outside a distributed run."""
    if not dist.is_initialized():
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
