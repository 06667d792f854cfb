"""Loaders: seeded order and augmentation, epochs, sharding, and unreadable files skipped mid-epoch."""
import os
import warnings

import pytest
import torch

from nas.data import SkippedImageWarning, build_datasets, build_loader, set_epoch
from nas.data.loader import ShardSampler


def _epoch(loader, epoch):
    set_epoch(loader, epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_loader_is_reproducible_per_seed_and_epoch(image_root):
    train = build_datasets({"path": image_root}, 8).train

    def loader(seed):
        return build_loader(train, 4, train=True, workers=2, seed=seed)
    first, second, other = loader(0), loader(0), loader(1)
    e0, e1 = _epoch(first, 0), _epoch(first, 1)
    assert len(e0) == 18 // 4 and e0[0][0].shape == (4, 3, 8, 8) and e0[0][1].dtype == torch.int64
    assert _same(e0, _epoch(second, 0)) and _same(e1, _epoch(second, 1))  # same seed, same epochs
    assert _same(e1, _epoch(loader(0), 1))  # resuming at epoch 1 needs no saved loader state
    assert not _same(e0, e1) and not _same(e0, _epoch(other, 0))


def test_eval_loader_keeps_order_and_every_sample(image_root):
    val = build_datasets({"path": image_root}, 8).val
    batches = _epoch(build_loader(val, 4, train=False, workers=0), 0)
    assert [len(y) for _, y in batches] == [4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == val.labels.tolist()


def test_shard_sampler_partitions_indices():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]


def test_unreadable_files_are_skipped_and_counted(image_root):
    folder = os.path.join(image_root, "train", "n00000002")
    good = os.path.join(folder, "n00000002_0.JPEG")
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "corrupt.JPEG"), "wb") as f:
        f.write(data[: len(data) // 3])  # a truncated JPEG
    with open(os.path.join(folder, "x.JPEG"), "w") as f:
        f.write("this is text, not a JPEG\n")
    train = build_datasets({"path": image_root, "hflip": 0.0}, 8).train  # building does not decode
    assert len(train) == 20 and train.skipped == 0
    batches = _epoch(build_loader(train, 5, train=True, workers=2, seed=0), 0)
    assert sum(len(y) for _, y in batches) == 20 and all(torch.isfinite(x).all() for x, _ in batches)
    assert train.skipped == 2  # counted across the worker processes
    _epoch(build_loader(train, 5, train=True, workers=2, seed=0), 1)
    assert train.skipped == 2  # known bad files are not retried or counted again


def test_skipped_file_warns_once_and_is_replaced_by_the_next_good_sample(image_root):
    folder = os.path.join(image_root, "train", "n00000001")
    with open(os.path.join(folder, "n00000001_0.JPEG"), "w") as f:
        f.write("garbage")
    train = build_datasets({"path": image_root}, 8).train
    bad = train.samples.ids.index(os.path.join(folder, "n00000001_0.JPEG"))
    with pytest.warns(SkippedImageWarning, match="skipping unreadable image .*n00000001_0.JPEG"):
        x, y = train.get(bad, torch.Generator().manual_seed(0))
    assert torch.equal(x, train.get(bad + 1, torch.Generator().manual_seed(0))[0]) and y == train.labels[bad + 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.get(bad)  # no second warning
    assert train.skipped == 1


def test_distributed_train_loaders_split_each_epoch(image_root, monkeypatch):
    import nas.data.loader as loader_module
    train = build_datasets({"path": image_root}, 8).train
    orders = []
    for rank in (0, 1):
        monkeypatch.setattr(loader_module, "_world", lambda rank=rank: (rank, 2))
        loader = build_loader(train, 3, train=True, seed=0, distributed=True)
        set_epoch(loader, 4)
        orders.append(list(loader.sampler))
    assert len(orders[0]) == len(orders[1]) == 9
    assert sorted(orders[0] + orders[1]) == list(range(18))
