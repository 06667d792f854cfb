"""The 8 candidate token-scan orders of the search space.

On an H x W token grid, token (i, j) has raster index ``i*W + j``. A *scan order* lists, for each
position of the scanned sequence, the raster index of the token found there, or -1 for a pad token.

- ``h``: raster order.  ``v``: column-major order.
- ``wK`` (K = 2, 7): the grid is padded at the bottom and right to multiples of K; the K x K windows
  are visited in row-major order and the tokens inside each window in row-major order. Pad tokens are
  part of the sequence (length Hp*Wp) and are dropped when the scan is undone.
- ``*_flip``: the base sequence reversed, after padding (not a spatial mirror).

These 8 are the search's candidates; their tables, like those of every other order, live in the
scan-order registry (``nas.ops.scan_registry``); ``nas.ops.scan_index`` reorders tokens through them.

The position of a name in ``DIRECTIONS`` is its alpha index; every list of directions the tool writes
is sorted in this order.
"""
from __future__ import annotations

import functools

import torch

from nas.ops.scan_registry import registry_inverse_order, registry_scan_order

DIRECTIONS = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")


def scan_length(direction: str, H: int, W: int) -> int:
    """Length of the scanned sequence: H*W, or Hp*Wp (padded to the window) for window scans."""
    return scan_order(direction, H, W).numel()


def scan_order(direction: str, H: int, W: int, device=None) -> torch.LongTensor:
    """Raster index of the token at each scan position (-1 for pad tokens). Shape (scan_length,).

    ``direction``: any registered order (``nas.ops.scan_registry``: the 8 above and more); the tables are
    checked when first built.
    Cached per (direction, H, W, device): treat the result as read-only.
    """
    return registry_scan_order(direction, H, W, device)


def inverse_scan_order(direction: str, H: int, W: int, device=None) -> torch.LongTensor:
    """Scan position of each raster token. Shape (H*W,). ``order[inverse[r]] == r`` for every r."""
    return registry_inverse_order(direction, H, W, device)


@functools.lru_cache(maxsize=None)
def coinciding_directions(H: int, W: int, ignore_leading_pads: bool = False,
                          candidates=DIRECTIONS) -> tuple[tuple[str, ...], ...]:
    """Groups of candidate directions (default LocalMamba's 8) that scan an H x W grid as the same sequence.

    Pad steps between real tokens always count: they decay the scan's state. Trailing pad steps never
    count: the scan (and LocalVim's conv1d) is causal, so no real token's output depends on them; this
    is why ``w7`` is ``h`` on a 5 x 7 grid. Leading pad steps count unless ``ignore_leading_pads``: in
    LocalVim the conv1d's bias turns the zero pads into non-zero scan inputs, while SS2D pads after its
    conv2d, so its pads reach the scan as zeros and leave the zero initial state unchanged (pass True).
    Orders that visit the real tokens alike with pads between them (``w7`` and ``h`` on a 4 x 4 grid)
    differ.

    Returns groups of two or more names (each in candidate order, groups ordered by their first
    member); () when all differ. On 7 x 7: (("h", "w7"), ("h_flip", "w7_flip")).
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in candidates:
        order = scan_order(name, H, W).tolist()
        start = next(i for i, r in enumerate(order) if r >= 0) if ignore_leading_pads else 0
        end = max(i for i, r in enumerate(order) if r >= 0) + 1
        groups.setdefault(tuple(order[start:end]), []).append(name)
    return tuple(tuple(names) for names in groups.values() if len(names) > 1)
