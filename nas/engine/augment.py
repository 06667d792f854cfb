"""Batch-level regularizers of the retraining recipe: mixup, cutmix and label smoothing (soft targets),
and an exponential moving average of the weights."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class MixupCutmix:
    """Per batch, with probability ``prob``: cutmix (when ``switch_prob`` says so and cutmix > 0) or mixup,
    with lambda ~ Beta(a, a); the labels become the matching mixture of smoothed one-hot targets.
    Draws from torch's global RNG, which the run checkpoint saves."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0):
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, label_smoothing

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        if not self.active or torch.rand(()).item() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or torch.rand(()).item() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
        flipped = images.flip(0)
        if use_cutmix:
            H, W = images.shape[-2:]
            cut_h, cut_w = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
            cy, cx = torch.randint(H, ()).item(), torch.randint(W, ()).item()
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
        else:
            images = lam * images + (1 - lam) * flipped
        return images, lam * targets + (1 - lam) * targets.flip(0)


class ModelEma:
    """ema <- decay * ema + (1 - decay) * weights after every step; buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema, cur in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.mul_(self.decay).add_(cur.detach(), alpha=1 - self.decay)
            else:
                ema.copy_(cur)
