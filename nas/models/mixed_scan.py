"""The set of scan directions of one layer: which ones, their alpha, and how their outputs merge.

Search form (``directions=None``): the candidates in order (LocalMamba's 8 ``DIRECTIONS`` unless a search
space names others), alpha ``weights`` of shape (K, 1, 1, 1) initialised to 1e-3 * randn, merge ``sum_k softmax(alpha)_k * LN_k(y_k)``. The LN_k are
LayerNorms without affine parameters, so they are one and the same function; we apply one ``norm``
to the stacked outputs. Derived form: the given directions, merged by a plain sum.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nas.ops import DIRECTIONS


class MultiScan(nn.Module):
    """Directions, alpha and merge of one layer (key-compatible with LocalMamba's ``multi_scan``).

    attn: optional SCAttn stored here (LocalVMamba keeps it at ``op.multi_scan.attn``).
    ``active`` (search form, set by ``set_active_paths``): the slots the next forward runs, or None for
    all; the mixers skip the other directions' scans, and the merge renormalizes over the active ones.
    """

    def __init__(self, dim: int, directions=None, attn: nn.Module | None = None, candidates=DIRECTIONS):
        super().__init__()
        self.search = directions is None
        self.directions = tuple(candidates) if directions is None else tuple(directions)
        if self.search:
            self.weights = nn.Parameter(1e-3 * torch.randn(len(self.directions), 1, 1, 1))
            self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        if attn is not None:
            self.attn = attn
        self.active: tuple[int, ...] | None = None

    def slots(self) -> tuple[int, ...]:
        """The positions in ``directions`` that run: all of them, or the active ones."""
        return tuple(range(len(self.directions))) if self.active is None else self.active

    def path_weights(self) -> torch.Tensor:
        """softmax(alpha), shape (K,); the merge weight of each direction (search form only)."""
        return self.weights.view(-1).softmax(0)

    def merge(self, ys: torch.Tensor) -> torch.Tensor:
        """ys: (batch, K, L, C), the outputs of ``slots()`` in raster order -> (batch, L, C).

        With active paths the weights are p_i / sg(sum of the active p): a convex combination in value,
        while every alpha, inactive ones included, still gets a gradient through the softmax.
        """
        if not self.search:
            return ys.sum(1)
        w = self.path_weights()
        if self.active is not None:
            w = w[list(self.active)]
            w = w / w.sum().detach()
        return (self.norm(ys) * w.view(1, -1, 1, 1).to(ys.dtype)).sum(1)

    def extra_repr(self) -> str:
        return f"directions=[{', '.join(self.directions)}], search={self.search}"
