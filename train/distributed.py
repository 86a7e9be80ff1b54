"""Single-process or DistributedDataParallel training, decided by the environment ``torchrun`` sets.

Under ``torchrun --nproc_per_node P`` every process reads RANK / WORLD_SIZE / LOCAL_RANK, joins a
process group (NCCL on CUDA, gloo on CPU) and trains on its slice of each global batch. Without
those variables nothing changes: one process, no process group.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.errors import TrainError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present (one GPU per local rank), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"device {name!r} requested but CUDA is not available here")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise TrainError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


@contextmanager
def distributed_context(device: str = "auto"):
    """Yield the DistContext of this process; join and leave the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        started_here = True
    else:
        started_here = False
    try:
        yield DistContext(rank, world, local_rank, dev)
    finally:
        if started_here:
            dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP around ``model`` when distributed (parameters are broadcast from rank 0), else the model."""
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Average a float over ranks (for logged losses; gradients are averaged by DDP itself)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
