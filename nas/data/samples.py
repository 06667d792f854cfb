"""Sample lists: image ids with integer labels, and the text files they are read from and written to.

A *file list* (also called a meta file) has one ``path label`` line per image: the path is absolute or
relative to the file's folder (it may contain spaces; the label is the last field), the label an int >= 0.
Blank lines and lines starting with ``#`` are ignored. Class names come from a ``classes.txt`` beside the
file (line i names label i) when there is one, else from the images' parent folders when every label has
its own folder name (``n01440764/x.JPEG 0``), else they are the label numbers.

A *class list* names classes, one per line (``#`` comments allowed); ``imagenet100`` names the list
shipped with this package.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

import numpy as np

from nas.atomic import atomic_write
from nas.data.errors import DataError

CLASSES_FILE = "classes.txt"
SHIPPED_CLASS_LISTS = ("imagenet100",)


@dataclass
class SampleList:
    """Images of one split.

    ids: (N,) image ids, file paths (or ``digits:<i>`` for the demo data).
    labels: (N,) int64 array, indices into ``class_names``.
    class_names: the classes, in label order.
    """

    ids: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.ids) != len(self.labels):
            raise ValueError(f"SampleList: {len(self.ids)} ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices) -> SampleList:
        """The samples at ``indices`` (in that order), same classes."""
        indices = np.asarray(indices, dtype=np.int64)
        return SampleList([self.ids[i] for i in indices], self.labels[indices], list(self.class_names))

    def class_counts(self) -> np.ndarray:
        """(num_classes,) number of images per class."""
        return np.bincount(self.labels, minlength=len(self.class_names))

    def indices_of_class(self, label: int) -> np.ndarray:
        """Positions of the images of class ``label``, in list order."""
        return np.flatnonzero(self.labels == label)

    def restrict_to(self, class_names: list[str]) -> SampleList:
        """Keep the images of ``class_names`` (all must be known) and relabel them 0..k-1 in that order."""
        index = {name: i for i, name in enumerate(self.class_names)}
        new_label = np.full(len(self.class_names), -1, dtype=np.int64)
        for k, name in enumerate(class_names):
            new_label[index[name]] = k
        relabeled = new_label[self.labels]
        keep = np.flatnonzero(relabeled >= 0)
        return SampleList([self.ids[i] for i in keep], relabeled[keep], list(class_names))


def read_file_list(path: str, class_names: list[str] | None = None) -> SampleList:
    """Read a ``path label`` file list; relative paths are resolved against the file's folder.

    ``class_names`` fixes the label -> name mapping (used for a val list, which shares the train list's
    classes); otherwise it is found as the module docstring says.
    """
    base = os.path.dirname(os.path.abspath(path))
    ids, labels = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read file list {path}: {err}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(None, 1)
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{path} line {number}: expected 'path label' with an int label >= 0, got {line!r}")
        ids.append(fields[0] if _is_reference(fields[0]) else os.path.join(base, fields[0]))
        labels.append(int(fields[1]))
    if not ids:
        raise DataError(f"file list {path} lists no images (expected 'path label' lines)")
    files = [i for i in ids[:20] if not _is_reference(i)]
    if files and not any(os.path.exists(f) for f in files):
        raise DataError(f"none of the first {len(files)} images listed in {path} exist (e.g. {files[0]}); "
                        f"relative paths are resolved against the list's folder")
    labels = np.asarray(labels, dtype=np.int64)
    if class_names is None:
        class_names = _class_names_for(path, ids, labels)
    elif labels.max() >= len(class_names):
        raise DataError(f"{path}: label {labels.max()} is out of range for the {len(class_names)} training classes")
    return SampleList(ids, labels, class_names)


def _is_reference(image_id: str) -> bool:
    """Ids like ``digits:12`` refer to built-in data, not to files."""
    return image_id.startswith("digits:")


def _class_names_for(path: str, ids: list[str], labels: np.ndarray) -> list[str]:
    num_classes = int(labels.max()) + 1
    missing = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
    if len(missing):
        raise DataError(f"{path}: labels must be 0..{num_classes - 1} with every class present; "
                        f"label {missing[0]} has no images")
    names_file = os.path.join(os.path.dirname(os.path.abspath(path)), CLASSES_FILE)
    if os.path.isfile(names_file):
        names = read_class_list(names_file)
        if len(names) != num_classes:
            raise DataError(f"{names_file} names {len(names)} classes but {path} has {num_classes} labels")
        return names
    folder_of = {}
    for image_id, label in zip(ids, labels.tolist()):
        folder_of.setdefault(label, set()).add(os.path.basename(os.path.dirname(image_id)))
    folders = [folder_of[k] for k in range(num_classes)]
    if all(len(f) == 1 for f in folders) and len({next(iter(f)) for f in folders}) == num_classes:
        return [next(iter(f)) for f in folders]
    return [str(k) for k in range(num_classes)]


def write_file_list(path: str, samples: SampleList) -> None:
    """Write ``samples`` as ``path label`` lines (ids as stored: absolute paths), atomically."""
    lines = []
    for image_id, label in zip(samples.ids, samples.labels.tolist()):
        if "\n" in image_id:
            raise DataError(f"cannot write a file list entry containing a newline: {image_id!r}")
        lines.append(f"{image_id} {label}\n")
    _write_atomic(path, "".join(lines))


def write_class_names(path: str, class_names: list[str]) -> None:
    """Write one class name per line (line i names label i), atomically."""
    _write_atomic(path, "".join(f"{name}\n" for name in class_names))


def _write_atomic(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def read_class_list(path: str) -> list[str]:
    """Class names from a file, one per line; blank lines and ``#`` comments are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read class list {path}: {err}") from None
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"class list {path} names no classes")
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"class list {path} names {name!r} twice")
        seen.add(name)
    return names


def resolve_class_list(classes) -> tuple[list[str], str]:
    """Class names from a list-file path, a shipped list name (``imagenet100``) or a list of names.

    Returns (names, where) with ``where`` describing the source for error messages.
    """
    if isinstance(classes, (list, tuple)):
        names = [str(c) for c in classes]
        if not names:
            raise DataError("data.classes: the class list is empty")
        if len(set(names)) != len(names):
            raise DataError(f"data.classes: the class list names a class twice: {names}")
        return names, "data.classes"
    if not isinstance(classes, str):
        raise DataError(f"data.classes: expected a class list file, a shipped list name or a list of names, "
                        f"got {classes!r}")
    if os.path.isfile(classes):
        return read_class_list(classes), classes
    if classes in SHIPPED_CLASS_LISTS:
        with resources.as_file(resources.files("nas.data") / f"{classes}.txt") as shipped:
            return read_class_list(str(shipped)), classes
    raise DataError(f"data.classes: {classes!r} is neither a class list file nor a shipped list "
                    f"({', '.join(SHIPPED_CLASS_LISTS)})")
