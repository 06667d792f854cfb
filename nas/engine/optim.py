"""The weights' optimizer: AdamW with the usual weight-decay exemptions, groups scheduled from ``base_lr``."""
from __future__ import annotations

import torch


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # norms, biases, A_log, D (1-D) and the position embeddings / class token are not decayed
    return p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or name.endswith(("pos_embed", "cls_token"))


def weight_groups(model: torch.nn.Module, lr: float, weight_decay: float, exclude=()) -> list[dict]:
    """Two AdamW groups ("weights", decayed, and "weights_no_decay") over the trainable parameters of
    ``model`` except those in ``exclude``; each group carries its ``base_lr`` for the schedule."""
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in skip:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "base_lr": lr, "name": "weights"},
            {"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "name": "weights_no_decay"}]


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW over the non-empty groups, each starting at its ``base_lr``."""
    groups = [dict(g, lr=g["base_lr"]) for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])
