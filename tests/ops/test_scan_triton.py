"""Triton kernels vs the reference, run on CPU under TRITON_INTERPRET=1 (make test does), tiny shapes.

Tolerances are fp32's (rtol 6e-4, atol 2e-3, as mamba_ssm uses); inputs are random, never zeros.
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
RTOL, ATOL = 6e-4, 2e-3


def make_inputs(batch, dim, L, N, groups=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    t = dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-torch.exp(0.5 * r(dim, N)),
             B=r(*bc), C=r(*bc), D=r(dim), z=r(batch, dim, L), delta_bias=0.3 * r(dim))
    return {k: v.to(DEVICE, dtype if k in ("u", "delta", "B", "C", "z") else torch.float32).requires_grad_()
            for k, v in t.items()}


def run(backend, x, opts, softplus, return_last=False):
    kw = {k: x[k] for k in ("D", "z", "delta_bias") if k in opts}
    return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus=softplus,
                          return_last_state=return_last, backend=backend, **kw)


def grads(out, x, seed=1):
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    names = list(x)
    return dict(zip(names, torch.autograd.grad(out, [x[n] for n in names], dy, allow_unused=True)))


def assert_close_grads(got, want):
    for name in want:
        if want[name] is None:
            assert got[name] is None or torch.count_nonzero(got[name]) == 0, name
            continue
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("opts,softplus", [((), False), (("D", "z", "delta_bias"), True), (("D",), False),
                                           (("z",), True), (("delta_bias",), True)])
@pytest.mark.parametrize("L", [1, 13, 20])
def test_single_scan_matches_reference(opts, softplus, L):
    x = make_inputs(2, 6, L, 4, seed=L)
    y_ref = run("ref", x, opts, softplus)
    y_tri = run("triton", x, opts, softplus)
    torch.testing.assert_close(y_tri, y_ref, rtol=RTOL, atol=ATOL)
    assert_close_grads(grads(y_tri, x), grads(y_ref, x))


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_scan_and_last_state(groups):
    x = make_inputs(2, 6, 11, 3, groups=groups, seed=groups)  # N = 3: not a power of two
    y_ref, h_ref = run("ref", x, ("D", "z", "delta_bias"), True, return_last=True)
    y_tri, h_tri = run("triton", x, ("D", "z", "delta_bias"), True, return_last=True)
    assert h_tri.dtype == torch.float32 and h_tri.shape == (2, 6, 3)
    torch.testing.assert_close(h_tri, h_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(y_tri, y_ref, rtol=RTOL, atol=ATOL)
    assert_close_grads(grads(y_tri, x), grads(y_ref, x))


def test_bf16_inputs_give_bf16_output():
    x = make_inputs(1, 4, 9, 4, dtype=torch.bfloat16)
    y_ref, y_tri = run("ref", x, ("D",), True), run("triton", x, ("D",), True)
    assert y_tri.dtype == torch.bfloat16
    torch.testing.assert_close(y_tri.float(), y_ref.float(), rtol=3e-2, atol=5e-2)


def multi_inputs(batch, K, dim, L, N, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(u=r(batch, K, dim, L), delta=0.5 * r(batch, K, dim, L), A=-torch.exp(0.5 * r(K, dim, N)),
             B=r(batch, K, N, L), C=r(batch, K, N, L), D=r(K, dim), z=r(batch, K, dim, L), delta_bias=0.3 * r(K, dim))
    return {k: v.to(DEVICE).requires_grad_() for k, v in t.items()}


def loop_over_permuted_copies(x, directions, H, W):
    """The LocalMamba way: one scan per direction on materialized permuted copies, then undo."""
    ys = []
    for k, d in enumerate(directions):
        scan = lambda t: apply_scan(t[:, k], d, H, W, "BCL")  # noqa: E731
        y = selective_scan(scan(x["u"]), scan(x["delta"]), x["A"][k], scan(x["B"]), scan(x["C"]), x["D"][k],
                           scan(x["z"]), x["delta_bias"][k], delta_softplus=True, backend="ref")
        ys.append(undo_scan(y, d, H, W, "BCL"))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("H,W,directions", [(3, 5, DIRECTIONS), (4, 4, ("h", "v_flip", "w2", "w7_flip")),
                                            (2, 3, ("w7", "w2_flip"))])
def test_multi_direction_matches_loop_over_permuted_copies(H, W, directions):
    K = len(directions)
    x = multi_inputs(2, K, 4, H * W, 4, seed=H * W)
    index = scan_orders(directions, H, W, DEVICE)
    y_loop = loop_over_permuted_copies(x, directions, H, W)
    y_tri = multi_direction_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                 True, index=index, backend="triton")
    torch.testing.assert_close(y_tri, y_loop, rtol=RTOL, atol=ATOL)
    assert_close_grads(grads(y_tri, x), grads(y_loop, x))


def test_multi_direction_torch_path_matches_triton_with_shared_input():
    H, W, directions = 3, 4, ("h", "w2_flip", "v")
    x = multi_inputs(1, 3, 4, H * W, 4, seed=7)
    shared = torch.randn(1, 1, 4, H * W, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    x["u"] = shared.expand(1, 3, 4, H * W)
    index = scan_orders(directions, H, W, DEVICE)
    outs = {}
    for backend in ("torch", "triton"):
        y = multi_direction_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                 True, index=index, backend=backend)
        outs[backend] = (y, torch.autograd.grad(y, [shared, x["A"], x["B"]], torch.ones_like(y)))
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=RTOL, atol=ATOL)
    for got, want in zip(outs["triton"][1], outs["torch"][1]):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
