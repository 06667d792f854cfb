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
    with pytest.raises(ValueError, match="name: unknown scan order 'zigzag'; expected one of h, h_flip, "):
        scan_order("zigzag", 4, 4)
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


H_W7, HF_W7F = ("h", "w7"), ("h_flip", "w7_flip")


@pytest.mark.parametrize("H,W,groups,without_leading_pads", [
    (7, 7, [H_W7, HF_W7F], None),                      # one 7 x 7 window is the raster order
    (14, 7, [H_W7, HF_W7F], None),                     # 7 wide: windows stacked top to bottom
    (7, 14, [], None),                                 # 7 high, 14 wide: two windows side by side
    (14, 14, [], None),
    (56, 56, [], None),
    (5, 7, [H_W7], [H_W7, HF_W7F]),                    # w7 pads 2 rows at the end; w7_flip starts with them
    (2, 2, [("h", "w2"), ("h_flip", "w2_flip")], None),
    (6, 2, [("h", "w2"), ("h_flip", "w2_flip")], None),
    (3, 2, [("h", "w2")], [("h", "w2"), ("h_flip", "w2_flip")]),
    (1, 1, [("h", "h_flip", "v", "v_flip", "w2", "w7")], [DIRECTIONS]),  # one token, padded at the end
    (1, 5, [("h", "v", "w7"), ("h_flip", "v_flip")], [("h", "v", "w7"), ("h_flip", "v_flip", "w7_flip")]),
    (5, 1, [("h", "v"), ("h_flip", "v_flip")], None),  # w2, w7 pad between the tokens
    (4, 4, [], None),                                  # w7 visits the 16 tokens in raster order, pads between rows
    (5, 9, [], None),
])
def test_coinciding_directions(H, W, groups, without_leading_pads):
    assert [tuple(g) for g in coinciding_directions(H, W)] == groups
    assert [tuple(g) for g in coinciding_directions(H, W, ignore_leading_pads=True)] == (without_leading_pads or groups)


def trimmed(sequence, leading):
    """A scan sequence without its trailing pad steps (and its leading ones when asked)."""
    real = [i for i, r in enumerate(sequence) if r >= 0]
    return sequence[real[0] if leading else 0: real[-1] + 1]


@pytest.mark.parametrize("H", range(1, 16))
@pytest.mark.parametrize("W", [1, 2, 3, 7, 8, 14])
@pytest.mark.parametrize("leading", [False, True])
def test_coinciding_directions_match_the_loop_orders(H, W, leading):
    """Every grid: two directions are grouped exactly when their loop-built sequences are equal, interior pads
    included, trailing pads (and leading ones when ignored) left out."""
    sequences = {d: trimmed(expected_order(d, H, W), leading) for d in DIRECTIONS}
    found = {d: g for g in coinciding_directions(H, W, ignore_leading_pads=leading) for d in g}
    for a in DIRECTIONS:
        for b in DIRECTIONS:
            same = a == b or b in found.get(a, ())
            assert same == (sequences[a] == sequences[b]), (a, b)


@pytest.mark.parametrize("H,W", [(7, 7), (5, 7), (4, 4), (5, 3), (1, 1)])
@pytest.mark.parametrize("pair", [H_W7, HF_W7F])
def test_grouped_scans_give_the_same_output_when_pads_are_zero_inputs(H, W, pair):
    """w7 visits the real tokens of a grid at most 7 wide as h does (w7_flip as h_flip); the selective scan over
    zero-padded inputs (SS2D's case) gives the same output exactly when they are grouped with leading pads
    ignored: pads between tokens decay the state, pads before the first or after the last do not matter."""
    assert [r for r in scan_order(pair[1], H, W).tolist() if r >= 0] == scan_order(pair[0], H, W).tolist()
    torch.manual_seed(0)
    D, N, L = 3, 4, H * W
    u, delta = torch.randn(1, L, D), torch.randn(1, L, D)
    B, C = torch.randn(1, L, N), torch.randn(1, L, N)
    A, delta_bias = -torch.rand(D, N) - 0.5, torch.rand(D)
    outputs = []
    for name in pair:
        seq = [apply_scan(t, name, H, W).transpose(1, 2) for t in (u, delta, B, C)]
        y = selective_scan(*seq[:2], A, *seq[2:], delta_bias=delta_bias, delta_softplus=True, backend="ref")
        outputs.append(undo_scan(y.transpose(1, 2), name, H, W))
    grouped = any(set(pair) <= set(g) for g in coinciding_directions(H, W, ignore_leading_pads=True))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6) == grouped
