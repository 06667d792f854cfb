"""The built-in demo digits: sizes, shapes, a fixed disjoint split, determinism, subsets and file lists."""
import os

import torch

from nas.data import build_datasets
from nas.data.demo import demo_splits


def test_sizes_shapes_and_fixed_split():
    bundle = build_datasets({"path": "demo"}, img_size=32, seed=0)
    assert bundle.num_classes == 10 and bundle.class_names == [str(d) for d in range(10)]
    assert len(bundle.train) + len(bundle.val) == 1797 and 340 <= len(bundle.val) <= 380
    train_ids, val_ids = set(bundle.train.samples.ids), set(bundle.val.samples.ids)
    assert len(train_ids) == len(bundle.train) and not train_ids & val_ids
    assert all(c >= 30 for c in bundle.val.samples.class_counts())  # class-balanced
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    gray = x * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and gray.min() >= -1e-5 and gray.max() <= 1 + 1e-5
    # the split does not depend on the run's seed
    other = build_datasets({"path": "demo"}, img_size=16, seed=7)
    assert other.val.samples.ids == bundle.val.samples.ids and other.val[0][0].shape == (3, 16, 16)


def test_augmentation_is_seeded_and_eval_is_not_augmented():
    bundle = build_datasets({"path": "demo"}, img_size=32)
    a = bundle.train.get(3, torch.Generator().manual_seed(0))[0]
    assert torch.equal(a, bundle.train.get(3, torch.Generator().manual_seed(0))[0])
    assert any(not torch.equal(a, bundle.train.get(3, torch.Generator().manual_seed(s))[0]) for s in range(1, 5))
    assert torch.equal(bundle.val[5][0], bundle.val[5][0])


def test_subsets_heldout_and_file_lists(run_dir):
    cfg = {"path": "demo", "num_classes": 4, "class_sampling": "random", "fraction": 0.5, "heldout_fraction": 0.2}
    bundle = build_datasets(cfg, 16, seed=3, run_dir=run_dir)
    assert bundle.num_classes == 4 and set(bundle.val.labels.tolist()) == {0, 1, 2, 3}
    assert not set(bundle.train.samples.ids) & set(bundle.heldout.samples.ids)
    assert not set(bundle.heldout.samples.ids) & set(bundle.val.samples.ids)
    assert 0.15 < len(bundle.heldout) / (len(bundle.train) + len(bundle.heldout)) < 0.25
    again = build_datasets({"path": os.path.join(run_dir, "train_files.txt"), "heldout_fraction": 0.2}, 16)
    assert again.class_names == bundle.class_names
    for split in ("train", "val", "heldout"):
        a, b = getattr(bundle, split), getattr(again, split)
        assert a.samples.ids == b.samples.ids and torch.equal(a.images, b.images)
        assert a.labels.tolist() == b.labels.tolist()


def test_demo_splits_cover_every_digit_once():
    train, val = demo_splits()
    assert sorted(train.ids + val.ids, key=lambda i: int(i.split(":")[1])) == [f"digits:{i}" for i in range(1797)]
