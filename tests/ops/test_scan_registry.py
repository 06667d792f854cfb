"""The scan-order registry: every order against a plain construction, on many grids; exact undo; errors."""
import pytest
import torch

from nas.errors import UserError
from nas.ops.directions import DIRECTIONS, scan_order
from nas.ops.scan_registry import (PROBE_GRIDS, ScanRegistry, get_scan, register_scan, registered_scans,
                                   registry_inverse_order, registry_scan_order)

# Square, non-square, 1 x N, N x 1, 1 x 1, odd, prime, and a few large ones.
GRIDS = [(H, W) for H in range(1, 13) for W in range(1, 13)] + [
    (14, 14), (56, 56), (7, 9), (9, 7), (13, 17), (1, 50), (50, 1), (3, 40), (16, 16), (28, 20)]
BASES = ("h", "v", "w2", "w7", "snake_h", "snake_v", "diag", "antidiag", "spiral", "hilbert", "w4", "w14",
         "w2_col", "w7_col")
NAMES = tuple(n for base in BASES for n in (base, base + "_flip"))
WINDOWS = {"w2": 2, "w7": 7, "w4": 4, "w14": 14, "w2_col": 2, "w7_col": 7}


def _base(name):
    return name[: -len("_flip")] if name.endswith("_flip") else name


def plain(name, H, W):
    """Nested loops written from the module docstring's words (hilbert has its own tests)."""
    base = _base(name)
    t = lambda i, j: i * W + j  # noqa: E731
    if base == "h":
        seq = [t(i, j) for i in range(H) for j in range(W)]
    elif base == "v":
        seq = [t(i, j) for j in range(W) for i in range(H)]
    elif base == "snake_h":
        seq = [t(i, j) for i in range(H) for j in (range(W) if i % 2 == 0 else reversed(range(W)))]
    elif base == "snake_v":
        seq = [t(i, j) for j in range(W) for i in (range(H) if j % 2 == 0 else reversed(range(H)))]
    elif base == "diag":
        seq = [t(i, c - i) for c in range(H + W - 1) for i in range(H) if 0 <= c - i < W]
    elif base == "antidiag":
        seq = [t(i, c + i) for c in range(W - 1, -H, -1) for i in range(H) if 0 <= c + i < W]
    elif base == "spiral":
        seq = spiral_walk(H, W)
    else:
        k, column_first = WINDOWS[base], base.endswith("_col")
        Hp, Wp = (H + k - 1) // k * k, (W + k - 1) // k * k
        seq = []
        for wi in range(0, Hp, k):
            for wj in range(0, Wp, k):
                cells = [(i, j) for i in range(wi, wi + k) for j in range(wj, wj + k)]
                if column_first:
                    cells.sort(key=lambda ij: (ij[1], ij[0]))
                seq += [t(i, j) if i < H and j < W else -1 for i, j in cells]
    return seq[::-1] if name.endswith("_flip") else seq


def spiral_walk(H, W):
    """Walk right from the top-left token, turning clockwise whenever the next cell is off the grid or seen."""
    seen, seq = set(), []
    i, j, (di, dj) = 0, 0, (0, 1)
    for _ in range(H * W):
        seen.add((i, j))
        seq.append(i * W + j)
        if not (0 <= i + di < H and 0 <= j + dj < W) or (i + di, j + dj) in seen:
            di, dj = dj, -di  # right -> down -> left -> up
        i, j = i + di, j + dj
    return seq


def classic_hilbert(N):
    """(row, column) cells of the classic Hilbert curve on an N x N grid, N = 2^n, from the top-left cell to the
    top-right one: four copies of the curve on a quarter, the top-left one transposed, the top-right one
    mirrored about its anti-diagonal."""
    if N == 1:
        return [(0, 0)]
    h, q = N // 2, classic_hilbert(N // 2)
    return ([(c, r) for r, c in q] + [(r + h, c) for r, c in q] + [(r + h, c + h) for r, c in q]
            + [(h - 1 - c, 2 * h - 1 - r) for r, c in q])


def test_registered_names_in_order():
    assert registered_scans() == NAMES
    assert registered_scans()[: len(DIRECTIONS)] == DIRECTIONS


@pytest.mark.parametrize("name", [n for n in NAMES if _base(n) != "hilbert"])
def test_matches_plain_construction(name):
    for H, W in GRIDS:
        order = registry_scan_order(name, H, W)
        assert order.dtype == torch.long and order.dim() == 1
        assert order.tolist() == plain(name, H, W), (H, W)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_old_eight_bit_identical_to_scan_order(direction):
    for H, W in GRIDS:
        assert torch.equal(registry_scan_order(direction, H, W), scan_order(direction, H, W)), (H, W)


@pytest.mark.parametrize("name", NAMES)
def test_each_token_once_pads_only_in_windows_and_exact_undo(name):
    base = _base(name)
    for H, W in GRIDS:
        order, inverse = registry_scan_order(name, H, W), registry_inverse_order(name, H, W)
        valid = order >= 0
        assert sorted(order[valid].tolist()) == list(range(H * W)), (H, W)
        if base in WINDOWS:
            k = WINDOWS[base]
            assert order.numel() == (H + k - 1) // k * k * ((W + k - 1) // k * k), (H, W)
        else:
            assert bool(valid.all()) and order.numel() == H * W, (H, W)
        assert torch.equal(order[inverse], torch.arange(H * W)), (H, W)
        # Gather (zeros at the pads), then undo by gathering through the inverse and by scattering back.
        x = torch.randn(2, H * W, 3)
        scanned = torch.cat([x, torch.zeros(2, 1, 3)], 1)[:, torch.where(valid, order, H * W)]
        assert torch.equal(scanned[:, inverse], x), (H, W)
        back = torch.zeros_like(x)
        back[:, order[valid]] = scanned[:, valid]
        assert torch.equal(back, x), (H, W)
        if name.endswith("_flip"):
            assert torch.equal(order, registry_scan_order(base, H, W).flip(0)), (H, W)


R = -1  # a pad step, in the hand-written lists below
HAND_3x4 = {  # the 3 x 4 grid:  0 1 2 3 / 4 5 6 7 / 8 9 10 11
    "snake_h": [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],
    "snake_v": [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3],
    "diag": [0, 1, 4, 2, 5, 8, 3, 6, 9, 7, 10, 11],
    "antidiag": [3, 2, 7, 1, 6, 11, 0, 5, 10, 4, 9, 8],
    "spiral": [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6],
    "hilbert": [0, 1, 5, 4, 8, 9, 10, 11, 7, 6, 2, 3],
    "w4": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, R, R, R, R],
    "w14": [0, 1, 2, 3] + [R] * 10 + [4, 5, 6, 7] + [R] * 10 + [8, 9, 10, 11] + [R] * 10 + [R] * 14 * 11,
    "w2_col": [0, 4, 1, 5, 2, 6, 3, 7, 8, R, 9, R, 10, R, 11, R],
    "w7_col": [0, 4, 8, R, R, R, R, 1, 5, 9, R, R, R, R, 2, 6, 10, R, R, R, R, 3, 7, 11, R, R, R, R] + [R] * 21,
}


@pytest.mark.parametrize("name", HAND_3x4)
def test_hand_checked_3x4(name):
    assert registry_scan_order(name, 3, 4).tolist() == HAND_3x4[name]
    assert registry_scan_order(name + "_flip", 3, 4).tolist() == HAND_3x4[name][::-1]


def test_hilbert_is_the_classic_curve_on_powers_of_two():
    for N in (1, 2, 4, 8, 16, 32, 64):
        assert registry_scan_order("hilbert", N, N).tolist() == [r * N + c for r, c in classic_hilbert(N)]


def test_hilbert_steps_between_neighbours():
    grids = GRIDS + [(H, W) for H in range(13, 33) for W in (2, 5, 13, 20, 31)]
    steps = neighbours = 0
    for H, W in grids:
        order = registry_scan_order("hilbert", H, W)
        di, dj = (order // W).diff().abs(), (order % W).diff().abs()
        far = (di + dj) != 1
        corner = W - 1 if W >= H else (H - 1) * W
        if max(H, W) % 2 == 1 and min(H, W) % 2 == 0:  # no path of neighbours joins the two corners
            if min(H, W) == 2:
                assert not bool(far.any()), (H, W)
            else:
                assert int(far.sum()) == 1 and int(di[far]) == 1 and int(dj[far]) == 1, (H, W)
                assert int(order[-1]) == corner, (H, W)
        else:
            assert not bool(far.any()) and int(order[-1]) == corner, (H, W)
        assert int(order[0]) == 0
        steps, neighbours = steps + far.numel(), neighbours + int((~far).sum())
    assert neighbours / steps > 0.998


def test_tables_are_cached():
    assert registry_scan_order("spiral", 5, 6) is registry_scan_order("spiral", 5, 6, device="cpu")
    assert registry_inverse_order("w7_col", 5, 6) is registry_inverse_order("w7_col", 5, 6, torch.device("cpu"))


def one_line_error(call, *match):
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in match:
        assert part in message, message
    return message


@pytest.mark.parametrize("call", [lambda: get_scan("zigzag"), lambda: registry_scan_order("zigzag", 3, 4),
                                  lambda: registry_inverse_order(3, 3, 4)])
def test_unknown_name_lists_the_registered_ones(call):
    message = one_line_error(call, "name: unknown scan order")
    assert message.endswith("expected one of " + ", ".join(NAMES))


@pytest.mark.parametrize("H,W,bad", [(0, 4, "H: grid size must be a positive int, got 0"),
                                     (3, 2.5, "W: grid size must be a positive int, got 2.5"),
                                     (True, 4, "H: grid size must be a positive int, got True")])
def test_bad_grid(H, W, bad):
    one_line_error(lambda: registry_scan_order("hilbert", H, W), bad)


def test_register_derives_the_flip():
    registry = ScanRegistry()
    registry.register("rev", lambda H, W: torch.arange(H * W).flip(0))
    assert registry.names() == ("rev", "rev_flip")
    assert registry.order("rev_flip", 4, 5).tolist() == list(range(20))
    assert registry.order("rev", 4, 5).tolist() == list(range(20))[::-1]


def test_register_name_errors():
    registry = ScanRegistry()
    registry.register("rev", lambda H, W: torch.arange(H * W).flip(0))
    one_line_error(lambda: registry.register("rev", lambda H, W: torch.arange(H * W)),
                   "name: scan order 'rev' is already registered")
    one_line_error(lambda: register_scan("h", lambda H, W: torch.arange(H * W)), "'h' is already registered")
    one_line_error(lambda: registry.register("zig_flip", lambda H, W: torch.arange(H * W)),
                   "name: 'zig_flip' ends in '_flip'; register the base order 'zig'")
    for bad in ("Snake", "", "a-b", "1x", None):
        one_line_error(lambda: registry.register(bad, lambda H, W: torch.arange(H * W)), f"got {bad!r}")
    one_line_error(lambda: registry.register("zig", [0, 1]), "fn: expected a function fn(H, W)", "got list")
    assert registry.names() == ("rev", "rev_flip")


def _drop_last(H, W):
    return torch.arange(H * W)[:-1] if H * W > 1 else torch.full((1,), -1)


@pytest.mark.parametrize("fn,bad", [
    (lambda H, W: list(range(H * W)), "expected a 1-D torch.long tensor, got list"),
    (lambda H, W: torch.arange(H * W, dtype=torch.int32), "expected dtype torch.int64, got torch.int32"),
    (lambda H, W: torch.arange(H * W).view(H, W), "expected a 1-D tensor, got shape (1, 1)"),
    (lambda H, W: torch.cat([torch.arange(H * W), torch.tensor([-2])]),
     "step 1 holds -2; expected a raster index in 0..0 or -1"),
    (lambda H, W: torch.arange(1, H * W + 1), "step 0 holds 1; expected a raster index in 0..0 or -1"),
    (lambda H, W: torch.zeros(H * W + 1, dtype=torch.long),
     "token 0 (row 0, column 0) is visited 2 times; expected each of the 1 tokens exactly once"),
    (_drop_last, "token 0 (row 0, column 0) is visited 0 times"),
])
def test_register_checks_the_order_on_probe_grids(fn, bad):
    registry = ScanRegistry()
    assert PROBE_GRIDS[0] == (1, 1)  # the messages above are those of the first probe grid
    one_line_error(lambda: registry.register("bad", fn), "scan order 'bad' on a 1 x 1 grid: " + bad)
    assert registry.names() == ()


def test_order_checked_on_first_build_for_each_grid():
    def wrong_on_20_rows(H, W):
        order = torch.arange(H * W)
        if H == 20:
            order[3] = 4
        return order
    registry = ScanRegistry()
    registry.register("odd", wrong_on_20_rows)
    assert registry.order("odd", 19, 3).tolist() == list(range(57))
    bad = "scan order 'odd' on a 20 x 3 grid: token 3 (row 1, column 0) is visited 0 times"
    one_line_error(lambda: registry.order("odd", 20, 3), bad)
    one_line_error(lambda: registry.order("odd_flip", 20, 3), bad)
    one_line_error(lambda: registry.inverse("odd", 20, 3), bad)


def test_table_is_a_copy_of_what_fn_returned():
    kept = {}

    def remembered(H, W):
        kept[(H, W)] = torch.arange(H * W)
        return kept[(H, W)]
    registry = ScanRegistry()
    registry.register("kept", remembered)
    table = registry.order("kept", 9, 9)
    kept[(9, 9)].zero_()
    assert table.tolist() == list(range(81))
