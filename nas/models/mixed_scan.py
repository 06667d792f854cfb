"""The set of scan directions of one layer: which ones, their alpha, and how their outputs merge.

Search form (``directions=None``): all 8 ``DIRECTIONS`` in order, alpha ``weights`` of shape
(8, 1, 1, 1) initialised to 1e-3 * randn, merge ``sum_k softmax(alpha)_k * LN_k(y_k)``. The LN_k are
LayerNorms without affine parameters, so they are one and the same function; we apply one ``norm``
to the stacked outputs. Derived form: the given directions, merged by a plain sum.

Also the index tables that gather raster tokens into every direction's scan order at once.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from nas.ops import DIRECTIONS, scan_orders


class MultiScan(nn.Module):
    """Directions, alpha and merge of one layer (key-compatible with LocalMamba's ``multi_scan``).

    attn: optional SCAttn stored here (LocalVMamba keeps it at ``op.multi_scan.attn``).
    ``active`` (search form, set by ``set_active_paths``): the slots the next forward runs, or None for
    all; the mixers skip the other directions' scans, and the merge renormalizes over the active ones.
    """

    def __init__(self, dim: int, directions=None, attn: nn.Module | None = None):
        super().__init__()
        self.search = directions is None
        self.directions = tuple(DIRECTIONS) if directions is None else tuple(directions)
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


def _trim_pads(table: torch.Tensor, leading: bool) -> torch.Tensor:
    """Drop the pad steps after every row's last token (and before its first, if ``leading``); rows
    stay left-aligned, the table as wide as its longest row."""
    valid = table >= 0
    steps = torch.arange(table.shape[1])
    last = torch.where(valid, steps, -1).amax(1)
    first = torch.where(valid, steps, table.shape[1]).amin(1) if leading else torch.zeros_like(last)
    out = torch.full((table.shape[0], int((last - first).max()) + 1), -1, dtype=torch.long)
    for k in range(table.shape[0]):
        out[k, : last[k] - first[k] + 1] = table[k, first[k]: last[k] + 1]
    return out


@functools.lru_cache(maxsize=512)
def scan_tables(directions: tuple, H: int, W: int, device: torch.device, cls_position: int | None = None,
                trim_leading: bool = False):
    """Index tables of several directions over a source sequence of tokens.

    The source is the H*W raster tokens, plus (when ``cls_position`` is given) a class token inserted
    at source index ``cls_position``; each scan then carries the class token at scan position
    ``cls_position`` too (LocalVim's middle-class-token variant).
    Pad steps after a scan's last token can never change an output, so they are dropped; pad steps
    before its first token are dropped too with ``trim_leading`` (exact when pads are zero inputs to
    the scan: the state stays zero until the first token). This matters for small grids, where a 7x7
    window scan is mostly padding and would set the length of every direction's scan.
    Returns (table (K, S) long: source index of scan step s of direction k, -1 = pad;
    inverse (K, L_src) long: scan step of each source token). Cached: treat as read-only.
    """
    table = scan_orders(directions, H, W)
    if cls_position is not None:
        shifted = torch.where(table >= cls_position, table + 1, table)
        cls_col = torch.full((len(directions), 1), cls_position, dtype=torch.long)
        table = torch.cat([shifted[:, :cls_position], cls_col, shifted[:, cls_position:]], dim=1)
    table = _trim_pads(table, trim_leading)
    n_src = H * W + (cls_position is not None)
    inverse = torch.empty(len(directions), n_src, dtype=torch.long)
    k, s = torch.nonzero(table >= 0, as_tuple=True)
    inverse[k, table[k, s]] = s
    return table.to(device), inverse.to(device)


def gather_scans(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(batch, L_src, C) source tokens -> (batch, K, S, C) in every direction's scan order, zeros at pads."""
    batch, n_src, C = x.shape
    padded = torch.cat([x, x.new_zeros(batch, 1, C)], dim=1)
    idx = torch.where(table < 0, n_src, table)
    return padded.index_select(1, idx.reshape(-1)).view(batch, *table.shape, C)


def undo_scans(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(batch, K, C, S) outputs in scan order -> (batch, K, C, L_src) in source order (pads dropped)."""
    # gather with an expanded index: take_along_dim would first wrap the whole broadcast index (remainder)
    return torch.gather(y, 3, inverse[None, :, None, :].expand(y.shape[0], -1, y.shape[2], -1))
