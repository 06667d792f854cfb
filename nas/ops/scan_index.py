"""Index tables that read a layer's tokens in several scan orders at once, and the gathers through them.

A table (K, S) holds, for scan step s of direction k, the source index of the token read there, or -1 for
a pad step, which reads a zero token. The source is the H*W raster tokens, optionally with a class token
inserted (LocalVim's middle-class-token variant). An inverse table (K, L_src) holds the scan step that
reads each source token (-1 where none does), so the same gathers undo a scan.

Two layouts: ``gather_scans`` reads tokens shared by all directions, token-major ((batch, L_src, C), as
LocalVim's in_proj output); ``gather_steps`` and ``take_steps`` read per-direction inputs, channel-major
((batch, K, C, L), as the multi-direction scan's). ``apply_scan`` / ``undo_scan`` are the one-direction
forms the per-direction loops use.
"""
from __future__ import annotations

import functools

import torch

from nas.errors import UserError
from nas.ops.directions import inverse_scan_order, scan_length, scan_order


def scan_orders(directions, H: int, W: int, device=None) -> torch.LongTensor:
    """Stacked scan orders of several directions: (K, S) with S the longest scan; shorter rows end in -1."""
    directions = list(directions)
    if not directions:
        raise UserError("directions: expected at least one direction, got an empty list")
    orders = [scan_order(d, H, W, device) for d in directions]
    S = max(o.numel() for o in orders)
    table = torch.full((len(orders), S), -1, dtype=torch.long, device=orders[0].device)
    for k, o in enumerate(orders):
        table[k, : o.numel()] = o
    return table


def insert_class_token(table: torch.Tensor, position: int) -> torch.Tensor:
    """(K, S) table over raster tokens -> (K, S + 1) table over raster tokens with a class token at source
    index ``position``: later sources shift by one, and every scan reads the class token at step ``position``."""
    shifted = torch.where(table >= position, table + 1, table)
    cls_col = torch.full((table.shape[0], 1), position, dtype=torch.long, device=table.device)
    return torch.cat([shifted[:, :position], cls_col, shifted[:, position:]], dim=1)


def trim_pads(table: torch.Tensor, leading: bool) -> torch.Tensor:
    """(K, S) -> (K, S'): the pad steps after every row's last token (and before its first, if ``leading``)
    dropped; rows stay left-aligned, the table as wide as its longest row. Read as Python lists: tables are
    built once per grid and direction list (``scan_tables``), never inside a traced forward."""
    rows = []
    for row in table.tolist():
        steps = [s for s, source in enumerate(row) if source >= 0]
        rows.append(row[steps[0] if leading else 0: steps[-1] + 1])
    width = max(len(row) for row in rows)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long, device=table.device)


def inverse_table(table: torch.Tensor, n_src: int) -> torch.Tensor:
    """(K, S) scan->source table -> (K, n_src) source->scan table, -1 for sources no step reads."""
    inverse = torch.full((table.shape[0], n_src), -1, dtype=torch.long, device=table.device)
    k, s = torch.nonzero(table >= 0, as_tuple=True)
    inverse[k, table[k, s]] = s
    return inverse


@torch.compiler.assume_constant_result  # torch.compile holds the tables as constants, not the code making them
def scan_tables(directions: tuple, H: int, W: int, device: torch.device, cls_position: int | None = None,
                trim_leading: bool = False):
    """Index tables of several directions over a source sequence of tokens.

    The source is the H*W raster tokens, plus (when ``cls_position`` is given) a class token inserted
    at source index ``cls_position``; each scan then carries the class token at scan position
    ``cls_position`` too, less the leading pads ``trim_leading`` drops (LocalVim's middle-class-token variant).
    Pad steps after a scan's last token can never change an output, so they are dropped; pad steps
    before its first token are dropped too with ``trim_leading`` (exact when pads are zero inputs to
    the scan: the state stays zero until the first token). This matters for small grids, where a 7x7
    window scan is mostly padding and would set the length of every direction's scan.
    Returns (table (K, S) long: source index of scan step s of direction k, -1 = pad;
    inverse (K, L_src) long: scan step of each source token, every one read). Cached: treat as read-only.
    """
    return _tables(tuple(directions), H, W, torch.device(device), cls_position, trim_leading)


@functools.lru_cache(maxsize=512)  # inside, not on, scan_tables: torch.compile traces through an lru_cache
def _tables(directions: tuple, H: int, W: int, device: torch.device, cls_position: int | None, trim_leading: bool):
    table = scan_orders(directions, H, W)
    if cls_position is not None:
        table = insert_class_token(table, cls_position)
    table = trim_pads(table, trim_leading)
    inverse = inverse_table(table, H * W + (cls_position is not None))
    return table.to(device), inverse.to(device)


def gather_scans(x: torch.Tensor, table: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The tokens of x along ``dim`` read through ``table``, zeros at its -1 steps.

    x: (..., L_src, ...) with L_src tokens at ``dim`` (>= 0); table: long, any shape, entries -1..L_src-1.
    Returns x.shape[:dim] + table.shape + x.shape[dim + 1:]: (batch, L_src, C) through a (K, S) table
    gives (batch, K, S, C).
    """
    n_src = x.shape[dim]
    padded = torch.cat([x, torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)
    index = torch.where(table < 0, n_src, table)
    return padded.index_select(dim, index.reshape(-1)).view(*x.shape[:dim], *table.shape, *x.shape[dim + 1:])


def take_steps(x: torch.Tensor, index: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """out[b, k, c, j] = x[b, k, c, index[k, j]]: x (batch, K, C, L), index (K, J) in 0..L-1 -> (batch, K, C, J);
    with dim=-2 the steps are x's dim 2 instead: x (batch, K, L, C) -> (batch, K, J, C).

    With the inverse of ``scan_tables`` it undoes a scan: (batch, K, C, S) in scan order -> (batch, K, C,
    L_src) in source order. A gather on an explicitly expanded index: about 2x faster than
    ``take_along_dim``, which first materializes the broadcast index with a remainder op, forward and backward.
    The output is contiguous whatever x's strides: dim=-2 on a transposed view gives token-major rows.
    """
    if dim not in (-1, -2):
        raise ValueError(f"dim: expected -1 or -2, got {dim}")
    shape = list(x.shape)
    shape[dim] = index.shape[-1]
    view = index[None, :, None, :] if dim == -1 else index[None, :, :, None]
    return torch.gather(x, dim, view.expand(*shape))


def gather_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``take_steps`` with -1 entries allowed: x (batch, K, C, L), index (K, J) in -1..L-1 -> (batch, K, C, J),
    zeros at -1. Through a table: source order -> scan order; through its ``inverse_table``: back."""
    batch, K, C, L = x.shape
    # an input expanded over the directions (u shared by all K) is padded once, not K times
    src = x[:, :1] if x.stride(1) == 0 else x
    padded = torch.cat([src, src.new_zeros(src.shape[:-1] + (1,))], dim=-1).expand(batch, K, C, L + 1)
    return take_steps(padded, torch.where(index < 0, L, index))


def _layout_dim(x: torch.Tensor, layout: str, name: str) -> int:
    if layout not in ("BLC", "BCL"):
        raise ValueError(f"layout: expected 'BLC' or 'BCL', got {layout!r}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected a token tensor of at least 2 dims, got shape {tuple(x.shape)}")
    return x.dim() - 2 if layout == "BLC" else x.dim() - 1


def apply_scan(x: torch.Tensor, direction: str, H: int, W: int, layout: str = "BLC") -> torch.Tensor:
    """Reorder raster tokens into a scan sequence, inserting zero tokens where the scan pads.

    x: (..., L, C) for layout "BLC" or (..., C, L) for "BCL", L = H*W.
    Returns the same layout with L replaced by ``scan_length(direction, H, W)``.
    """
    dim = _layout_dim(x, layout, "x")
    if x.shape[dim] != H * W:
        raise ValueError(f"x: token axis has {x.shape[dim]} tokens, expected H*W = {H}*{W} = {H * W} (shape {tuple(x.shape)}, layout {layout})")
    order = scan_order(direction, H, W, x.device)
    if scan_length(direction, H, W) > H * W:  # pads, known from the shape: no device-to-host read of the table
        return gather_scans(x, order, dim)
    return x.index_select(dim, order)


def undo_scan(y: torch.Tensor, direction: str, H: int, W: int, layout: str = "BLC") -> torch.Tensor:
    """Inverse of ``apply_scan``: raster tokens back from a scan sequence, pad tokens dropped.

    y: (..., S, C) for "BLC" or (..., C, S) for "BCL", S = scan_length(direction, H, W).
    Returns the same layout with S replaced by H*W.
    """
    dim = _layout_dim(y, layout, "y")
    S = scan_length(direction, H, W)
    if y.shape[dim] != S:
        raise ValueError(f"y: scan axis has {y.shape[dim]} tokens, expected scan_length({direction!r}, {H}, {W}) = {S} (shape {tuple(y.shape)}, layout {layout})")
    return y.index_select(dim, inverse_scan_order(direction, H, W, y.device))
