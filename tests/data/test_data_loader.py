"""Loaders: seeded order and augmentation, epochs, sharding, and unreadable files skipped mid-epoch."""
import os

import pytest
import torch

from nas.data import build_datasets, build_loader, set_epoch
from nas.data.loader import ShardSampler, batches_on_every_rank, sample_seed, skip_events


def _epoch(loader, epoch):
    set_epoch(loader, epoch)
    return [None if b is None else (b[0].clone(), b[1].clone()) for b in loader]


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


def _corrupt(folder, good_name):
    """A truncated JPEG and a text file named like one, beside ``good_name``."""
    with open(os.path.join(folder, good_name), "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "corrupt.JPEG"), "wb") as f:
        f.write(data[: len(data) // 3])
    with open(os.path.join(folder, "x.JPEG"), "w") as f:
        f.write("this is text, not a JPEG\n")
    return [os.path.join(folder, "corrupt.JPEG"), os.path.join(folder, "x.JPEG")]


def test_unreadable_files_are_skipped_counted_and_named_once(image_root, capfd):
    bad = _corrupt(os.path.join(image_root, "train", "n00000002"), "n00000002_0.JPEG")
    train = build_datasets({"path": image_root, "hflip": 0.0}, 8).train  # building does not decode
    assert len(train) == 20 and train.skipped == 0
    loader = build_loader(train, 5, train=True, workers=2, seed=0)
    batches = _epoch(loader, 0)
    assert sum(len(y) for _, y in batches) == 20 and all(torch.isfinite(x).all() for x, _ in batches)
    assert train.skipped == 2 and skip_events(loader) == 2  # counted across the worker processes
    _epoch(loader, 1)
    assert train.skipped == 2 and skip_events(loader) == 4  # skipped again in epoch 2, not decoded again
    err = capfd.readouterr().err.splitlines()
    assert sorted(line.split(" (")[0] for line in err) == sorted(f"warning: skipping unreadable image {p}" for p in bad)


def test_skipped_train_file_is_replaced_by_the_next_good_sample(image_root):
    folder = os.path.join(image_root, "train", "n00000001")
    with open(os.path.join(folder, "n00000001_0.JPEG"), "w") as f:
        f.write("garbage")
    train = build_datasets({"path": image_root}, 8).train
    bad = train.samples.ids.index(os.path.join(folder, "n00000001_0.JPEG"))
    x, y = train.get(bad, torch.Generator().manual_seed(0))
    assert torch.equal(x, train.get(bad + 1, torch.Generator().manual_seed(0))[0]) and y == train.labels[bad + 1]
    assert train.skipped == 1 and train.skip_events == 1


def test_unreadable_val_image_is_left_out_not_replaced(image_root, capfd):
    folder = os.path.join(image_root, "val", "n00000003")
    for name in os.listdir(folder):
        if name.endswith(".JPEG") or name.endswith(".jpg"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("not an image")
    val = build_datasets({"path": image_root}, 8).val
    batches = _epoch(build_loader(val, 2, train=False, workers=0), 0)
    assert batches[-1] is None  # the last class's two val images are both unreadable
    labels = torch.cat([y for b in batches if b is not None for y in [b[1]]]).tolist()
    assert labels == [0, 0, 1, 1] and val.skipped == 2  # no image counted twice in their place
    assert len(capfd.readouterr().err.strip().splitlines()) == 2


def test_augmentation_does_not_depend_on_the_number_of_workers(image_root):
    train = build_datasets({"path": image_root}, 8).train
    by_workers = [_epoch(build_loader(train, 4, train=True, workers=w, seed=3), 2) for w in (0, 1, 2)]
    assert _same(by_workers[0], by_workers[1]) and _same(by_workers[0], by_workers[2])


def test_an_epoch_resumed_in_the_middle_yields_the_rest_of_it(image_root):
    train = build_datasets({"path": image_root}, 8).train
    loader = build_loader(train, 4, train=True, workers=2, seed=5)
    whole = _epoch(loader, 3)
    set_epoch(loader, 3, skip_batches=2)
    rest = [(x.clone(), y.clone()) for x, y in loader]
    assert len(whole) == len(loader) == 4 and _same(rest, whole[2:])
    assert _same(_epoch(loader, 3), whole)  # the next set_epoch starts at the beginning again
    with pytest.raises(ValueError, match="only a training loader"):
        set_epoch(build_loader(train, 4, train=False), 0, skip_batches=1)


def test_sample_seeds_differ_across_epochs_positions_and_seeds():
    seeds = {sample_seed(s, e, p) for s in range(3) for e in range(50) for p in range(2000)}
    assert len(seeds) == 3 * 50 * 2000 and max(seeds) < 2 ** 63


def test_distributed_train_loaders_split_each_epoch(image_root, monkeypatch):
    import nas.data.loader as loader_module
    train = build_datasets({"path": image_root}, 8).train
    orders = []
    for rank in (0, 1):
        monkeypatch.setattr(loader_module, "_world", lambda rank=rank: (rank, 2))
        loader = build_loader(train, 3, train=True, seed=0, distributed=True)
        set_epoch(loader, 4)
        orders.append([index for index, _ in loader.sampler])
    assert len(orders[0]) == len(orders[1]) == 9
    assert sorted(orders[0] + orders[1]) == list(range(18))


def test_evaluation_shards_report_the_batches_every_rank_has(image_root, monkeypatch):
    import nas.data.loader as loader_module
    val = build_datasets({"path": image_root}, 8).val  # 6 images
    counts = []
    for rank in range(4):
        monkeypatch.setattr(loader_module, "_world", lambda rank=rank: (rank, 4))
        loader = build_loader(val, 1, train=False, distributed=True)
        counts.append((len(loader), batches_on_every_rank(loader)))
    assert counts == [(2, 1), (2, 1), (1, 1), (1, 1)]  # ranks 0-1 hold 2 images, ranks 2-3 one
    train = build_datasets({"path": image_root}, 8).train
    assert batches_on_every_rank(build_loader(train, 4, train=True)) == 4
