"""Data parallelism under torchrun: process group setup, sharding, reductions; only rank 0 writes."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job; world 1 means a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env(device_type: str) -> Dist:
    """Join the torchrun job described by the environment (gloo on CPU, NCCL on CUDA), if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank, world, local_rank)


def device_for(d: Dist, device: torch.device) -> torch.device:
    """Each rank on its own GPU; CPU ranks share the CPU."""
    if device.type == "cuda" and d.active:
        return torch.device("cuda", d.local_rank)
    return device


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum small scalars over ranks (loss sums, token counts): float64 keeps token counts exact."""
    if not d.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def wrap(module: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    if not d.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def no_sync(module: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation group."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
