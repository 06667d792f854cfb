"""The scan index tables: gathering tokens into every direction's scan order and back is exact."""
import pytest
import torch

from nas.ops import DIRECTIONS, gather_scans, scan_order, scan_tables, take_steps
from nas.ops.scan_index import gather_steps, inverse_table

GRIDS = [(7, 7), (4, 4), (9, 7), (5, 3), (1, 6), (1, 9)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("trim_leading", [False, True])
def test_gather_then_undo_is_exact(grid, cls, trim_leading):
    H, W = grid
    n_src = H * W + cls
    c = (n_src - 1) // 2 if cls else None
    table, inverse = scan_tables(DIRECTIONS, H, W, torch.device("cpu"), c, trim_leading)
    assert bool((inverse >= 0).all())  # every source token is read by every scan
    torch.manual_seed(0)
    x = torch.randn(3, n_src, 5)
    scanned = gather_scans(x, table)  # (3, K, S, 5)
    assert scanned.shape == (3, len(DIRECTIONS), table.shape[1], 5)
    assert torch.equal(scanned[:, table < 0], torch.zeros_like(scanned[:, table < 0]))
    back = take_steps(scanned.transpose(2, 3), inverse).transpose(2, 3)
    assert torch.equal(back, x[:, None].expand_as(back))
    # token-major: the same undo along dim 2 of (batch, K, S, C), contiguous even from a transposed view
    channel_major = scanned.transpose(2, 3).contiguous()
    back_rows = take_steps(channel_major.transpose(2, 3), inverse, dim=-2)
    assert back_rows.is_contiguous() and torch.equal(back_rows, x[:, None].expand_as(back_rows))
    if cls and not trim_leading:  # every scan reads the class token at the same step (trimming shifts it)
        assert torch.equal(scanned[:, :, c], x[:, None, c].expand(3, len(DIRECTIONS), 5))


def test_take_steps_dim_must_be_a_step_axis():
    with pytest.raises(ValueError, match=r"dim: expected -1 or -2, got 1"):
        take_steps(torch.zeros(1, 1, 2, 3), torch.zeros(1, 3, dtype=torch.long), dim=1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("trim_leading", [False, True])
def test_tables_keep_each_order_between_its_first_and_last_token(grid, trim_leading):
    H, W = grid
    table, _ = scan_tables(DIRECTIONS, H, W, torch.device("cpu"), trim_leading=trim_leading)
    for k, name in enumerate(DIRECTIONS):
        order = scan_order(name, H, W)
        real = torch.nonzero(order >= 0).flatten()
        first, last = (int(real[0]) if trim_leading else 0), int(real[-1])
        row = table[k]
        assert torch.equal(row[: last - first + 1], order[first: last + 1])
        assert bool((row[last - first + 1:] == -1).all())


@pytest.mark.parametrize("expanded", [False, True])
def test_gather_steps_and_back_zero_the_unread_sources(expanded):
    H, W = 5, 7
    table, _ = scan_tables(DIRECTIONS, H, W, torch.device("cpu"))
    table = table.clone()
    table[table == 11] = -1  # no scan reads source 11
    torch.manual_seed(0)
    L = H * W
    x = torch.randn(2, 1, 3, L).expand(2, len(DIRECTIONS), 3, L) if expanded else torch.randn(2, len(DIRECTIONS), 3, L)
    scanned = gather_steps(x, table)  # (2, K, 3, S)
    pads = scanned.masked_select((table < 0)[None, :, None])
    assert pads.numel() > 0 and torch.equal(pads, torch.zeros_like(pads))
    inverse = inverse_table(table, L)
    assert bool((inverse[:, 11] == -1).all())
    back = gather_steps(scanned, inverse)
    want = x.clone()
    want[..., 11] = 0
    assert torch.equal(back, want)
