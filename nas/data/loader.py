"""DataLoaders whose order and augmentation are a function of (seed, epoch, rank), so runs and resumes repeat.

Call ``set_epoch(loader, epoch)`` at the start of every epoch. It fixes the shuffle (the sampler's
permutation is seeded by seed + epoch, the same on every rank, each rank taking every world-th index). Each
training sample carries its own seed, drawn from (seed, epoch, its position in the epoch), from which its
random transforms draw: the augmentation does not depend on the number of workers, and an epoch can be
resumed in the middle (``set_epoch(loader, epoch, skip_batches=b)`` starts at batch b without reading the
batches before it) and go on exactly as if it had not stopped.

Workers ignore SIGINT and SIGTERM: Ctrl-C and a scheduler's SIGTERM are the main process's to handle
(``nas.engine.preempt``), which then stops its workers.
"""
from __future__ import annotations

import random
import signal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate

from nas.data.errors import DataError

_MASK64 = 2 ** 64 - 1


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


class EpochSampler(DistributedSampler):
    """The training order: ``DistributedSampler``'s seeded shuffle, as (index, sample seed) keys for our
    datasets (``takes_sample_seeds``) and as plain indices for others.

    ``skip``: keys of this epoch not to yield again (a resumed epoch); ``len`` stays the whole epoch's.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.seeded = getattr(dataset, "takes_sample_seeds", False)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        for pos in range(self.skip, len(indices)):
            if not self.seeded:
                yield indices[pos]
                continue
            # the position in the whole epoch (all ranks), so every rank's samples get distinct seeds
            yield indices[pos], sample_seed(self.seed, self.epoch, pos * self.num_replicas + self.rank)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the sample at ``position`` of ``epoch``: a hash, so no two (seed, epoch, position) of
    realistic size share one (a linear formula would repeat across epochs)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ position) >> 1  # manual_seed: < 2**63


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _loader_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2 ** 63)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's RNGs from the worker's torch seed, and leave
    SIGINT/SIGTERM to the main process.

    torch itself seeds each worker with (a base seed drawn from the loader's generator) + worker_id.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def _collate(items):
    """Leave out the evaluation images that could not be read; a batch of none of them is None."""
    items = [item for item in items if item is not None]
    return default_collate(items) if items else None


def build_loader(dataset, batch_size: int, train: bool, workers: int = 0, seed: int = 0,
                 distributed: bool | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` yielding (images (B, 3, S, S) float32, labels (B,) int64).

    train: shuffle (seeded; an ``EpochSampler``, also with one process) and drop the last partial
        batch; else in order, sharded over ranks without padding (sum the metrics over ranks); an
        evaluation batch leaves unreadable images out, and is None when it has none left.
    distributed: shard over the ``torch.distributed`` ranks; None = when a process group is initialized.
    batch_size: per process.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"train.batch_size: expected a positive int, got {batch_size!r}")
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    rank, world = _world() if distributed else (0, 1)
    if train:
        sampler = EpochSampler(dataset, world, rank, seed)
        if len(sampler) < batch_size:
            raise DataError(f"train.batch_size={batch_size} is larger than the {len(sampler)} training images per "
                            f"process ({len(dataset)} images, {world} process(es))")
    else:
        sampler = ShardSampler(len(dataset), rank, world)
    generator = torch.Generator()
    generator.manual_seed(_loader_seed(seed, 0, rank))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker, generator=generator,
                        collate_fn=_collate)
    loader.seed, loader.rank = seed, rank
    return loader


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Make the next pass over ``loader`` the one of ``epoch``: its shuffle and its workers' seeds.

    skip_batches: start the pass at this batch (a training loader resumed in the middle of an epoch)."""
    loader.sampler.set_epoch(epoch)
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.skip = skip_batches * loader.batch_size
    elif skip_batches:
        raise ValueError("set_epoch: only a training loader can start a pass in the middle")
    loader.generator.manual_seed(_loader_seed(loader.seed, epoch, loader.rank))


def batches_on_every_rank(loader: DataLoader) -> int:
    """How many batches every rank's pass over ``loader`` has: an evaluation shard can be one batch shorter on
    the last ranks (no padding), so per-batch collectives must stop there."""
    sampler = loader.sampler
    if not isinstance(sampler, ShardSampler):
        return len(loader)
    fewest = len(range(sampler.world_size - 1, sampler.length, sampler.world_size))
    return -(-fewest // loader.batch_size)


def skip_events(loader: DataLoader) -> int:
    """How many samples the loader's dataset has skipped as unreadable so far (see ``ImageFileDataset``)."""
    return getattr(loader.dataset, "skip_events", 0)
