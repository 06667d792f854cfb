"""The compiled CPU kernel (backend "cpu") against the float64 recurrence and the reference: forward,
every gradient (the last state's too), gradcheck in float64, tails of channels that do not
fill a vector, split channel blocks, the same bits on any thread count, inf and NaN like the reference,
the portable (non-AVX-512) builds, and what happens without a compiler. (bf16 inputs and an ungrouped B
beside a grouped C: test_selective_scan.py, for both fast backends.)

Inputs are random in realistic ranges (from test_selective_scan), never zeros. fp32 tolerances are
mamba_ssm's (rtol 6e-4, atol 2e-3).
"""
import logging
import platform
import re

import pytest
import torch
from test_selective_scan import (ALL_OPTS, ATOL, FORWARD_CASES, NAMES, RTOL, assert_grads_close, grads, make_inputs,
                                 recurrence64, scan)

import nas.ops.scan_cpu as scan_cpu
from nas.ops import cpu_kernels
from nas.ops.selective_scan import resolve_backend, selective_scan

if not cpu_kernels.available():  # pragma: no cover - the CI machine has a compiler
    pytest.skip(f"no CPU kernel: {cpu_kernels.problem()}", allow_module_level=True)


# The forward cases of the torch backend, plus: 20 channels per group (a vector of 16 and a tail of 4),
# one batch element and one group (the channels split into blocks), the demo layer's grouped shape.
CASES = FORWARD_CASES + [
    (2, 40, 33, 5, 2, ALL_OPTS, True),
    (1, 64, 21, 4, None, ALL_OPTS, True),
    (3, 8 * 96, 16, 16, 8, ALL_OPTS, True),
]


@pytest.mark.parametrize("batch,dim,L,N,groups,opts,softplus", CASES)
def test_forward_matches_float64_recurrence(batch, dim, L, N, groups, opts, softplus):
    x64 = make_inputs(batch, dim, L, N, groups, dtype=torch.float64, softplus=softplus)
    y_want, h_want = recurrence64(x64, opts, softplus)
    y, h = scan(x64, opts, softplus, "cpu", return_last=True)
    assert y.dtype == h.dtype == torch.float64 and h.shape == (batch, dim, N)
    torch.testing.assert_close(y, y_want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_want, rtol=1e-10, atol=1e-10)
    x32 = make_inputs(batch, dim, L, N, groups, softplus=softplus)
    y, h = scan(x32, opts, softplus, "cpu", return_last=True)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.double(), h_want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("groups", [None, 1, 2, 4])
@pytest.mark.parametrize("dim,L,opts,softplus,return_last", [
    (8, 1, ALL_OPTS, True, True),
    (8, 37, ALL_OPTS, True, True),
    (8, 37, (), False, False),
    (40, 130, ("z", "delta_bias"), True, False),
    (64, 19, ("D",), True, True),
])
def test_grads_match_ref(groups, dim, L, opts, softplus, return_last):
    x = make_inputs(2, dim, L, 4, groups, seed=L, softplus=softplus)
    got = grads(scan(x, opts, softplus, "cpu", return_last), x)
    want = grads(scan(x, opts, softplus, "ref", return_last), x)
    assert_grads_close(got, want, x)


@pytest.mark.parametrize("groups", [None, 2])
def test_grads_match_ref_at_the_state_size_compiled_in(groups):
    """N = 16 has its own compiled copy of the item loops (the state in registers)."""
    x = make_inputs(2, 40, 23, 16, groups, seed=9)
    got = grads(scan(x, ALL_OPTS, True, "cpu", True), x)
    assert_grads_close(got, grads(scan(x, ALL_OPTS, True, "ref", True), x), x)


@pytest.mark.parametrize("batch,dim,groups", [(2, 4, None), (2, 4, 2), (1, 20, None)])
@pytest.mark.parametrize("return_last", [False, True])
def test_gradcheck(batch, dim, groups, return_last):
    x = make_inputs(batch, dim, 7, 3, groups, seed=3, dtype=torch.float64)

    def f(*args):
        return selective_scan(*args, delta_softplus=True, return_last_state=return_last, backend="cpu")

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in NAMES))


def test_inputs_untouched_and_saved_tensors_reusable():
    x = make_inputs(2, 20, 9, 3, 2)
    before = {k: v.detach().clone() for k, v in x.items()}
    y = scan(x, ALL_OPTS, True, "cpu")
    (gu,) = torch.autograd.grad(y.sum(), [x["u"]], retain_graph=True)
    (gu_again,) = torch.autograd.grad(y.sum(), [x["u"]])
    torch.testing.assert_close(gu_again, gu, rtol=0, atol=0)
    for k, v in x.items():
        assert torch.equal(v.detach(), before[k]), f"{k} was modified in place"


@pytest.mark.parametrize("batch,dim,groups", [(1, 64, None), (2, 40, 2), (4, 96, 8)])
def test_same_bits_on_any_thread_count(batch, dim, groups):
    """Work items write only their own outputs: 1, 2 and 3 threads give identical results."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x = make_inputs(batch, dim, 23, 4, groups, seed=7)
            y, h = scan(x, ALL_OPTS, True, "cpu", return_last=True)
            results.append([y, h, *grads((y, h), x).values()])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_channel_blocks_cover_every_channel():
    """Below MIN_ITEMS (batch, group) items a group's channels are split into blocks of whole vectors."""
    assert scan_cpu._blocks(64, 8, 96, 16) == (1, 96)
    assert scan_cpu._blocks(1, 1, 64, 16) == (4, 16)
    assert scan_cpu._blocks(1, 1, 20, 16) == (2, 16)
    assert scan_cpu._blocks(2, 2, 384, 16) == (4, 96)
    for batch, G, dg in [(1, 1, 64), (1, 1, 20), (2, 2, 384), (1, 3, 5)]:
        nblocks, block = scan_cpu._blocks(batch, G, dg, 16)
        assert block % 16 == 0 and (nblocks - 1) * block < dg <= nblocks * block


def test_inf_and_nan_like_the_reference():
    """A NaN input spreads to the outputs it touches and nowhere else; huge decays give 0, not NaN."""
    x = make_inputs(2, 20, 11, 4, 2, dtype=torch.float64)
    x = {k: v.detach() for k, v in x.items()}
    x["A"][3] = -1e6  # exp(dt A) underflows to 0
    x["u"][1, 5, 4] = float("nan")
    x["delta"][0, 17, 2] = 80.0  # above the softplus threshold
    want = scan(x, ALL_OPTS, True, "ref")
    for dtype in (torch.float64, torch.float32):
        got = scan({k: v.to(dtype) for k, v in x.items()}, ALL_OPTS, True, "cpu")
        assert torch.equal(got.isnan(), want.isnan())
        assert got.isnan().any() and not got[0].isnan().any()
        ok = ~want.isnan()
        torch.testing.assert_close(got.double()[ok], want[ok], rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")], ids=["avx2", "sse"])
def test_portable_build_without_avx512(tmp_path, monkeypatch, flags):
    """The code every machine without AVX-512 runs (8-lane vectors, exp2 by exponent bits, scalar
    transposes), built here with AVX-512 (and AVX2) switched off."""
    lib = cpu_kernels.build(tmp_path, flags)
    assert lib.lanes_f32() == 8
    monkeypatch.setattr(cpu_kernels, "library", lambda: (lib, ""))
    x = make_inputs(3, 40, 37, 5, 2, seed=11)
    y_want, h_want = recurrence64(x, ALL_OPTS, True)
    y, h = scan(x, ALL_OPTS, True, "cpu", return_last=True)
    torch.testing.assert_close(y.double(), y_want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.double(), h_want, rtol=RTOL, atol=ATOL)
    got, want = grads((y, h), x), grads(scan(x, ALL_OPTS, True, "ref", return_last=True), x)
    assert_grads_close(got, want, x)


def test_build_is_cached_and_atomic(tmp_path):
    cpu_kernels.build(tmp_path)
    (so,) = tmp_path.glob("cpu_kernels-*.so")
    mtime = so.stat().st_mtime_ns
    cpu_kernels.build(tmp_path)
    beside = [so.with_suffix(".lock"), so.with_name(so.name + ".sha256")]  # the build lock, the size and hash
    assert so.stat().st_mtime_ns == mtime and sorted(tmp_path.iterdir()) == sorted([so, *beside])  # no temporary


@pytest.fixture
def no_kernel(monkeypatch, tmp_path):
    """A fresh process's view with the given CC: the cache folder empty, the kernel not loaded yet."""
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    cpu_kernels.library.cache_clear()
    cpu_kernels.note_fallback.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_kernels.library.cache_clear()
    cpu_kernels.note_fallback.cache_clear()


@pytest.mark.parametrize("cc,problem", [
    ("/nonexistent/cc", "no C compiler found ('/nonexistent/cc' is not on PATH; set CC)"),
    ("false", "false failed: exit status 1"),
])
def test_without_a_compiler_auto_falls_back_and_cpu_says_why(no_kernel, cc, problem, caplog):
    no_kernel.setenv("CC", cc)
    x = make_inputs(2, 4, 9, 3)
    with pytest.raises(ValueError, match=re.escape(f"backend: 'cpu' is not available here ({problem}); "
                                                   "use backend='torch'")):
        scan(x, (), True, "cpu")
    with caplog.at_level(logging.WARNING, logger="nas.ops.cpu_kernels"):
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        torch.testing.assert_close(scan(x, (), True, "auto"), scan(x, (), True, "ref"))
    notes = [r.getMessage() for r in caplog.records if r.name == "nas.ops.cpu_kernels"]
    assert notes == [f"no compiled CPU kernels ({problem}); using the slower PyTorch scan (backend 'torch') and conv"]


def test_auto_picks_the_kernel_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match=re.escape("backend: 'cpu' needs CPU tensors (got cuda)")):
        resolve_backend("cpu", torch.device("cuda"))
