"""DataLoaders whose order and augmentation are a function of (seed, epoch, rank), so runs and resumes repeat.

Call ``set_epoch(loader, epoch)`` at the start of every epoch. It fixes the shuffle (the sampler's
permutation is seeded by seed + epoch, the same on every rank, each rank taking every world-th index) and
re-seeds the loader's generator, from which each worker's torch RNG -- and so its augmentation -- is seeded.
With ``workers=0`` augmentation draws from the main process's global torch RNG instead: seed it and save
its state with the checkpoint.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from nas.data.errors import DataError


class ShardSampler(Sampler):
    """Evaluation order: rank r gets indices r, r + world, ... (no shuffling, no padding, no duplicates)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        pass


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _loader_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2 ** 63)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's RNGs from the worker's torch seed.

    torch itself seeds each worker with (a base seed drawn from the loader's generator) + worker_id.
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(dataset, batch_size: int, train: bool, workers: int = 0, seed: int = 0,
                 distributed: bool | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` yielding (images (B, 3, S, S) float32, labels (B,) int64).

    train: shuffle (seeded; a ``DistributedSampler``, also with one process) and drop the last partial
        batch; else in order, sharded over ranks without padding (sum the metrics over ranks).
    distributed: shard over the ``torch.distributed`` ranks; None = when a process group is initialized.
    batch_size: per process.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size: expected a positive int, got {batch_size!r}")
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    rank, world = _world() if distributed else (0, 1)
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        if len(sampler) < batch_size:
            raise DataError(f"batch_size={batch_size} is larger than the {len(sampler)} training images per "
                            f"process ({len(dataset)} images, {world} process(es))")
    else:
        sampler = ShardSampler(len(dataset), rank, world)
    generator = torch.Generator()
    generator.manual_seed(_loader_seed(seed, 0, rank))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker, generator=generator)
    loader.seed, loader.rank = seed, rank
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the next pass over ``loader`` the one of ``epoch``: its shuffle and its workers' seeds."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(_loader_seed(loader.seed, epoch, loader.rank))
