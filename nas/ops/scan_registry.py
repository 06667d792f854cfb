"""A registry of token-scan orders by name: LocalMamba's 8 and more, each checked when first built.

On an H x W token grid, token (i, j) has raster index ``i*W + j``. A scan order is a 1-D ``torch.long``
tensor that lists, for each step of the scanned sequence, the raster index of the token there, or -1 for a
pad step; every token appears exactly once. ``register_scan("x", fn)`` also registers ``x_flip``: the base
sequence reversed, pads included (not a spatial mirror), as in ``nas.ops.directions``.

Built-in orders, in registration order (each base followed by its flip):

- ``h``, ``v``, ``w2``, ``w7``: LocalMamba's, the same tables as ``nas.ops.directions.scan_order``.
- ``snake_h``: rows top to bottom; even rows (0, 2, ...) left to right, odd rows right to left.
- ``snake_v``: columns left to right; even columns top to bottom, odd columns bottom to top.
- ``diag``: the lines i + j = c for c = 0 .. H+W-2 (starting at the top-left corner), each top end first
  (i increasing).
- ``antidiag``: ``diag`` mirrored left-right: the lines j - i = c for c = W-1 down to -(H-1) (starting at
  the top-right corner), each top end first (i increasing).
- ``spiral``: clockwise from the top-left token, inward: top row left to right, right column down, bottom
  row right to left, left column up, then the same on the grid inside that ring.
- ``hilbert``: a generalized Hilbert curve on any H x W grid (see ``_hilbert``).
- ``w4``, ``w14``: like ``w2``/``w7``: the grid padded at the bottom and right to multiples of K, the K x K
  windows row-major, the tokens row-major inside each window.
- ``w2_col``, ``w7_col``: padded like ``w2``/``w7``, windows row-major, tokens column-major inside each.

Only the window orders (and their flips) have pad steps; every other order has length H*W.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from nas.errors import UserError

ScanFn = Callable[[int, int], torch.Tensor]

FLIP = "_flip"
# Checked at registration: 1 x N, N x 1, odd, even, prime and non-square grids, all small (fast imports).
PROBE_GRIDS = ((1, 1), (1, 5), (5, 1), (2, 3), (3, 4), (4, 4), (7, 5), (6, 9))
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _check_grid(H, W) -> None:
    for arg, value in (("H", H), ("W", W)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{arg}: grid size must be a positive int, got {value!r}")


def _validated(name: str, order, H: int, W: int) -> torch.Tensor:
    """A CPU copy of ``order`` (what a scan function returned), or a one-line UserError saying what is wrong."""
    where = f"scan order {name!r} on a {H} x {W} grid"
    if not isinstance(order, torch.Tensor):
        raise UserError(f"{where}: expected a 1-D torch.long tensor, got {type(order).__name__}")
    if order.dtype != torch.long:
        raise UserError(f"{where}: expected dtype torch.int64, got {order.dtype}")
    if order.dim() != 1:
        raise UserError(f"{where}: expected a 1-D tensor, got shape {tuple(order.shape)}")
    # Owned and contiguous: the caller may change its tensor later; the cached table must not change.
    order = order.detach().cpu().clone(memory_format=torch.contiguous_format)
    bad = torch.nonzero((order < -1) | (order >= H * W))
    if bad.numel():
        step = int(bad[0])
        raise UserError(f"{where}: step {step} holds {int(order[step])}; expected a raster index in "
                        f"0..{H * W - 1} or -1 for a pad")
    counts = torch.bincount(order[order >= 0], minlength=H * W)
    wrong = torch.nonzero(counts != 1)
    if wrong.numel():
        token = int(wrong[0])
        raise UserError(f"{where}: token {token} (row {token // W}, column {token % W}) is visited "
                        f"{int(counts[token])} times; expected each of the {H * W} tokens exactly once")
    return order


class ScanRegistry:
    """Scan orders by name, in registration order, with their tables cached per (name, H, W, device).

    The module holds the one registry the tool uses (``register_scan`` and the functions below); a fresh
    ``ScanRegistry()`` is empty, for tests. Names are never removed, so cached tables never go stale.
    """

    def __init__(self) -> None:
        self._fns: dict[str, ScanFn] = {}
        self._tables: dict[tuple, torch.Tensor] = {}

    def register(self, name: str, fn: ScanFn) -> None:
        """Register ``fn(H, W) -> LongTensor (S,)`` (raster index per scan step, -1 for a pad) as ``name``,
        and its reversal as ``name + "_flip"``. fn is checked on PROBE_GRIDS now and on every other grid
        when that grid's table is first built."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserError(f"name: a scan order name is lower-case letters, digits and '_', starting with a "
                            f"letter; got {name!r}")
        if name.endswith(FLIP):
            raise UserError(f"name: {name!r} ends in {FLIP!r}; register the base order {name[:-len(FLIP)]!r}, "
                            f"its flip is derived")
        if name in self._fns:
            raise UserError(f"name: scan order {name!r} is already registered")
        if not callable(fn):
            raise UserError(f"fn: expected a function fn(H, W) -> torch.LongTensor, got {type(fn).__name__}")
        for H, W in PROBE_GRIDS:
            _validated(name, fn(H, W), H, W)
        self._fns[name] = fn
        # Built from the base's checked, cached table, so a flip costs one reversal per grid.
        self._fns[name + FLIP] = lambda H, W: self.order(name, H, W).flip(0)

    def get(self, name: str) -> ScanFn:
        """The scan function registered as ``name`` (unchecked output: use ``order`` for tables)."""
        if not isinstance(name, str) or name not in self._fns:
            raise UserError(f"name: unknown scan order {name!r}; expected one of {', '.join(self._fns)}")
        return self._fns[name]

    def names(self) -> tuple[str, ...]:
        """Registered names in registration order (each base directly followed by its flip)."""
        return tuple(self._fns)

    def order(self, name: str, H: int, W: int, device=None) -> torch.Tensor:
        """Checked table of ``name`` on an H x W grid: the raster index at each scan step, -1 for a pad.
        Shape (S,), dtype long; S = H*W plus the pad steps. Cached: treat it as read-only."""
        return self._table("order", name, H, W, device)

    def inverse(self, name: str, H: int, W: int, device=None) -> torch.Tensor:
        """Scan step of each raster token: shape (H*W,), ``order[inverse[r]] == r``. Cached: read-only."""
        return self._table("inverse", name, H, W, device)

    def _table(self, kind: str, name: str, H: int, W: int, device) -> torch.Tensor:
        fn = self.get(name)
        _check_grid(H, W)
        device = torch.device(device or "cpu")
        key = (kind, name, H, W, device)
        if key not in self._tables:
            if device.type != "cpu":
                table = self._table(kind, name, H, W, "cpu").to(device)
            elif kind == "order":
                table = _validated(name, fn(H, W), H, W)
            else:
                order = self._table("order", name, H, W, device)
                valid = order >= 0
                table = torch.empty(H * W, dtype=torch.long)
                table[order[valid]] = torch.nonzero(valid).squeeze(1)
            self._tables[key] = table
        return self._tables[key]


def _raster(H: int, W: int) -> torch.Tensor:
    return torch.arange(H * W).view(H, W)


def _h(H: int, W: int) -> torch.Tensor:
    return torch.arange(H * W)


def _v(H: int, W: int) -> torch.Tensor:
    return _raster(H, W).t().reshape(-1)


def _snake(grid: torch.Tensor) -> torch.Tensor:
    """Rows of ``grid`` (L, M) in turn, every second one reversed. Shape (L*M,)."""
    grid = grid.clone()
    grid[1::2] = grid[1::2].flip(1)
    return grid.reshape(-1)


def _snake_h(H: int, W: int) -> torch.Tensor:
    return _snake(_raster(H, W))


def _snake_v(H: int, W: int) -> torch.Tensor:
    return _snake(_raster(H, W).t())


def _diag(H: int, W: int) -> torch.Tensor:
    i = torch.arange(H).view(H, 1).expand(H, W)
    j = torch.arange(W).view(1, W).expand(H, W)
    # Unique keys: line c = i + j first, then i inside the line.
    return torch.argsort(((i + j) * H + i).reshape(-1))


def _antidiag(H: int, W: int) -> torch.Tensor:
    # Mirroring j -> W-1-j maps diag's lines i + j = c onto j - i = W-1-c and keeps i increasing inside each.
    return _raster(H, W).flip(1).reshape(-1)[_diag(H, W)]


def _spiral(H: int, W: int) -> torch.Tensor:
    grid = _raster(H, W)
    rings = []
    while grid.numel():
        rings.append(grid[0])  # top row, left to right
        # Rotating the rest counter-clockwise puts the right column, read downward, on top.
        grid = grid[1:].rot90(1)
    return torch.cat(rings)


def _hilbert(H: int, W: int) -> torch.Tensor:
    """Generalized Hilbert curve ("gilbert" construction) on any H x W grid.

    A rectangle is walked from a corner to the adjacent corner along its side a; at the top level a is the
    longer side: the first row when W >= H (the curve starts at the top-left token and, but for the case
    below, ends at the top-right one), else the first column. A long, thin rectangle (2|a| > 3|b|) is cut
    across a into two parts walked one after the other along a. Any other is cut into three: the near part
    of b across the first half of a, walked along b; the far part of b across all of a, walked along a; the
    near part of b across the rest of a, walked back along -b; each part starts next to where the previous
    one ended. A cut that would leave an odd length is moved one cell on (on sides longer than 2), which
    keeps the steps across every cut between grid neighbours.

    Chosen over a padded 2^n x 2^n curve with the pads removed, which jumps wherever it crosses a removed
    stretch (3 of the 62 steps on 7 x 9, 9 of 119 on 3 x 40). Here every step joins grid neighbours and the
    curve ends at that adjacent corner, unless the side walked along is odd and the other even: then no
    path of neighbours joins the two corners (colour the grid as a checkerboard), and the curve has one
    diagonal step, or, on 2 x N and N x 2, none but ends elsewhere. On 2^n x 2^n grids it is the classic
    Hilbert curve.
    """
    cells: list[tuple[int, int]] = []
    if W >= H:
        _gilbert(cells, (0, 0), (0, W), (H, 0))
    else:
        _gilbert(cells, (0, 0), (H, 0), (0, W))
    return torch.tensor([i * W + j for i, j in cells], dtype=torch.long)


def _gilbert(cells: list, start: tuple, a: tuple, b: tuple) -> None:
    """Append the cells (row, column) of the rectangle with corner ``start`` spanned by the axis-aligned
    vectors a (walked from start to the adjacent corner) and b, each a (rows, columns) tuple."""
    la, lb = abs(a[0] + a[1]), abs(b[0] + b[1])
    ua, ub = (a[0] // la, a[1] // la), (b[0] // lb, b[1] // lb)
    if la == 1 or lb == 1:  # one line of cells
        step, n = (ua, la) if lb == 1 else (ub, lb)
        cells.extend((start[0] + k * step[0], start[1] + k * step[1]) for k in range(n))
        return
    if 2 * la > 3 * lb:
        half = la // 2
        if half % 2 and la > 2:
            half += 1
        a1 = _mul(ua, half)
        _gilbert(cells, start, a1, b)
        _gilbert(cells, _add(start, a1), _add(a, _mul(a1, -1)), b)
    else:
        half = lb // 2
        if half % 2 and lb > 2:
            half += 1
        b1, a1 = _mul(ub, half), _mul(ua, la // 2)
        _gilbert(cells, start, b1, a1)
        _gilbert(cells, _add(start, b1), a, _add(b, _mul(b1, -1)))
        # The last piece starts at the far-a corner of the near part of b and walks it back along -b.
        corner = _add(_add(start, _mul(ua, la - 1)), _mul(ub, half - 1))
        _gilbert(cells, corner, _mul(b1, -1), _add(a1, _mul(a, -1)))


def _mul(v: tuple, n: int) -> tuple:
    return (v[0] * n, v[1] * n)


def _add(u: tuple, v: tuple) -> tuple:
    return (u[0] + v[0], u[1] + v[1])


def _windows(k: int, column_first: bool = False) -> ScanFn:
    def order(H: int, W: int) -> torch.Tensor:
        Hp, Wp = -(-H // k) * k, -(-W // k) * k
        padded = torch.full((Hp, Wp), -1, dtype=torch.long)
        padded[:H, :W] = _raster(H, W)
        # (Hp/k, k, Wp/k, k) -> (Hp/k, Wp/k, k, k): windows row-major; inside, rows then columns
        # (or columns then rows).
        inner = (3, 1) if column_first else (1, 3)
        return padded.view(Hp // k, k, Wp // k, k).permute(0, 2, *inner).reshape(-1)
    return order


SCANS = ScanRegistry()
register_scan = SCANS.register
get_scan = SCANS.get
registered_scans = SCANS.names
registry_scan_order = SCANS.order
registry_inverse_order = SCANS.inverse

for _name, _fn in (("h", _h), ("v", _v), ("w2", _windows(2)), ("w7", _windows(7)),
                   ("snake_h", _snake_h), ("snake_v", _snake_v), ("diag", _diag), ("antidiag", _antidiag),
                   ("spiral", _spiral), ("hilbert", _hilbert), ("w4", _windows(4)), ("w14", _windows(14)),
                   ("w2_col", _windows(2, column_first=True)), ("w7_col", _windows(7, column_first=True))):
    register_scan(_name, _fn)
