"""Scan orders against an independent, loop-based construction; round trips; pads; errors."""
import pytest
import torch

from nas.ops import (DIRECTIONS, apply_scan, inverse_scan_order, scan_length, scan_order, scan_orders, selective_scan,
                     undo_scan)
from nas.ops.directions import coinciding_directions

GRIDS = [(14, 14), (7, 7), (8, 8), (4, 6), (5, 9), (1, 1), (3, 10), (13, 10), (56, 56)]


def expected_order(direction, H, W):
    """Plain nested loops, written from the design's words."""
    base, flip = direction.replace("_flip", ""), direction.endswith("_flip")
    seq = []
    if base == "h":
        seq = [i * W + j for i in range(H) for j in range(W)]
    elif base == "v":
        seq = [i * W + j for j in range(W) for i in range(H)]
    else:
        k = int(base[1:])
        Hp, Wp = (H + k - 1) // k * k, (W + k - 1) // k * k
        for wi in range(0, Hp, k):
            for wj in range(0, Wp, k):
                for i in range(wi, wi + k):
                    for j in range(wj, wj + k):
                        seq.append(i * W + j if i < H and j < W else -1)
    return seq[::-1] if flip else seq


@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_scan_order_matches_loops(direction, H, W):
    order = scan_order(direction, H, W)
    assert order.dtype == torch.long
    assert order.tolist() == expected_order(direction, H, W)
    assert scan_length(direction, H, W) == order.numel()
    valid = order[order >= 0]
    assert sorted(valid.tolist()) == list(range(H * W))  # every token exactly once


@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_round_trip_both_layouts(direction, H, W):
    g = torch.Generator().manual_seed(H * 100 + W)
    x = torch.randn(2, H * W, 5, generator=g)
    scanned = apply_scan(x, direction, H, W, "BLC")
    assert scanned.shape == (2, scan_length(direction, H, W), 5)
    assert torch.equal(undo_scan(scanned, direction, H, W, "BLC"), x)
    xt = x.transpose(1, 2).contiguous()
    scanned_t = apply_scan(xt, direction, H, W, "BCL")
    assert torch.equal(scanned_t, scanned.transpose(1, 2))
    assert torch.equal(undo_scan(scanned_t, direction, H, W, "BCL"), xt)


@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_inverse(direction, H, W):
    order, inverse = scan_order(direction, H, W), inverse_scan_order(direction, H, W)
    assert torch.equal(order[inverse], torch.arange(H * W))


def test_pad_tokens_are_zero_and_at_the_right_places():
    H, W = 5, 9  # w2 pads to 6 x 10, w7 to 7 x 14
    x = torch.randn(1, H * W, 3) + 10.0  # no token is near zero
    for direction in ("w2", "w2_flip", "w7", "w7_flip"):
        order = scan_order(direction, H, W)
        scanned = apply_scan(x, direction, H, W)
        pad = order < 0
        assert pad.sum() == scan_length(direction, H, W) - H * W
        assert torch.all(scanned[0, pad] == 0) and torch.all(scanned[0, ~pad].abs() > 1)


def test_flip_is_reversal_after_padding():
    H, W = 3, 10
    for base in ("h", "v", "w2", "w7"):
        assert torch.equal(scan_order(base + "_flip", H, W), scan_order(base, H, W).flip(0))
    # w2 on 3 x 10: the last window row is half padding, so the flipped sequence starts with pads
    assert scan_order("w2_flip", H, W)[0].item() == -1
    assert scan_order("w2", H, W)[0].item() == 0


def test_scan_order_is_cached_per_device():
    assert scan_order("w7", 14, 14) is scan_order("w7", 14, 14)
    assert scan_order("w7", 14, 14) is not scan_order("w7", 14, 13)


def test_scan_orders_table():
    table = scan_orders(["h", "w7_flip"], 5, 9)
    assert table.shape == (2, scan_length("w7", 5, 9))
    assert torch.equal(table[0, : 45], scan_order("h", 5, 9))
    assert torch.all(table[0, 45:] == -1)
    assert torch.equal(table[1], scan_order("w7_flip", 5, 9))


def test_bad_inputs():
    with pytest.raises(ValueError, match="direction: unknown scan direction 'diag'"):
        scan_order("diag", 4, 4)
    with pytest.raises(ValueError, match="W: grid size must be a positive int, got 0"):
        scan_order("h", 4, 0)
    with pytest.raises(ValueError, match=r"x: token axis has 15 tokens, expected H\*W = 4\*4 = 16"):
        apply_scan(torch.randn(1, 15, 2), "h", 4, 4)
    with pytest.raises(ValueError, match=r"y: scan axis has 16 tokens, expected scan_length\('w7', 4, 4\) = 49"):
        undo_scan(torch.randn(1, 16, 2), "w7", 4, 4)
    with pytest.raises(ValueError, match="layout: expected 'BLC' or 'BCL'"):
        apply_scan(torch.randn(1, 16, 2), "h", 4, 4, layout="LBC")
    with pytest.raises(ValueError, match="directions: expected at least one direction"):
        scan_orders([], 4, 4)


@pytest.mark.parametrize("H,W,groups", [
    (7, 7, [("h", "w7"), ("h_flip", "w7_flip")]),        # one 7 x 7 window is the raster order
    (14, 7, [("h", "w7"), ("h_flip", "w7_flip")]),       # 7 wide: windows stacked top to bottom
    (7, 14, []),                                         # 7 high, 14 wide: two windows side by side
    (14, 14, []),
    (56, 56, []),
    (2, 2, [("h", "w2"), ("h_flip", "w2_flip")]),
    (6, 2, [("h", "w2"), ("h_flip", "w2_flip")]),
    (3, 2, []),                                          # w2 pads a bottom row that h does not have
    (1, 1, [("h", "h_flip", "v", "v_flip")]),             # the window scans pad the one token
    (1, 5, [("h", "v"), ("h_flip", "v_flip")]),
    (5, 1, [("h", "v"), ("h_flip", "v_flip")]),
    (4, 4, []),                                          # w7 visits the 16 tokens in raster order, with pads
    (5, 9, []),
])
def test_coinciding_directions(H, W, groups):
    assert [tuple(g) for g in coinciding_directions(H, W)] == groups


@pytest.mark.parametrize("H", range(1, 16))
@pytest.mark.parametrize("W", [1, 2, 3, 7, 8, 14])
def test_coinciding_directions_match_the_loop_orders(H, W):
    """Every grid: two directions are grouped exactly when their loop-built sequences are equal, pads included."""
    sequences = {d: expected_order(d, H, W) for d in DIRECTIONS}
    found = {d: g for g in coinciding_directions(H, W) for d in g}
    for a in DIRECTIONS:
        for b in DIRECTIONS:
            same = a == b or b in found.get(a, ())
            assert same == (sequences[a] == sequences[b]), (a, b)


@pytest.mark.parametrize("H,W,coincide", [(7, 7, True), (4, 4, False), (5, 7, False)])
def test_pads_make_same_token_order_a_different_scan(H, W, coincide):
    """w7 and h visit the real tokens of a grid at most 7 wide in the same order; only without pads do the
    scans give the same output (pad steps decay the state), which is why pads count for coinciding."""
    assert [d for d in scan_order("w7", H, W).tolist() if d >= 0] == list(range(H * W))
    torch.manual_seed(0)
    D, N, L = 3, 4, H * W
    u, delta = torch.randn(1, L, D), torch.randn(1, L, D)
    B, C = torch.randn(1, L, N), torch.randn(1, L, N)
    A, delta_bias = -torch.rand(D, N) - 0.5, torch.rand(D)
    outputs = []
    for name in ("h", "w7"):
        seq = [apply_scan(t, name, H, W).transpose(1, 2) for t in (u, delta, B, C)]
        y = selective_scan(*seq[:2], A, *seq[2:], delta_bias=delta_bias, delta_softplus=True, backend="ref")
        outputs.append(undo_scan(y.transpose(1, 2), name, H, W))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6) == coincide
    assert (("h", "w7") in coinciding_directions(H, W)) == coincide
