"""Image transforms, in our own code (no torchvision): PIL images in, (3, S, S) float tensors out.

Every random transform takes ``generator``: an explicit ``torch.Generator``, or None for torch's global
RNG. The training loaders give every sample its own generator, seeded by (run seed, epoch, position in the
epoch) (see ``nas.data.loader``), so seeded runs are reproducible whatever the number of workers.

Train (the DeiT / LocalMamba recipe): random resized crop -> horizontal flip -> tensor + ImageNet
normalization. Eval: resize the shorter side to ``img_size / crop_pct`` -> center crop -> tensor + norm.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _uniform(low: float, high: float, generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _resample(interpolation: str):
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    return INTERPOLATIONS[interpolation]


class Compose:
    """Apply transforms in order, handing each the same generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x, generator=None):
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self):
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform), resize to size.

    After 10 rejected draws it falls back to a center crop with the ratio clamped to ``ratio``.
    PIL image in, PIL image (size x size) out.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic"):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale: expected 0 < min <= max <= 1, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio: expected 0 < min <= max, got {tuple(ratio)}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        self._resample = _resample(interpolation)

    def crop_box(self, width: int, height: int, generator=None) -> tuple[int, int, int, int]:
        """(left, top, crop_width, crop_height) of the crop for a width x height image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                return left, top, w, h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, generator=None) -> Image.Image:
        left, top, w, h = self.crop_box(img.width, img.height, generator)
        return img.resize((self.size, self.size), self._resample, box=(left, top, left + w, top + h))

    def __repr__(self):
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio}, {self.interpolation})"


class RandomHorizontalFlip:
    """Mirror left-right with probability p. PIL image or (..., H, W) tensor."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"hflip: expected a probability in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, x, generator=None):
        if self.p == 0 or torch.rand((), generator=generator).item() >= self.p:
            return x
        if isinstance(x, Image.Image):
            return x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return x.flip(-1)

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeShorter:
    """Resize so the shorter side is ``size``, keeping the aspect ratio. PIL image in and out."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation
        self._resample = _resample(interpolation)

    def __call__(self, img: Image.Image, generator=None) -> Image.Image:
        w, h = img.size
        if w <= h:
            new = (self.size, max(1, int(round(h * self.size / w))))
        else:
            new = (max(1, int(round(w * self.size / h))), self.size)
        return img if new == (w, h) else img.resize(new, self._resample)

    def __repr__(self):
        return f"ResizeShorter({self.size}, {self.interpolation})"


class CenterCrop:
    """Crop the central size x size square (the image must be at least that large). PIL image in and out."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, generator=None) -> Image.Image:
        w, h = img.size
        left, top = int(round((w - self.size) / 2)), int(round((h - self.size) / 2))
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self):
        return f"CenterCrop({self.size})"


class Normalize:
    """(C, H, W) float tensor in [0, 1], C = 1 or 3 -> (3, H, W) float32 (x - mean) / std per channel."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def __repr__(self):
        return "Normalize(ImageNet mean/std)"


class ToNormalizedTensor(Normalize):
    """PIL RGB image (H, W) -> (3, H, W) float32 tensor, scaled to [0, 1] then (x - mean) / std."""

    def __call__(self, img: Image.Image, generator=None) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self):
        return "ToNormalizedTensor(ImageNet mean/std)"


class RandomShift:
    """Translate a (C, H, W) tensor by up to ``max_shift`` pixels each way, filling with ``fill``.

    The padded-random-crop augmentation of small-image training, for the demo digits.
    """

    def __init__(self, max_shift: int, fill: float = 0.0):
        self.max_shift, self.fill = max_shift, fill

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        if self.max_shift == 0:
            return x
        m = self.max_shift
        dy, dx = (torch.randint(-m, m + 1, (2,), generator=generator)).tolist()
        padded = torch.nn.functional.pad(x, (m, m, m, m), value=self.fill)
        H, W = x.shape[-2:]
        return padded[..., m - dy:m - dy + H, m - dx:m - dx + W]

    def __repr__(self):
        return f"RandomShift({self.max_shift})"


def build_transform(img_size: int, train: bool, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                    crop_pct: float = 0.875, interpolation: str = "bicubic") -> Compose:
    """The ImageNet train or eval transform: PIL RGB image -> (3, img_size, img_size) normalized float32."""
    if train:
        return Compose([RandomResizedCrop(img_size, scale, ratio, interpolation), RandomHorizontalFlip(hflip),
                        ToNormalizedTensor()])
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct: expected a value in (0, 1], got {crop_pct!r}")
    resize = int(math.floor(img_size / crop_pct))
    return Compose([ResizeShorter(resize, interpolation), CenterCrop(img_size), ToNormalizedTensor()])
