"""Our transforms: shapes, dtype, normalization, geometry and seeded determinism."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from nas.data import IMAGENET_MEAN, IMAGENET_STD, build_transform
from nas.data.transforms import CenterCrop, RandomHorizontalFlip, RandomResizedCrop, RandomShift, ResizeShorter


def noise_image(w=40, h=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_dtype(train):
    x = build_transform(24, train)(noise_image())
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32


def test_normalization_of_a_flat_image():
    img = Image.new("RGB", (50, 40), (128, 64, 255))
    x = build_transform(16, train=False)(img)
    expected = [(v / 255 - m) / s for v, m, s in zip((128, 64, 255), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x, torch.tensor(expected).view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_train_transform_is_reproducible_under_a_seed():
    t, img = build_transform(20, train=True), noise_image()
    a = t(img, torch.Generator().manual_seed(3))
    assert torch.equal(a, t(img, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, t(img, torch.Generator().manual_seed(4)))
    torch.manual_seed(5)
    b = t(img)
    torch.manual_seed(5)
    assert torch.equal(b, t(img))  # no generator: torch's global RNG


def test_eval_transform_is_deterministic_and_center_crops():
    img = noise_image(64, 32)
    t = build_transform(28, train=False, crop_pct=0.875)  # shorter side -> 32: no resize, crop the middle
    x = t(img)
    assert torch.equal(x, t(img))
    direct = build_transform(28, train=False, crop_pct=1.0)(img.crop((18, 2, 46, 30)))
    assert torch.allclose(x, direct)


def test_random_resized_crop_respects_scale_and_ratio():
    crop = RandomResizedCrop(8, scale=(0.2, 0.5), ratio=(0.5, 2.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = crop.crop_box(100, 80, g)
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 80
        assert 0.2 * 8000 * 0.9 <= w * h <= 0.5 * 8000 * 1.1
        assert 0.5 / 1.1 <= w / h <= 2.0 * 1.1
    # impossible draws fall back to a center crop clamped to the ratio range
    left, top, w, h = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0)).crop_box(100, 50, g)
    assert (left, top, w, h) == (25, 0, 50, 50)


def test_resize_shorter_center_crop_and_flip():
    img = noise_image(40, 20)
    assert ResizeShorter(10)(img).size == (20, 10)
    assert ResizeShorter(10)(noise_image(20, 40)).size == (10, 20)
    assert CenterCrop(10)(noise_image(20, 12)).size == (10, 10)
    flipped = RandomHorizontalFlip(1.0)(img)
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    assert RandomHorizontalFlip(0.0)(img) is img
    x = torch.arange(6.0).view(1, 2, 3)
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))


def test_random_shift_moves_content_within_bounds():
    x = torch.zeros(1, 9, 9)
    x[0, 4, 4] = 1
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(100):
        y = RandomShift(2)(x, g)
        assert y.shape == x.shape and y.sum() == 1
        i, j = divmod(int(y.flatten().argmax()), 9)
        assert abs(i - 4) <= 2 and abs(j - 4) <= 2
        seen.add((i, j))
    assert len(seen) > 10


def test_eval_resize_size_follows_crop_pct():
    t = build_transform(224, train=False)
    assert t.transforms[0].size == math.floor(224 / 0.875) == 256
