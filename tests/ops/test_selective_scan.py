"""The selective scan: the "ref" and "torch" backends against an independent float64 recurrence,
torch-backend gradients against the reference and gradcheck, bf16 inputs, and input validation.

Inputs are random in realistic ranges (A < 0, small positive or softplus-ed delta), never zeros.
fp32 tolerances are mamba_ssm's (rtol 6e-4, atol 2e-3).
"""
import re

import pytest
import torch

import nas.ops.scan_torch as scan_torch
from nas.ops import cpu_kernels
from nas.ops.selective_scan import selective_scan

RTOL, ATOL = 6e-4, 2e-3
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
ALL_OPTS = ("D", "z", "delta_bias")
# the fast backends on CPU (the compiled kernel's own cases are in test_scan_cpu.py)
FAST = ["torch"] + (["cpu"] if cpu_kernels.available() else [])


def make_inputs(batch, dim, L, N, groups=None, seed=0, dtype=torch.float32, softplus=True):
    """Random inputs; with softplus delta is raw (mean -1), without it small positive."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    if softplus:
        delta = 0.5 * r(batch, dim, L) - 1.0
    else:
        delta = 0.02 + 0.3 * torch.rand(batch, dim, L, generator=g, dtype=torch.float64)
    x = dict(u=r(batch, dim, L), delta=delta, A=-torch.exp(0.5 * r(dim, N)), B=r(*bc), C=r(*bc), D=r(dim),
             z=r(batch, dim, L), delta_bias=0.3 * r(dim))
    return {k: v.to(dtype).requires_grad_() for k, v in x.items()}


def scan(x, opts, softplus, backend, return_last=False):
    kw = {k: x[k] for k in opts}
    return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=softplus,
                          return_last_state=return_last, backend=backend, **kw)


def recurrence64(x, opts, softplus):
    """The S6 recurrence written out independently, in float64: returns y and the last state."""
    v = {k: t.detach().double() for k, t in x.items()}
    u, A, B, C = v["u"], v["A"], v["B"], v["C"]
    batch, dim, L = u.shape
    dt = v["delta"] + (v["delta_bias"][:, None] if "delta_bias" in opts else 0.0)
    if softplus:
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    group = torch.arange(dim) // (dim // B.shape[1])  # channel -> group
    B, C = B[:, group], C[:, group]  # (batch, dim, N, L)
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    y = torch.empty(batch, dim, L, dtype=torch.float64)
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        y[:, :, t] = (h * C[..., t]).sum(-1)
    if "D" in opts:
        y = y + v["D"][:, None] * u
    if "z" in opts:
        y = y * v["z"] * torch.sigmoid(v["z"])
    return y, h


@pytest.fixture(params=[None, 4], ids=["chunk_auto", "chunk4"])
def chunk(request, monkeypatch):
    """Run the torch backend with its automatic chunk length and with 4-step chunks."""
    monkeypatch.setattr(scan_torch, "CHUNK", request.param)
    return request.param


# (batch, dim, L, N, groups, options, softplus)
FORWARD_CASES = [
    (2, 4, 1, 3, None, (), False),
    (2, 4, 1, 3, 2, ALL_OPTS, True),
    (2, 6, 37, 5, None, ALL_OPTS, True),
    (1, 8, 37, 4, 4, ("D",), False),
    (2, 4, 37, 3, 1, ("z",), True),
    (2, 4, 37, 3, 2, ("delta_bias",), False),
    (2, 8, 130, 4, 2, ALL_OPTS, True),
    (1, 4, 130, 2, None, (), False),
]


@pytest.mark.parametrize("batch,dim,L,N,groups,opts,softplus", FORWARD_CASES)
def test_forward_matches_float64_recurrence(batch, dim, L, N, groups, opts, softplus, chunk):
    x64 = make_inputs(batch, dim, L, N, groups, dtype=torch.float64, softplus=softplus)
    y_want, h_want = recurrence64(x64, opts, softplus)
    for backend in ("ref", "torch"):
        y, h = scan(x64, opts, softplus, backend, return_last=True)
        assert y.dtype == h.dtype == torch.float64 and h.shape == (batch, dim, N)
        torch.testing.assert_close(y, y_want, rtol=1e-10, atol=1e-10, msg=f"{backend} y")
        torch.testing.assert_close(h, h_want, rtol=1e-10, atol=1e-10, msg=f"{backend} state")
    x32 = make_inputs(batch, dim, L, N, groups, softplus=softplus)
    y, h = scan(x32, opts, softplus, "torch", return_last=True)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.double(), h_want, rtol=RTOL, atol=ATOL)


def assert_grads_close(got, want, x, rtol=RTOL, atol=ATOL):
    """Every input's gradient: None where the reference has none, else x's dtype and shape and close."""
    for name in NAMES:
        if want[name] is None:
            assert got[name] is None, name
            continue
        assert got[name].dtype == x[name].dtype and got[name].shape == x[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def grads(outs, x, seed=1):
    """Gradients of a random linear function of the outputs w.r.t. every input (None if unused)."""
    g = torch.Generator().manual_seed(seed)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return dict(zip(NAMES, torch.autograd.grad(loss, [x[n] for n in NAMES], allow_unused=True)))


@pytest.mark.parametrize("groups", [None, 1, 2, 4])
@pytest.mark.parametrize("L,opts,softplus,return_last", [
    (1, ALL_OPTS, True, True),
    (37, ALL_OPTS, True, True),
    (37, (), False, False),
    (130, ("z", "delta_bias"), True, False),
])
def test_grads_match_ref(groups, L, opts, softplus, return_last, chunk):
    x = make_inputs(2, 8, L, 4, groups, seed=L, softplus=softplus)
    got = grads(scan(x, opts, softplus, "torch", return_last), x)
    want = grads(scan(x, opts, softplus, "ref", return_last), x)
    assert_grads_close(got, want, x)


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("return_last", [False, True])
def test_gradcheck_torch_backend(groups, return_last, monkeypatch):
    monkeypatch.setattr(scan_torch, "CHUNK", 3)  # 7 steps: chunks of 3, 3, 1
    x = make_inputs(2, 4, 7, 3, groups, seed=3, dtype=torch.float64)

    def f(*args):
        return selective_scan(*args, delta_softplus=True, return_last_state=return_last, backend="torch")

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in NAMES))


@pytest.mark.parametrize("backend", FAST)
def test_grads_ungrouped_B_with_single_group_C(backend):
    x = make_inputs(2, 4, 9, 3, groups=1, seed=5)
    x["B"] = x["B"].detach()[:, 0].requires_grad_()  # (batch, N, L) next to C (batch, 1, N, L)
    got, want = (grads(scan(x, ALL_OPTS, True, b), x) for b in (backend, "ref"))
    assert_grads_close(got, want, x)


@pytest.mark.parametrize("L", [1, 9])
def test_torch_backend_partial_grads_no_grad_retain_graph_and_inputs_untouched(L):
    x = make_inputs(2, 4, L, 3, 2)
    before = {k: v.detach().clone() for k, v in x.items()}
    y_want = scan(x, ALL_OPTS, True, "ref")
    with torch.no_grad():
        torch.testing.assert_close(scan(x, ALL_OPTS, True, "torch"), y_want)
    x2 = {k: v.detach().requires_grad_(k == "u") for k, v in x.items()}
    y = scan(x2, ALL_OPTS, True, "torch")
    (gu,) = torch.autograd.grad(y.sum(), [x2["u"]], retain_graph=True)
    torch.testing.assert_close(gu, torch.autograd.grad(y_want.sum(), [x["u"]])[0], rtol=RTOL, atol=ATOL)
    (gu_again,) = torch.autograd.grad(y.sum(), [x2["u"]])  # the saved tensors were left intact
    torch.testing.assert_close(gu_again, gu, rtol=0, atol=0)
    for k, v in x.items():
        assert torch.equal(v.detach(), before[k]), f"{k} was modified in place"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("groups", [None, 2])
def test_bf16_inputs(groups, chunk, backend):
    x = make_inputs(2, 8, 37, 4, groups)
    for k in ("u", "delta", "B", "C", "z"):
        x[k] = x[k].detach().to(torch.bfloat16).requires_grad_()
    y, h = scan(x, ALL_OPTS, True, backend, return_last=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, h_ref = scan(x, ALL_OPTS, True, "ref", return_last=True)
    assert y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(h, h_ref, rtol=3e-2, atol=5e-2)
    got, want = grads((y, h), x), grads((y_ref, h_ref), x)
    assert_grads_close(got, want, x, rtol=3e-2, atol=5e-2)


def _bad(**changes):
    """Valid inputs (batch 2, D 6, L 5, N 3, G 2) with some replaced."""
    r = torch.randn
    x = dict(u=r(2, 6, 5), delta=r(2, 6, 5), A=-r(6, 3).exp(), B=r(2, 2, 3, 5), C=r(2, 2, 3, 5), D=r(6),
             z=r(2, 6, 5), delta_bias=r(6))
    x.update(changes)
    return x


@pytest.mark.parametrize("changes,message", [
    (dict(u=torch.randn(2, 6)), "u: expected shape (batch, D, L), got (2, 6)"),
    (dict(u=torch.randn(2, 6, 0), delta=torch.randn(2, 6, 0), z=None), "u: sequence length L must be at least 1"),
    (dict(u=[1.0]), "u: expected a torch.Tensor, got list"),
    (dict(delta=torch.randn(2, 6, 4)), "delta: expected the shape of u (2, 6, 5), got (2, 6, 4)"),
    (dict(A=torch.randn(5, 3)), "A: expected shape (D, N) with D = 6, got (5, 3)"),
    (dict(A=torch.randn(6, 3, 1)), "A: expected shape (D, N) with D = 6, got (6, 3, 1)"),
    (dict(A=torch.randn(6, 3, dtype=torch.complex64)), "A: complex A is not supported"),
    (dict(B=torch.randn(2, 4, 5)),
     "B: expected shape (batch, N, L) = (2, 3, 5) or (batch, G, N, L), got (2, 4, 5)"),
    (dict(B=torch.randn(2, 2, 3, 4)), "B: expected shape (batch, N, L) = (2, 3, 5)"),
    (dict(B=torch.randn(3, 2, 3, 5)), "B: expected shape (batch, N, L) = (2, 3, 5)"),
    (dict(C=torch.randn(2, 3, 5)), "C: expected the same number of groups as B (2), got shape (2, 3, 5)"),
    (dict(C=torch.randn(2, 3, 3, 5)), "C: expected the same number of groups as B (2)"),
    (dict(B=torch.randn(2, 4, 3, 5), C=torch.randn(2, 4, 3, 5)),
     "B: D = 6 channels cannot be split into G = 4 groups (shape (2, 4, 3, 5)); G must divide D"),
    (dict(D=torch.randn(5)), "D: expected shape (6,), got (5,)"),
    (dict(D=torch.randn(6, 1)), "D: expected shape (6,), got (6, 1)"),
    (dict(delta_bias=torch.randn(2, 6)), "delta_bias: expected shape (6,), got (2, 6)"),
    (dict(z=torch.randn(2, 6, 4)), "z: expected shape (2, 6, 5), got (2, 6, 4)"),
    (dict(z=3.0), "z: expected shape (2, 6, 5), got float"),
])
def test_bad_inputs_name_the_argument(changes, message):
    x = _bad(**changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        selective_scan(**x, backend="torch")


def test_bad_backend(monkeypatch):
    x = _bad()
    with pytest.raises(ValueError, match=re.escape("backend: unknown backend 'cuda'; expected one of")):
        selective_scan(**x, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend: 'triton' needs (CUDA tensors \(got cpu\)|the triton package)"):
        selective_scan(**x, backend="triton")


# (batch, groups, tile rows): tiles of whole batch elements with a short last one (3 x 2 rows in tiles
# of 2 + 1 batch elements), runs of groups within a batch element with a short last one (groups 2 + 1),
# one row per tile, and an ungrouped B/C (batch 2 + 1, and one row per tile).
TILE_CASES = [(3, 2, 4), (2, 3, 2), (2, 4, 1), (3, None, 2), (3, None, 1)]


@pytest.mark.parametrize("batch,groups,rows", TILE_CASES)
def test_tiles_match_ref(batch, groups, rows, monkeypatch):
    """Forced small tiles (and 4-step chunks, so every tile runs several): y, the last state and every
    gradient against the reference, whose scan is untiled."""
    monkeypatch.setattr(scan_torch, "TILE_ROWS", rows)
    monkeypatch.setattr(scan_torch, "CHUNK", 4)
    G = groups or 1
    T, tiles, _ = scan_torch._plan(9, batch, G, 3, 12 // G)
    assert len(tiles) > 1 and T == 4
    x = make_inputs(batch, 12, 9, 3, groups, seed=batch + G + rows)
    outs = scan(x, ALL_OPTS, True, "torch", return_last=True)
    want_outs = scan(x, ALL_OPTS, True, "ref", return_last=True)
    for o, w, name in zip(outs, want_outs, ("y", "last state")):
        torch.testing.assert_close(o, w, rtol=RTOL, atol=ATOL, msg=name)
    got, want = grads(outs, x), grads(want_outs, x)
    assert_grads_close(got, want, x)


def test_tiles_gradcheck(monkeypatch):
    monkeypatch.setattr(scan_torch, "TILE_ROWS", 2)  # 2 x 3 rows: groups 0-1 and 2 of each batch element
    monkeypatch.setattr(scan_torch, "CHUNK", 3)
    x = make_inputs(2, 3, 5, 2, 3, seed=7, dtype=torch.float64)

    def f(*args):
        return selective_scan(*args, delta_softplus=True, return_last_state=True, backend="torch")

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in NAMES))


@pytest.mark.parametrize("L,batch,G,N,dg", [(196, 8, 8, 16, 256), (196, 2, 8, 16, 256), (196, 8, 1, 16, 256),
                                             (1024, 2, 1, 16, 384), (37, 3, 4, 16, 8192), (5, 1, 2, 2, 2)])
def test_plan_tiles_cover_every_row_once(L, batch, G, N, dg):
    """The default CPU tiling: every (batch, group) row in exactly one tile, each tile at most the larger
    of one row and TILE_ELEMS state values per thread (so a big batch x groups state is split), each in
    one contiguous block of every input per time step (whole batch elements, or groups of one)."""
    most = scan_torch.TILE_ELEMS * torch.get_num_threads()
    T, tiles, max_rows = scan_torch._plan(L, batch, G, N, dg)
    assert 1 <= T <= L
    seen = torch.zeros(batch, G, dtype=torch.long)
    for bs, gs in tiles:
        seen[bs, gs] += 1
        rows = (bs.stop - bs.start) * (gs.stop - gs.start)
        assert rows <= max_rows and rows * N * dg <= max(N * dg, most)
        assert bs.stop - bs.start == 1 or (gs.start, gs.stop) == (0, G)
    assert torch.all(seen == 1)
    assert (len(tiles) > 1) == (batch * G * N * dg > most)
    assert len(scan_torch._plan(L, batch, G, N, dg, torch.device("meta"))[1]) == 1  # not on a GPU
