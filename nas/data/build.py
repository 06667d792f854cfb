"""Build the datasets of a run from the ``data:`` section of its config: ``build_datasets(data_cfg, img_size)``.

Keys of ``data_cfg`` (a plain dict; missing keys take the defaults in ``DATA_DEFAULTS``):

- ``path``: ``"demo"`` (the built-in digits, see ``nas.data.demo``), an ImageFolder root holding
  ``train/<class>/`` and ``val/<class>/``, or a file list of ``path label`` lines (the training images).
- ``val_path``: the val images: a folder of class folders or a file list. Default: ``<path>/val`` for a
  root; for a file list, the file beside it named with its last ``train`` replaced by ``val``
  (``meta/train.txt`` -> ``meta/val.txt``, ``train_files.txt`` -> ``val_files.txt``).
- ``heldout_path``: a file list of held-out images (removed from train). Default: when
  ``heldout_fraction`` is set and ``path`` is a file list, its ``heldout`` sibling if that exists
  (so a run's written lists reproduce its split), else none.
- ``classes``: keep only these classes: a class list file, a shipped list name (``imagenet100``), or a
  list of names.
- ``num_classes``: then keep this many classes, chosen as ``class_sampling`` says: ``"first"`` (the first
  n in label order, i.e. sorted folder names) or ``"random"`` (n drawn with the seed).
- ``images_per_class`` or ``fraction``: keep that many (or that fraction, at least 1) of each class's
  training images, drawn with the seed. Val is never reduced.
- ``heldout_fraction``: hold out this fraction of each class's training images (after the two keys
  above) as the ``heldout`` set for the bilevel strategy; 0 or null: no held-out set.
- ``seed``: seed of every subset choice; null: the ``seed`` argument (the run's seed).
- ``scale``, ``ratio``, ``hflip``, ``crop_pct``, ``interpolation``: the ImageNet transforms (random
  resized crop area and aspect ranges, flip probability, eval center-crop fraction, ``"bicubic"`` or
  ``"bilinear"``). The demo data ignores them (it uses a small random shift).

Classes keep the order of the source and are relabeled 0..k-1; val and held-out file lists use the labels
of the training list (our written lists all share one labeling, given in ``classes.txt``). Every problem
with the data or these keys raises ``DataError`` with a one-line message before any training starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch.utils.data import Dataset

from nas.data import demo
from nas.data.datasets import ImageFileDataset
from nas.data.errors import DataError
from nas.data.folder import list_classes, list_images, split_dir
from nas.data.samples import (CLASSES_FILE, SampleList, read_file_list, resolve_class_list, write_class_names,
                              write_file_list)
from nas.data.subsets import CLASS_SAMPLING, limit_per_class, select_classes, split_heldout
from nas.data.transforms import INTERPOLATIONS, build_transform

DATA_DEFAULTS = {
    "path": "demo",
    "val_path": None,
    "heldout_path": None,
    "classes": None,
    "num_classes": None,
    "class_sampling": "first",
    "images_per_class": None,
    "fraction": None,
    "heldout_fraction": None,
    "seed": None,
    "scale": [0.08, 1.0],
    "ratio": [3 / 4, 4 / 3],
    "hflip": 0.5,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
}
FILE_LISTS = {"train": "train_files.txt", "val": "val_files.txt", "heldout": "heldout_files.txt"}


@dataclass
class DataBundle:
    """The datasets of a run. Items are (image (3, img_size, img_size) float32, label int)."""

    train: Dataset
    heldout: Dataset | None  # the bilevel strategy's alpha data (train transforms), when asked for
    val: Dataset
    num_classes: int
    class_names: list[str]

    def write_file_lists(self, run_dir: str) -> None:
        """Write ``train_files.txt``, ``val_files.txt``, ``heldout_files.txt`` (if any) and ``classes.txt``.

        Passing the written ``train_files.txt`` as ``data.path`` (with the subset keys unset) rebuilds the
        same datasets.
        """
        os.makedirs(run_dir, exist_ok=True)
        for split, name in FILE_LISTS.items():
            dataset = getattr(self, split)
            if dataset is not None:
                write_file_list(os.path.join(run_dir, name), dataset.samples)
        write_class_names(os.path.join(run_dir, CLASSES_FILE), self.class_names)

    def summary(self) -> str:
        """One line: class and image counts."""
        held = f", {len(self.heldout)} held-out" if self.heldout is not None else ""
        return f"{self.num_classes} classes: {len(self.train)} train{held}, {len(self.val)} val images"


def resolve_data_config(data_cfg: dict | None) -> dict:
    """``DATA_DEFAULTS`` updated with ``data_cfg``, every key and value checked."""
    data_cfg = dict(data_cfg or {})
    unknown = sorted(set(data_cfg) - set(DATA_DEFAULTS))
    if unknown:
        raise DataError(f"unknown data key(s) {', '.join(map(repr, unknown))}; valid keys: "
                        f"{', '.join(DATA_DEFAULTS)}")
    cfg = {**DATA_DEFAULTS, **data_cfg}
    if not isinstance(cfg["path"], str) or not cfg["path"]:
        raise DataError(f"data.path: expected 'demo', a folder or a file list, got {cfg['path']!r}")
    for key in ("val_path", "heldout_path"):
        _check(key, cfg[key], lambda v: isinstance(v, str) and v, "a path")
    for key in ("num_classes", "images_per_class"):
        _check(key, cfg[key], lambda v: _is_int(v) and v >= 1, "a positive int")
    _check("seed", cfg["seed"], _is_int, "an int")
    _check("fraction", cfg["fraction"], lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    _check("heldout_fraction", cfg["heldout_fraction"], lambda v: _is_number(v) and 0 <= v < 1,
           "a number in [0, 1)")
    if cfg["images_per_class"] is not None and cfg["fraction"] is not None:
        raise DataError("data.images_per_class and data.fraction are both set; use one of them")
    _check("class_sampling", cfg["class_sampling"], lambda v: v in CLASS_SAMPLING,
           f"one of {', '.join(CLASS_SAMPLING)}", optional=False)
    _check("interpolation", cfg["interpolation"], lambda v: v in INTERPOLATIONS,
           f"one of {', '.join(INTERPOLATIONS)}", optional=False)
    _check("scale", cfg["scale"], lambda v: _is_pair(v) and 0 < v[0] <= v[1] <= 1, "[min, max] with 0 < min <= "
           "max <= 1", optional=False)
    _check("ratio", cfg["ratio"], lambda v: _is_pair(v) and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max",
           optional=False)
    _check("hflip", cfg["hflip"], lambda v: _is_number(v) and 0 <= v <= 1, "a probability", optional=False)
    _check("crop_pct", cfg["crop_pct"], lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]",
           optional=False)
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_pair(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)


def _check(key, value, ok, expected, optional=True) -> None:
    if value is None and optional:
        return
    if not ok(value):
        raise DataError(f"data.{key}: expected {expected}, got {value!r}")


def build_datasets(data_cfg: dict | None, img_size: int, seed: int = 0, run_dir: str | None = None) -> DataBundle:
    """Read, subset and split the data that ``data_cfg`` describes (see the module docstring).

    img_size: side of the square images the datasets return. seed: the run's seed (unless data.seed).
    run_dir: when given, the chosen images are written there as file lists (call on one rank only).
    """
    cfg = resolve_data_config(data_cfg)
    if not _is_int(img_size) or img_size < 1:
        raise DataError(f"img_size: expected a positive int, got {img_size!r}")
    seed = cfg["seed"] if cfg["seed"] is not None else seed
    train, val, heldout = _read_splits(cfg, seed)
    train = limit_per_class(train, cfg["images_per_class"], cfg["fraction"], seed, where=_where(cfg))
    if heldout is not None:
        held_ids = set(heldout.ids)
        train = train.take([i for i, image_id in enumerate(train.ids) if image_id not in held_ids])
    elif cfg["heldout_fraction"]:
        train, heldout = split_heldout(train, cfg["heldout_fraction"], seed, where=_where(cfg))
    if len(train) == 0:
        raise DataError(f"no training images left in {_where(cfg)} after the subset and held-out split")
    if len(val) == 0:
        raise DataError(f"the val images of {_where(cfg)} include none of the {len(train.class_names)} chosen classes")
    bundle = DataBundle(train=_dataset(train, img_size, True, cfg), val=_dataset(val, img_size, False, cfg),
                        heldout=_dataset(heldout, img_size, True, cfg) if heldout is not None else None,
                        num_classes=len(train.class_names), class_names=list(train.class_names))
    if run_dir is not None:
        bundle.write_file_lists(run_dir)
    return bundle


def _where(cfg) -> str:
    return "the demo data" if cfg["path"] == "demo" else cfg["path"]


def _read_splits(cfg, seed) -> tuple[SampleList, SampleList, SampleList | None]:
    """(train, val, heldout or None) restricted to the chosen classes; val/heldout share train's labels."""
    path = cfg["path"]
    if path == "demo":
        if cfg["val_path"] is not None:
            raise DataError("data.val_path does not apply to the demo data (its val split is fixed)")
        train_all, val_all = demo.demo_splits()
        chosen = _choose_classes(train_all.class_names, cfg, seed, "the demo data")
        return train_all.restrict_to(chosen), val_all.restrict_to(chosen), _read_heldout(cfg, train_all, chosen)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"data path {path} does not exist (expected 'demo', an ImageFolder root with train/ and "
                        f"val/, or a file list of 'path label' lines)")
    if os.path.isdir(path):
        train_dir = split_dir(os.path.abspath(path), "train")
        available = list_classes(train_dir)
        chosen = _choose_classes(available, cfg, seed, train_dir)
        train = list_images(train_dir, chosen)
        full_labels = SampleList([], [], available)
        val_path = cfg["val_path"] or split_dir(os.path.abspath(path), "val")
    else:
        full_labels = read_file_list(path)
        chosen = _choose_classes(full_labels.class_names, cfg, seed, path)
        train = full_labels.restrict_to(chosen)
        val_path = cfg["val_path"] or _sibling(path, "val", required=True)
    return train, _read_val(val_path, full_labels.class_names, chosen), _read_heldout(cfg, full_labels, chosen)


def _choose_classes(available, cfg, seed, where) -> list[str]:
    classes, list_name = None, ""
    if cfg["classes"] is not None:
        classes, list_name = resolve_class_list(cfg["classes"])
    return select_classes(available, classes, cfg["num_classes"], cfg["class_sampling"], seed, where, list_name)


def _read_val(val_path, class_names, chosen) -> SampleList:
    val_path = os.path.expanduser(val_path)
    if not os.path.exists(val_path):
        raise DataError(f"val path {val_path} does not exist (set data.val_path to a folder of class folders "
                        f"or a file list)")
    if os.path.isdir(val_path):
        list_classes(val_path)
        return list_images(os.path.abspath(val_path), chosen)
    return read_file_list(val_path, class_names).restrict_to(chosen)


def _read_heldout(cfg, train_all: SampleList, chosen) -> SampleList | None:
    heldout_path = cfg["heldout_path"]
    if heldout_path is None and cfg["heldout_fraction"] and os.path.isfile(os.path.expanduser(cfg["path"])):
        heldout_path = _sibling(os.path.expanduser(cfg["path"]), "heldout", required=False)
    if heldout_path is None:
        return None
    heldout_path = os.path.expanduser(heldout_path)
    if not os.path.isfile(heldout_path):
        raise DataError(f"data.heldout_path {heldout_path} is not a file (expected a file list of 'path label' lines)")
    return read_file_list(heldout_path, train_all.class_names).restrict_to(chosen)


def _sibling(path: str, split: str, required: bool) -> str | None:
    """The file beside ``path`` named with its last 'train' replaced by ``split``, if it exists."""
    folder, name = os.path.split(path)
    at = name.rfind("train")
    candidate = os.path.join(folder, name[:at] + split + name[at + len("train"):]) if at >= 0 else None
    if candidate is not None and os.path.isfile(candidate):
        return candidate
    if required:
        looked = f" (looked for {candidate})" if candidate else ""
        raise DataError(f"no {split} list found for {path}{looked}; set data.{split}_path")
    return None


def _dataset(samples: SampleList, img_size: int, train: bool, cfg):
    if demo.is_demo_samples(samples):
        return demo.demo_dataset(samples, img_size, train)
    if any(i.startswith(demo.PREFIX) for i in samples.ids):
        raise DataError("a file list mixes demo digits and image files; use one or the other")
    transform = build_transform(img_size, train, cfg["scale"], cfg["ratio"], cfg["hflip"], cfg["crop_pct"],
                                cfg["interpolation"])
    return ImageFileDataset(samples, transform, replace_bad=train)
