"""The CPU benchmarks' baseline and floor: the mambapy-based scan computes our selective_scan contract
(so the benchmarks compare like with like), and the floor adds up its exponentials and multiply-adds."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_common import SCAN_FMAS, cpu_throughput, mambapy_selective_scan, scan_floor_ms  # noqa: E402
from nas.ops import selective_scan  # noqa: E402


@pytest.mark.parametrize("groups", [None, 3])
def test_mambapy_scan_matches_the_reference(groups):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    batch, dim, L, N = 2, 6, 11, 4
    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    x = [r(batch, dim, L), 0.5 * r(batch, dim, L) - 1, -torch.exp(0.5 * r(dim, N)), r(*bc), r(*bc), r(dim),
         r(batch, dim, L), 0.3 * r(dim)]
    x = [v.requires_grad_() for v in x]
    got = mambapy_selective_scan(*x, True, True)
    want = selective_scan(*x, True, True, backend="ref")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dy = r(batch, dim, L)
    for a, b in zip(torch.autograd.grad(got[0], x, dy), torch.autograd.grad(want[0], x, dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_floor_adds_exponentials_and_multiply_adds():
    rates = {"exp2_per_s": 2e9, "fma_per_s": 4e9}
    f = scan_floor_ms(10**9, "fwdbwd", rates)
    assert f["exps"] == 2 * 10**9 and f["fmas"] == SCAN_FMAS["fwdbwd"] * 10**9
    assert f["floor_ms"] == pytest.approx(1e3 + 1e3 * SCAN_FMAS["fwdbwd"] / 4)
    measured = cpu_throughput()
    assert measured["exp2_per_s"] > 1e7 and measured["fma_per_s"] > 1e7
