"""The built-in demo data: scikit-learn's bundled handwritten digits, real images that need no download.

1797 grayscale 8 x 8 images of the digits 0-9 (about 180 per class), upsampled bilinearly to
img_size x img_size and repeated to 3 channels. A fixed, class-balanced split (seed ``SPLIT_SEED``,
whatever the run's seed) holds out ``VAL_FRACTION`` of each class as the val set: 1437 train / 360 val.
Sample ids are ``digits:<index into sklearn's array>``, so demo subsets can be written to and read from
file lists like any other data. Train augmentation is a small random shift; digits are not flipped.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from nas.data.datasets import TensorImageDataset
from nas.data.errors import DataError
from nas.data.samples import SampleList
from nas.data.subsets import split_heldout
from nas.data.transforms import Compose, Normalize, RandomShift

PREFIX = "digits:"
VAL_FRACTION = 0.2
SPLIT_SEED = 0
CLASS_NAMES = [str(d) for d in range(10)]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, np.ndarray]:
    """(1797, 1, 8, 8) float32 images in [0, 1] and (1797,) int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the demo data needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return images, digits.target.astype(np.int64)


def digits_samples() -> SampleList:
    """All 1797 digits as a sample list."""
    _, labels = _digits()
    return SampleList([f"{PREFIX}{i}" for i in range(len(labels))], labels, list(CLASS_NAMES))


def demo_splits() -> tuple[SampleList, SampleList]:
    """The fixed (train, val) split of the digits."""
    return split_heldout(digits_samples(), VAL_FRACTION, seed=SPLIT_SEED, purpose="demo-val", where="the demo data")


def is_demo_samples(samples: SampleList) -> bool:
    return all(i.startswith(PREFIX) for i in samples.ids)


def demo_dataset(samples: SampleList, img_size: int, train: bool) -> TensorImageDataset:
    """Dataset of the digits named by ``samples``: items are ((3, img_size, img_size) float32, label)."""
    images, labels = _digits()
    try:
        index = torch.tensor([int(i[len(PREFIX):]) for i in samples.ids])
    except ValueError:
        raise DataError(f"bad demo sample id among {samples.ids[:3]}... (expected '{PREFIX}<int>')") from None
    if len(index) and (index.min() < 0 or index.max() >= len(labels)):
        raise DataError(f"demo sample ids must be {PREFIX}0 .. {PREFIX}{len(labels) - 1}")
    if not isinstance(img_size, int) or img_size < 8:
        raise DataError(f"img_size={img_size!r}: the demo digits need an int img_size >= 8")
    upsampled = torch.nn.functional.interpolate(images[index], size=(img_size, img_size), mode="bilinear",
                                                align_corners=False)
    steps = [RandomShift(max(1, img_size // 16))] if train else []
    return TensorImageDataset(samples, upsampled.contiguous(), Compose(steps + [Normalize()]))
