"""Helpers for the data tests: small ImageNet-like folders of real image files, written with Pillow."""
import os

import numpy as np
from PIL import Image

CLASSES = ["n00000003", "n00000001", "n00000002"]  # listed unsorted on purpose: labels follow sorted order
TRAIN_PER_CLASS = 6
VAL_PER_CLASS = 2
EXTENSIONS = [".JPEG", ".jpg", ".png", ".JPG", ".bmp", ".webp"]


def write_image(path, seed, size=(28, 20)):
    """A random-noise RGB image of (width, height) ``size``, format from the extension."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_image_root(root, classes=CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS):
    """root/{train,val}/<class>/ with noise images of varied sizes and extensions, plus a stray text file."""
    seed = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for k in range(per_class):
                ext = EXTENSIONS[k % len(EXTENSIONS)]
                write_image(os.path.join(folder, f"{name}_{k}{ext}"), seed, size=(20 + 3 * k, 30 - 2 * k))
                seed += 1
            with open(os.path.join(folder, "notes.txt"), "w") as f:
                f.write("not an image, and not named like one\n")
    return str(root)
