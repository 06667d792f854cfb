"""The selection split: training images held out to score tuning trials, so that the val split stays for the
final comparison.

``RUN/selection/`` holds ``search_train.txt`` (the training images trials train on), ``selection.txt`` (the
held-out ones they are scored on; ``tune.selection_fraction`` of each class, drawn with the config's seed) and
``classes.txt``. A trial's data section points ``path`` and ``val_path`` at these lists, so the search's own
"val" numbers are selection-split numbers. The file names avoid ``heldout`` on purpose: a file list named
``*train*`` picks up a ``*heldout*`` sibling as the bilevel strategy's alpha data, and the selection images
must not train alpha.
"""
from __future__ import annotations

import os

import yaml

from nas.atomic import atomic_write
from nas.data import DataError, build_datasets, write_file_list
from nas.data.samples import write_class_names
from nas.tune.space import TuneError

TRAIN_LIST, SELECTION_LIST, RECIPE = "search_train.txt", "selection.txt", "split.yaml"


def selection_data(cfg: dict, fraction: float | None, run_dir: str) -> dict | None:
    """The data section of a trial (None: no selection split, trials use the config's data as it is)."""
    if not fraction:
        return None
    folder = os.path.join(run_dir, "selection")
    recipe = {"fraction": fraction, "seed": cfg["seed"], "img_size": cfg["img_size"], "data": cfg["data"]}
    train_list, selection_list = os.path.join(folder, TRAIN_LIST), os.path.join(folder, SELECTION_LIST)
    recipe_path = os.path.join(folder, RECIPE)
    if os.path.isfile(recipe_path):
        with open(recipe_path) as f:
            if yaml.safe_load(f) != recipe:
                raise TuneError(f"{folder}: this selection split was drawn from other data settings "
                                f"(see {RECIPE}); use another --out, or delete the folder to draw it again")
    if not (os.path.isfile(recipe_path) and os.path.isfile(train_list) and os.path.isfile(selection_list)):
        data_cfg = {**cfg["data"], "heldout_fraction": fraction, "heldout_path": None}
        try:
            data = build_datasets(data_cfg, cfg["img_size"], cfg["seed"])
        except DataError as exc:
            raise TuneError(f"tune.selection_fraction: {exc}") from None
        os.makedirs(folder, exist_ok=True)
        # every write is atomic and the content is a function of the recipe: concurrent workers agree
        write_class_names(os.path.join(folder, "classes.txt"), data.class_names)
        write_file_list(train_list, data.train.samples)
        write_file_list(selection_list, data.heldout.samples)
        with atomic_write(recipe_path) as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
    return {**cfg["data"], "path": os.path.abspath(train_list), "val_path": os.path.abspath(selection_list),
            "heldout_path": None, "classes": None, "num_classes": None, "images_per_class": None, "fraction": None}
