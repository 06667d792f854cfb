"""Triton kernels vs the float64 reference, run on CPU under TRITON_INTERPRET=1 (make test does), tiny shapes.

Every option, the last state and its gradient, 1, 3 and many channel tiles (and tiles of 2 x 16 channels, the
GPU layout), the multi-direction launch with pad steps on odd and non-square grids, fp32 and bf16, the output
and every gradient. Tolerances are fp32's (rtol 6e-4, atol 2e-3, as mamba_ssm uses) and bf16's (3e-2, 5e-2);
inputs are random, never zeros.
"""
import os

import pytest
import torch

from nas.ops import DIRECTIONS, apply_scan, multi_direction_scan, scan_orders, selective_scan, undo_scan

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (set before triton is imported) or CUDA"),
]
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}
ALL = ("D", "z", "delta_bias")


def make_inputs(batch, dim, L, N, groups=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    t = dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-torch.exp(0.5 * r(dim, N)),
             B=r(*bc), C=r(*bc), D=r(dim), z=r(batch, dim, L), delta_bias=0.3 * r(dim))
    return {k: v.to(DEVICE, dtype if k in ("u", "delta", "B", "C", "z") else torch.float32).requires_grad_()
            for k, v in t.items()}


def as_float64(x):
    return {k: v.detach().double().requires_grad_() for k, v in x.items()}


def scan(x, opts, softplus, backend="triton", config=None):
    """(y, last state) of one scan with the options in `opts`."""
    kw = {k: x[k] for k in ALL if k in opts}
    if backend == "triton" and config is not None:
        from nas.ops.scan_triton import selective_scan_triton
        return selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw, delta_softplus=softplus,
                                     return_last_state=True, config=config)
    return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=softplus,
                          return_last_state=True, backend=backend, **kw)


def grads(outs, x, seed=1):
    """Gradients of every input under random cotangents on every output (y and the last state)."""
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    names = list(x)
    return dict(zip(names, torch.autograd.grad(outs, [x[n] for n in names], cot, allow_unused=True)))


def assert_matches_float64(x, opts, softplus, config=None, dtype=torch.float32):
    """Output, last state and every gradient of the Triton scan against the float64 reference."""
    x64 = as_float64(x)
    got, want = scan(x, opts, softplus, config=config), scan(x64, opts, softplus, backend="ref")
    assert got[0].dtype == x["u"].dtype and got[1].dtype == torch.float32
    for a, b, name in zip(got, want, ("y", "last state")):
        torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=name)
    g_got, g_want = grads(got, x), grads(want, x64)
    for name in x:
        if name in ALL and name not in opts:
            assert g_got[name] is None, name
            continue
        torch.testing.assert_close(g_got[name].double(), g_want[name], **TOL[dtype], msg=name)


@pytest.mark.parametrize("opts,softplus,L,config", [
    (ALL, True, 13, (2, 4)),          # 3 channel tiles, a short last chunk
    ((), False, 9, (8, 4)),           # 1 tile, no options
    (("D",), False, 1, (1, 2)),       # 6 tiles of one channel, one step
    (("z",), True, 8, None),          # the interpreter's default config
    (("delta_bias",), True, 7, (4, 8)),
])
def test_single_scan_matches_float64_reference(opts, softplus, L, config):
    assert_matches_float64(make_inputs(2, 6, L, 4, seed=L), opts, softplus, config)


@pytest.mark.parametrize("config", [(1, 4), (32, 4)])  # one-channel tiles; the GPU tile (dB/dC by the butterfly)
def test_grouped_scan_with_odd_state_size(config):
    x = make_inputs(2, 6, 11, 3, groups=3, seed=3)  # N = 3: not a power of two
    assert_matches_float64(x, ALL, True, config)


def test_last_state_gradient_from_a_broadcast_cotangent():
    """last.sum() hands the backward a stride-0 cotangent; it must be read as the values it stands for."""
    x = make_inputs(1, 4, 5, 2, seed=5)
    x64 = as_float64(x)
    g_got, g_want = ({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(xx.items(), torch.autograd.grad(
        scan(xx, ALL, True, backend=be)[1].sum(), list(xx.values()), allow_unused=True))}
        for xx, be in ((x, "triton"), (x64, "ref")))  # y unused: C and z get no gradient
    for name in x:
        torch.testing.assert_close(g_got[name].double(), g_want[name].double(), **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("dim", [20, 40])  # one and two tiles of 2 x 16 channels (the GPU's tile)
def test_gpu_tile_shape(dim):
    assert_matches_float64(make_inputs(1, dim, 6, 2, seed=dim), ALL, True, (32, 4))


def test_bf16_inputs():
    assert_matches_float64(make_inputs(2, 4, 9, 4, seed=9, dtype=torch.bfloat16), ALL, True, (2, 4), torch.bfloat16)


def test_bf16_state_pairs_from_channel_fastest_b_and_c():
    """B and C as the models make them (states fastest in memory) are read as int32 pairs of bf16 states;
    2 channel tiles, so dB/dC are added atomically too."""
    from nas.ops.scan_triton import _bc_pairs

    x = make_inputs(2, 6, 9, 4, seed=11, dtype=torch.bfloat16)
    for k in ("B", "C"):
        x[k] = x[k].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (batch, L, N) memory
    assert _bc_pairs(x["B"].unsqueeze(1), x["C"].unsqueeze(1))
    assert_matches_float64(x, ALL, True, (4, 4), torch.bfloat16)


@pytest.mark.parametrize("dim", [20, 40])  # one tile (dB/dC stored) and two (added atomically)
def test_gpu_tile_at_d_state_16(dim):
    """The GPU's tile (2 x 16 channels, 16 states in each thread) at the models' d_state: dB and dC summed by
    the lane butterfly with every level a split one."""
    assert_matches_float64(make_inputs(1, dim, 7, 16, seed=dim + 1), ALL, True, (32, 4))


def test_registered_ops_pass_opcheck():
    """torch.library's checks of nas::selective_scan_triton (schema, autograd registration, fake tensors,
    AOTAutograd with dynamic shapes): what torch.compile and torch.export rely on. On a GPU it is a triton_op
    whose launches the trace holds; under the interpreter an opaque custom op."""
    from nas.ops.scan_triton import _scan_fwd

    x = make_inputs(1, 4, 5, 2, seed=13)
    grouped = {k: v.unsqueeze(1) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    args = tuple(grouped[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    torch.library.opcheck(_scan_fwd, args + (True, None, 5, 4, 4, True))


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces the Triton launch only on a GPU")
def test_compiles_as_one_graph_on_the_gpu():
    """fullgraph: the registered op's launches are in the graph (no break at the kernel); compiled forward and
    gradients as eager."""
    H, W, directions = 3, 5, ("h", "w7_flip", "v")
    x = {k: v.detach().float().requires_grad_() for k, v in multi_inputs(2, 3, 8, H * W, 4, seed=17).items()}
    index = scan_orders(directions, H, W, DEVICE)

    def run(*t):
        return multi_direction_scan(*t, True, index=index, backend="triton")

    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    outs = [f(*(x[k] for k in names)) for f in (run, torch.compile(run, fullgraph=True))]
    torch.testing.assert_close(outs[1], outs[0], **TOL[torch.float32])
    for got, want in zip(grads([outs[1]], x).values(), grads([outs[0]], x).values()):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def multi_inputs(batch, K, dim, L, N, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(u=r(batch, K, dim, L), delta=0.5 * r(batch, K, dim, L), A=-torch.exp(0.5 * r(K, dim, N)),
             B=r(batch, K, N, L), C=r(batch, K, N, L), D=r(K, dim), z=r(batch, K, dim, L), delta_bias=0.3 * r(K, dim))
    return {k: v.to(DEVICE).requires_grad_() for k, v in t.items()}


def loop_over_permuted_copies(x, directions, H, W):
    """The LocalMamba way: one reference scan per direction on materialized permuted copies, then undo."""
    ys = []
    for k, d in enumerate(directions):
        scan_ = lambda t: apply_scan(t[:, k], d, H, W, "BCL")  # noqa: E731
        y = selective_scan(scan_(x["u"]), scan_(x["delta"]), x["A"][k], scan_(x["B"]), scan_(x["C"]), x["D"][k],
                           scan_(x["z"]), x["delta_bias"][k], delta_softplus=True, backend="ref")
        ys.append(undo_scan(y, d, H, W, "BCL"))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("H,W,directions,config", [
    (3, 5, DIRECTIONS, (4, 8)),                               # window pads (to 4 x 6 and 7 x 7), 1 tile
    (4, 4, ("h", "v_flip", "w2", "w7_flip"), (2, 4)),          # square grid, w7 pads, 2 tiles
    (2, 3, ("w7", "w2_flip"), (1, 4)),                         # odd non-square grid, 4 tiles of one channel
])
def test_multi_direction_matches_loop_over_permuted_copies(H, W, directions, config):
    from nas.ops.scan_triton import multi_direction_scan_triton

    K = len(directions)
    x64 = multi_inputs(1, K, 4, H * W, 4, seed=H * W)
    x = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
    index = scan_orders(directions, H, W, DEVICE)
    y_loop = loop_over_permuted_copies(x64, directions, H, W)
    y_tri = multi_direction_scan_triton(*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                        True, index, config)
    torch.testing.assert_close(y_tri.double(), y_loop, **TOL[torch.float32])
    g_tri, g_loop = grads([y_tri], x), grads([y_loop], x64)
    for name in x:
        torch.testing.assert_close(g_tri[name].double(), g_loop[name], **TOL[torch.float32], msg=name)


def test_multi_direction_torch_path_matches_triton_with_shared_input():
    H, W, directions = 3, 4, ("h", "w2_flip", "v")
    x = {k: v.detach().float().requires_grad_() for k, v in multi_inputs(1, 3, 4, H * W, 4, seed=7).items()}
    shared = torch.randn(1, 1, 4, H * W, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    x["u"] = shared.expand(1, 3, 4, H * W)  # as LocalVMamba hands it in: one x for every direction
    index = scan_orders(directions, H, W, DEVICE)
    outs = {}
    for backend in ("torch", "triton"):
        y = multi_direction_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                 True, index=index, backend=backend)
        outs[backend] = (y, torch.autograd.grad(y, [shared, x["A"], x["B"]], torch.ones_like(y)))
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], **TOL[torch.float32])
    for got, want in zip(outs["triton"][1], outs["torch"][1]):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.skipif(DEVICE != "cuda", reason="needs two CUDA devices")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device_not_the_current_one():
    x = {k: v.detach().to("cuda:1").requires_grad_() for k, v in make_inputs(2, 6, 9, 4).items()}
    with torch.cuda.device(0):
        y, last = scan(x, ALL, True)
    want = scan({k: v.detach().cpu().double() for k, v in x.items()}, ALL, True, backend="ref")
    torch.testing.assert_close(y.cpu().double(), want[0], **TOL[torch.float32])
