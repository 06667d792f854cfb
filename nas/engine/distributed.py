"""Data parallelism detected from the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).

Without those variables everything runs in one process. With them, CUDA processes use NCCL on their
local GPU and CPU processes use gloo. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistEnv:
    """Pick the device and join the process group when launched by torchrun (RANK set), even with one process.

    device: "auto", "cpu" or "cuda" (checked with the run's settings, ``nas.engine.settings.check_train``)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ:  # not launched by torchrun: one process, no group
        return DistEnv(device=torch.device("cuda" if use_cuda else "cpu"))
    # a 1-process torchrun forms its group too: the collectives then run exactly as in a larger job
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (in place); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank 0's value of a picklable object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's value of a picklable object, in rank order; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

