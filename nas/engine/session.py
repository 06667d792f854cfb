"""What every training run does around the loop: join the process group, make the run folder, wrap the
model for data parallelism, find the checkpoint to resume from."""
from __future__ import annotations

import os

import torch

from nas.engine import checkpoint
from nas.engine.distributed import DistEnv, barrier, setup, teardown


def run_in_process_group(device: str, fn, *args):
    """fn(env, *args) inside the process group torchrun asked for (or a single process)."""
    env = setup(device)
    try:
        return fn(env, *args)
    finally:
        teardown()


def make_run_dir(out: str, env: DistEnv) -> None:
    if env.is_main:
        os.makedirs(out, exist_ok=True)
    barrier()


def data_parallel(model, env: DistEnv, find_unused_parameters: bool = False):
    """The module that runs the training steps: DDP-wrapped under torchrun, else the model itself."""
    model.to(env.device)
    if not env.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def last_checkpoint(out: str) -> dict | None:
    path = os.path.join(out, "last.pt")
    return checkpoint.load(path) if os.path.isfile(path) else None
