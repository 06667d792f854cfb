"""Seeded subsets, written file lists that rebuild the same data, the class-balanced held-out split."""
import os

import numpy as np
import pytest

from nas.data import FILE_LISTS, build_datasets, read_class_list, read_file_list
from nas.data.samples import SampleList, resolve_class_list
from nas.data.subsets import limit_per_class, select_classes, split_heldout
from data_testing import make_image_root

WNIDS = [f"n{k:08d}" for k in range(8)]


@pytest.fixture
def wide_root(tmp_path):
    """8 classes of 10 train / 2 val images."""
    return make_image_root(tmp_path / "wide", classes=WNIDS, train_per_class=10)


def _lists(run_dir):
    return {name: open(os.path.join(run_dir, name)).read() for name in FILE_LISTS.values()
            if os.path.exists(os.path.join(run_dir, name))}


SUBSET = {"num_classes": 4, "class_sampling": "random", "images_per_class": 5, "heldout_fraction": 0.4}


def test_same_seed_same_file_lists_different_seed_different(wide_root, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        build_datasets({"path": wide_root, **SUBSET}, 8, seed=seed, run_dir=str(tmp_path / name))
        runs[name] = _lists(tmp_path / name)
    assert set(runs["a"]) == set(FILE_LISTS.values())
    assert runs["a"] == runs["b"]
    assert runs["a"]["train_files.txt"] != runs["c"]["train_files.txt"]
    # data.seed overrides the run's seed
    build_datasets({"path": wide_root, **SUBSET, "seed": 1}, 8, seed=2, run_dir=str(tmp_path / "d"))
    assert _lists(tmp_path / "d") == runs["a"]


def test_written_lists_rebuild_the_same_datasets(wide_root, run_dir):
    first = build_datasets({"path": wide_root, **SUBSET}, 8, seed=0, run_dir=run_dir)
    assert read_class_list(os.path.join(run_dir, "classes.txt")) == first.class_names
    again = build_datasets({"path": os.path.join(run_dir, "train_files.txt"), "heldout_fraction": 0.4}, 8, seed=9)
    assert again.class_names == first.class_names
    for split in ("train", "val", "heldout"):
        a, b = getattr(first, split).samples, getattr(again, split).samples
        assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist()


def test_class_list_file_and_first_n_classes(wide_root, tmp_path):
    list_file = tmp_path / "mine.txt"
    list_file.write_text("# my classes\nn00000005\nn00000002\n\nn00000007\n")
    bundle = build_datasets({"path": wide_root, "classes": str(list_file)}, 8)
    assert bundle.class_names == ["n00000002", "n00000005", "n00000007"]  # source (sorted) order
    assert len(bundle.train) == 30 and len(bundle.val) == 6
    bundle = build_datasets({"path": wide_root, "classes": ["n00000005", "n00000002", "n00000007"],
                             "num_classes": 2}, 8)
    assert bundle.class_names == ["n00000002", "n00000005"]
    assert build_datasets({"path": wide_root, "num_classes": 3}, 8).class_names == WNIDS[:3]


def test_shipped_imagenet100_list():
    names, where = resolve_class_list("imagenet100")
    assert len(names) == len(set(names)) == 100 and where == "imagenet100"
    assert names[0] == "n02869837" and all(n.startswith("n") and len(n) == 9 for n in names)


def test_random_class_sampling_is_seeded():
    pick = [select_classes(WNIDS, num_classes=3, sampling="random", seed=s) for s in (0, 0, 1, 2, 3)]
    assert pick[0] == pick[1] and len({tuple(p) for p in pick}) > 1
    assert all(p == sorted(p) for p in pick)


def _samples(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    return SampleList([f"img{i}" for i in range(len(labels))], labels, [f"c{k}" for k in range(len(counts))])


def test_images_per_class_and_fraction():
    samples = _samples([10, 20, 5])
    assert limit_per_class(samples, images_per_class=5, seed=0).class_counts().tolist() == [5, 5, 5]
    assert limit_per_class(samples, fraction=0.5, seed=0).class_counts().tolist() == [5, 10, 2]
    assert limit_per_class(samples, fraction=0.01, seed=0).class_counts().tolist() == [1, 1, 1]
    a = limit_per_class(samples, images_per_class=4, seed=0).ids
    assert a == limit_per_class(samples, images_per_class=4, seed=0).ids
    assert a != limit_per_class(samples, images_per_class=4, seed=1).ids
    # a class's pick does not depend on which other classes are present
    only_c1 = samples.restrict_to(["c1"])
    picked = limit_per_class(only_c1, images_per_class=4, seed=0).ids
    assert picked == [i for i, label in zip(a, limit_per_class(samples, images_per_class=4, seed=0).labels)
                      if label == 1]


def test_heldout_split_is_class_balanced_and_disjoint():
    samples = _samples([10, 20, 3, 2])
    train, held = split_heldout(samples, 0.25, seed=0)
    assert held.class_counts().tolist() == [2, 5, 1, 1]
    assert train.class_counts().tolist() == [8, 15, 2, 1]
    assert not set(train.ids) & set(held.ids) and set(train.ids) | set(held.ids) == set(samples.ids)
    assert split_heldout(samples, 0.25, seed=0)[1].ids == held.ids
    assert split_heldout(samples, 0.25, seed=1)[1].ids != held.ids


def test_heldout_in_build_datasets(image_root):
    bundle = build_datasets({"path": image_root, "heldout_fraction": 0.5}, 8, seed=0)
    assert len(bundle.heldout) == 9 and len(bundle.train) == 9
    assert bundle.heldout.class_names == bundle.class_names
    assert bundle.heldout.samples.class_counts().tolist() == [3, 3, 3]
    assert build_datasets({"path": image_root, "heldout_fraction": 0}, 8).heldout is None


def test_heldout_path_is_removed_from_train(image_root, tmp_path):
    full = build_datasets({"path": image_root}, 8)
    held = full.train.samples.take([0, 7, 13])
    (tmp_path / "held.txt").write_text("".join(f"{i} {y}\n" for i, y in zip(held.ids, held.labels)))
    bundle = build_datasets({"path": image_root, "heldout_path": str(tmp_path / "held.txt")}, 8)
    assert bundle.heldout.samples.ids == held.ids
    assert len(bundle.train) == len(full.train) - 3 and not set(bundle.train.samples.ids) & set(held.ids)
    assert read_file_list(str(tmp_path / "held.txt"), full.class_names).labels.tolist() == held.labels.tolist()
