"""ImageNet in ImageFolder layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

Classes are the sub-folders of ``train/`` in sorted order (label = position); ``val/`` is read with the
same mapping. Image files are recognised by extension, case-insensitively (``IMAGE_EXTENSIONS``); other
files are ignored. Only the folders of the classes asked for are listed, so a 100-class subset of ImageNet
does not walk all 1000 folders.
"""
from __future__ import annotations

import os

from nas.data.errors import DataError
from nas.data.samples import SampleList

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
LAYOUT = "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG"


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def split_dir(root: str, split: str) -> str:
    """``root/split``, checked to exist."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataError(f"{root} has no {split}/ folder (expected the ImageFolder layout {LAYOUT})")
    return path


def list_classes(split_path: str) -> list[str]:
    """Sorted names of the class folders in ``split_path``; at least one."""
    try:
        names = sorted(e.name for e in os.scandir(split_path) if e.is_dir() and not e.name.startswith("."))
    except OSError as err:
        raise DataError(f"cannot list {split_path}: {err}") from None
    if not names:
        loose = any(is_image_file(e.name) for e in os.scandir(split_path))
        hint = " (its images lie loose; put each class in its own sub-folder)" if loose else ""
        raise DataError(f"{split_path} has no class folders{hint} (expected {LAYOUT})")
    return names


def list_images(split_path: str, class_names: list[str]) -> SampleList:
    """The images of ``class_names`` (labels in that order), file names sorted within each class.

    Every class must have a folder with at least one image in it.
    """
    ids, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(split_path, name)
        if not os.path.isdir(folder):
            raise DataError(f"{split_path} has no folder for class {name!r} (expected {LAYOUT}, "
                            f"with the same classes in train/ and val/)")
        files = sorted(e.name for e in os.scandir(folder) if is_image_file(e.name) and not e.is_dir())
        if not files:
            raise DataError(f"class folder {folder} has no images ({' '.join(IMAGE_EXTENSIONS)})")
        ids.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    return SampleList(ids, labels, list(class_names))
