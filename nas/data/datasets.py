"""Datasets: ``dataset[i] -> (image (3, S, S) float32, label int)``.

Both kinds expose ``samples`` (the ``SampleList`` they were built from), ``class_names``, ``num_classes``,
``labels`` and ``skipped``, so the search loop does not care where images come from.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from PIL import Image

from nas.data.errors import DataError
from nas.data.samples import SampleList

# Decoding errors that mean "this file is not a usable image" (PIL raises all of these for bad files).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Decode an image file with Pillow, fully, as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


class _SampleDataset(torch.utils.data.Dataset):
    """What both kinds share: their ``samples``, and ``dataset[key]`` for both key kinds the loaders use
    (see ``nas.data.loader``)."""

    samples: SampleList
    takes_sample_seeds = True  # training samplers hand (index, seed) keys (nas.data.loader.EpochSampler)
    class_names = property(lambda self: self.samples.class_names)
    num_classes = property(lambda self: len(self.samples.class_names))
    labels = property(lambda self: self.samples.labels)

    def __getitem__(self, key):
        """key: an index, or (index, seed) from a training sampler: the transform's draws come from that seed."""
        if isinstance(key, tuple):
            return self.get(key[0], torch.Generator().manual_seed(key[1]))
        return self.get(key)


class ImageFileDataset(_SampleDataset):
    """Images decoded from files with Pillow, then ``transform(img, generator)``.

    A file that cannot be decoded (corrupt, truncated, not an image, missing) is skipped, with one
    ``warning:`` line on stderr naming it the first time. With ``replace_bad`` (training) the first readable
    sample after it (cyclically) is returned in its place, so batches keep their size; without it
    (evaluation) the item is None and the loader's collate leaves it out, so no image counts twice. The
    per-file skip counts live in shared memory, so they cover DataLoader workers too, and a file found bad is
    not decoded again.
    """

    def __init__(self, samples: SampleList, transform, replace_bad: bool = True):
        if len(samples) == 0:
            raise DataError("no images to build a dataset from")
        self.samples = samples
        self.transform = transform
        self.replace_bad = replace_bad
        # Bytes arrays instead of a list of str: forked workers touching Python objects copy their pages.
        self._paths = np.array([os.fsencode(p) for p in samples.ids])
        self._bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()
        # times each sample was asked for and skipped; each index has one writer at a time (its batch's worker)
        self._skips = torch.zeros(len(samples), dtype=torch.int32).share_memory_()


    @property
    def skipped(self) -> int:
        """Number of distinct files found unreadable so far (in this process and its workers)."""
        return int(self._bad.sum())

    @property
    def skip_events(self) -> int:
        """Number of samples skipped so far (a bad file counts each time it is drawn): the per-epoch count is
        its difference over the epoch."""
        return int(self._skips.sum())

    def __len__(self) -> int:
        return len(self._paths)

    def _decode(self, i: int):
        if self._bad[i]:
            return None
        path = os.fsdecode(self._paths[i])
        try:
            return load_rgb(path)
        except DECODE_ERRORS as err:
            self._bad[i] = True
            warn_skipped(path, err)
            return None

    def get(self, index: int, generator=None):
        """(image, label) of sample ``index``, its random transforms drawn from ``generator``; None for an
        unreadable file when ``replace_bad`` is off."""
        n = len(self._paths)
        for offset in range(n if self.replace_bad else 1):
            i = (index + offset) % n
            img = self._decode(i)
            if img is not None:
                return self.transform(img, generator), int(self.samples.labels[i])
            if offset == 0:
                self._skips[index] += 1
        if not self.replace_bad:
            return None
        raise DataError(f"none of the {n} images could be decoded (first: {os.fsdecode(self._paths[0])})")


def warn_skipped(path: str, err: Exception) -> None:
    """One line on stderr; on a terminal it first clears the progress line it would otherwise run into."""
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(f"{clear}warning: skipping unreadable image {path} ({type(err).__name__}: {err})", file=sys.stderr,
          flush=True)


class TensorImageDataset(_SampleDataset):
    """Images held in memory as a (N, C, H, W) tensor; ``transform(x, generator)`` makes each (3, S, S)."""

    def __init__(self, samples: SampleList, images: torch.Tensor, transform=None):
        if images.ndim != 4 or images.shape[0] != len(samples):
            raise ValueError(f"images: expected ({len(samples)}, C, H, W), got {tuple(images.shape)}")
        self.samples = samples
        self.images = images
        self.transform = transform
        self._labels = torch.from_numpy(samples.labels)

    skipped = skip_events = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def get(self, index: int, generator=None):
        """(image, label) of sample ``index``, its random transforms drawn from ``generator``."""
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x, generator)
        return x, int(self._labels[index])
