"""What NCCL enforces, emulated on a machine without a GPU: a process-group backend that serves CUDA tensors only.

torch's fake process group, registered as "cudaonly" for device type "cuda" alone, stands where NCCL stands in
a CUDA process's group: a collective handed a CPU tensor then fails as it does under NCCL ("No backend type
associated with device type cpu"). gloo, which serves every tensor, is how a crash on every GPU run went unseen.
On a CPU machine no CUDA tensor exists, so "cudaonly" itself never has to communicate. Object collectives
(broadcast_object_list, all_gather_object) under NCCL pickle into CUDA tensors, which works on a GPU; a group
without gloo's CPU half gets them through a side gloo group here, so that the first tensor collective is where
such a run fails, as it does on a GPU.
"""
import functools
import os

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import _create_fake_pg

from nas.engine.distributed import process_group_backend

CPU_REFUSED = "No backend type associated with device type cpu"


def join_as_cuda_process(rank: int, world: int, port: int, backend: str | None = None) -> None:
    """Set torchrun's variables and join the group a CUDA process would (``backend``, default what
    ``nas.engine.distributed.setup`` picks for CUDA), with NCCL replaced by the CUDA-only stand-in; the run's
    own ``setup`` then finds the group joined and keeps it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if "cudaonly" not in dist.Backend.backend_list:
        dist.Backend.register_backend("cudaonly", _create_fake_pg, extended_api=True, devices=["cuda"])
    backend = process_group_backend(use_cuda=True) if backend is None else backend
    dist.init_process_group(backend.replace("nccl", "cudaonly"), rank=rank, world_size=world)
    if "cpu:" not in backend:
        side = dist.new_group(backend="gloo")
        dist.broadcast_object_list = functools.partial(dist.broadcast_object_list, group=side)
        dist.all_gather_object = functools.partial(dist.all_gather_object, group=side)
