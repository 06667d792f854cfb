"""Datasets: ``dataset[i] -> (image (3, S, S) float32, label int)``.

Both kinds expose ``samples`` (the ``SampleList`` they were built from), ``class_names``, ``num_classes``,
``labels`` and ``skipped``, so the search loop does not care where images come from.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

from nas.data.errors import DataError, SkippedImageWarning
from nas.data.samples import SampleList

# Decoding errors that mean "this file is not a usable image" (PIL raises all of these for bad files).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Decode an image file with Pillow, fully, as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageFileDataset(torch.utils.data.Dataset):
    """Images decoded from files with Pillow, then ``transform(img, generator)``.

    A file that cannot be decoded (corrupt, truncated, not an image, missing) is skipped: the first
    readable sample after it (cyclically) is returned in its place, a ``SkippedImageWarning`` is issued
    once for it, and it counts in ``skipped``. The bad-file flags live in shared memory, so the count
    covers DataLoader workers too and a file found bad is not decoded again.
    """

    def __init__(self, samples: SampleList, transform):
        if len(samples) == 0:
            raise DataError("no images to build a dataset from")
        self.samples = samples
        self.transform = transform
        # Bytes arrays instead of a list of str: forked workers touching Python objects copy their pages.
        self._paths = np.array([os.fsencode(p) for p in samples.ids])
        self._bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    class_names = property(lambda self: self.samples.class_names)
    num_classes = property(lambda self: len(self.samples.class_names))
    labels = property(lambda self: self.samples.labels)

    @property
    def skipped(self) -> int:
        """Number of distinct files found unreadable so far (in this process and its workers)."""
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int):
        return self.get(index)

    def get(self, index: int, generator=None):
        """(image, label) of sample ``index``, its random transforms drawn from ``generator``."""
        n = len(self._paths)
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:
                continue
            path = os.fsdecode(self._paths[i])
            try:
                img = load_rgb(path)
            except DECODE_ERRORS as err:
                self._bad[i] = True
                warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}",
                              SkippedImageWarning, stacklevel=2)
                continue
            return self.transform(img, generator), int(self.samples.labels[i])
        raise DataError(f"none of the {n} images could be decoded (first: {os.fsdecode(self._paths[0])})")


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory as a (N, C, H, W) tensor; ``transform(x, generator)`` makes each (3, S, S)."""

    def __init__(self, samples: SampleList, images: torch.Tensor, transform=None):
        if images.ndim != 4 or images.shape[0] != len(samples):
            raise ValueError(f"images: expected ({len(samples)}, C, H, W), got {tuple(images.shape)}")
        self.samples = samples
        self.images = images
        self.transform = transform
        self._labels = torch.from_numpy(samples.labels)

    class_names = property(lambda self: self.samples.class_names)
    num_classes = property(lambda self: len(self.samples.class_names))
    labels = property(lambda self: self.samples.labels)
    skipped = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.get(index)

    def get(self, index: int, generator=None):
        """(image, label) of sample ``index``, its random transforms drawn from ``generator``."""
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x, generator)
        return x, int(self._labels[index])
