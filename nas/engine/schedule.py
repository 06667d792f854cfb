"""Learning-rate schedule: linear warm-up, then cosine decay to a floor, evaluated per optimizer step.

The schedule is a pure function of the step count, so a resumed run only needs the step it reached.
"""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, warmup_lr: float = 1e-6,
          min_lr: float = 1e-6) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer, step: int, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float) -> float:
    """Set every param group's lr from its ``base_lr``; returns the first group's lr (for logging)."""
    lrs = []
    for group in optimizer.param_groups:
        scale = group["base_lr"]
        lr = lr_at(step, total_steps, scale, warmup_steps, min(warmup_lr, scale), min(min_lr, scale))
        group["lr"] = lr
        lrs.append(lr)
    return lrs[0]
