"""The compiled causal depthwise conv1d + SiLU against PyTorch's conv (the reference): forward and every
gradient on random inputs, rows shorter than the kernel and not a multiple of a vector, no bias, a strided
input, gradcheck in float64, the same bits on any thread count, and the fallback where there is no kernel.
fp32 tolerances: rtol 1e-5, atol 1e-5 (a sum of 4 products and a sigmoid)."""
import platform

import pytest
import torch

from nas.ops import cpu_kernels
from nas.ops.causal_conv import causal_conv1d_silu, causal_conv1d_silu_cpu, causal_conv1d_silu_ref

if not cpu_kernels.available():  # pragma: no cover - the CI machine has a compiler
    pytest.skip(f"no CPU kernel: {cpu_kernels.problem()}", allow_module_level=True)


def inputs(batch, C, S, k, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, S, generator=g, dtype=torch.float64)
    w = 0.5 * torch.randn(C, 1, k, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b)]


def grads(y, tensors, seed=1):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return torch.autograd.grad(y, [t for t in tensors if t is not None], gy)


@pytest.mark.parametrize("batch,C,S,k,bias", [(2, 3, 1, 4, True), (2, 5, 3, 4, True), (3, 7, 37, 4, False),
                                              (1, 20, 64, 4, True), (2, 4, 17, 2, True), (2, 6, 50, 7, True)])
def test_matches_pytorch_conv(batch, C, S, k, bias):
    x, w, b = inputs(batch, C, S, k, bias)
    y = causal_conv1d_silu(x, w, b)
    assert y.grad_fn is not None and "nas_causal_conv1d_silu_cpu" in y.grad_fn.name()
    y_ref = causal_conv1d_silu_ref(x, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(y, (x, w, b)), grads(y_ref, (x, w, b))):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_strided_input():
    """The loop path's x is a channel half of a transposed tensor."""
    x, w, b = inputs(2, 12, 33, 4)
    xz = torch.randn(2, 33, 24).requires_grad_()
    xs = xz.transpose(1, 2)[:, :12]
    y, y_ref = causal_conv1d_silu(xs, w, b), causal_conv1d_silu_ref(xs, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(y, (xz, w, b)), grads(y_ref, (xz, w, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):
    x, w, b = inputs(2, 3, 9, 4, bias, dtype=torch.float64)
    assert torch.autograd.gradcheck(causal_conv1d_silu_cpu, (x, w, b))
    y = causal_conv1d_silu(x, w, b)
    torch.testing.assert_close(y, causal_conv1d_silu_ref(x, w, b), rtol=1e-12, atol=1e-12)


def test_same_bits_on_any_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x, w, b = inputs(3, 40, 29, 4, seed=4)
            y = causal_conv1d_silu(x, w, b)
            results.append([y, *grads(y, (x, w, b))])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_pytorch_conv_without_the_kernel_or_for_bf16(monkeypatch):
    x, w, b = inputs(2, 4, 9, 4, dtype=torch.bfloat16)
    assert "nas_causal_conv1d_silu_cpu" not in causal_conv1d_silu(x, w, b).grad_fn.name()
    monkeypatch.setattr(cpu_kernels, "library", lambda: (None, "no compiler"))
    x, w, b = inputs(2, 4, 9, 4)
    y = causal_conv1d_silu(x, w, b)
    assert "nas_causal_conv1d_silu_cpu" not in y.grad_fn.name()
    assert torch.equal(y, causal_conv1d_silu_ref(x, w, b))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_portable_build_without_avx512(tmp_path, monkeypatch):
    lib = cpu_kernels.build(tmp_path, ("-mno-avx512f",))
    monkeypatch.setattr(cpu_kernels, "library", lambda: (lib, ""))
    x, w, b = inputs(2, 6, 37, 4)
    y, y_ref = causal_conv1d_silu(x, w, b), causal_conv1d_silu_ref(x, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(y, (x, w, b)), grads(y_ref, (x, w, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
