"""SCAttn: the spatial/channel re-weighting LocalMamba applies to every direction's output."""
from __future__ import annotations

import torch
import torch.nn as nn

SCATTN_MODES = ("channel", "full")


class SCAttn(nn.Module):
    """Channel (and optionally spatial) attention over one direction's tokens, in raster order.

    ``channel`` (default, what the released weights have): LN, mean over tokens, Linear(C -> C/8),
    GELU, Linear(C/8 -> C), sigmoid; the result multiplies the un-normalized input.
    ``full`` (the paper): also a per-token Linear(C -> C/8) + GELU, concatenated with the global
    vector, Linear(2C/8 -> 1), sigmoid; attention = channel * spatial.

    x: (..., L, C) -> (..., L, C). Leading dims are independent samples, so one call serves every
    direction of a layer stacked as (batch, K, L, C).
    """

    def __init__(self, dim: int, mode: str = "channel", ratio: float = 0.125):
        super().__init__()
        if mode not in SCATTN_MODES:
            raise ValueError(f"scattn: unknown mode {mode!r}; expected one of {', '.join(SCATTN_MODES)}")
        reduced = int(dim * ratio)
        if reduced < 1:
            raise ValueError(f"scattn: dim {dim} is too small for the reduction ratio {ratio}")
        self.mode = mode
        self.norm = nn.LayerNorm(dim)
        self.global_reduce = nn.Linear(dim, reduced)
        self.act = nn.GELU()
        self.channel_select = nn.Linear(reduced, dim)
        if mode == "full":
            self.local_reduce = nn.Linear(dim, reduced)
            self.spatial_select = nn.Linear(2 * reduced, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        global_ = self.act(self.global_reduce(normed.mean(-2, keepdim=True)))
        attn = torch.sigmoid(self.channel_select(global_))
        if self.mode == "full":
            local = self.act(self.local_reduce(normed))
            spatial = self.spatial_select(torch.cat([local, global_.expand_as(local)], dim=-1))
            attn = attn * torch.sigmoid(spatial)
        return x * attn
