"""Data parallelism detected from the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).

Without those variables everything runs in one process. With them, CUDA processes join a group that serves
both devices, NCCL for CUDA tensors and gloo for CPU ones (the loop reduces small CPU tensors: step flags,
epoch sums), and CPU processes use gloo. Only rank 0 writes files.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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


def process_group_backend(use_cuda: bool) -> str:
    """The backend string for ``init_process_group``. NCCL serves CUDA tensors only, so a CUDA process also
    needs gloo for the CPU tensors every collective helper here may be handed."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


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
        backend = process_group_backend(use_cuda)
        if use_cuda and not dist.is_nccl_available():
            backend = "gloo"  # gloo also reduces CUDA tensors (through the host): slower, but it runs
            if rank == 0:
                log.warning("this torch %s has no NCCL; the process group uses gloo for the CUDA tensors too "
                            "(slower collectives)", torch.__version__)
        dist.init_process_group(backend)
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

