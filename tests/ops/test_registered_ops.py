"""The compiled CPU kernels as torch.library operators (nas::selective_scan_cpu, nas::causal_conv1d_silu_cpu and
their backward operators): torch.library.opcheck on random inputs (schema, fake implementation against the
kernel's output shapes and strides, registered autograd, AOTAutograd tracing), with and without the optional
inputs, grouped and ungrouped B and C. The numbers themselves are tested against the references in
test_scan_cpu.py, test_selective_scan.py and test_causal_conv.py."""
import pytest
import torch

from nas.ops import cpu_kernels, selfcheck
from nas.ops import causal_conv, scan_cpu  # noqa: F401  (registers the operators)

if not cpu_kernels.available():  # pragma: no cover - the CI machine has a compiler
    pytest.skip(f"no CPU kernel: {cpu_kernels.problem()}", allow_module_level=True)

SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")


@pytest.mark.parametrize("groups,optional,dtype", [(0, True, torch.float32), (2, False, torch.float32),
                                                   (2, True, torch.float64)])
def test_scan_operators(groups, optional, dtype):
    x = selfcheck.scan_problem(2, 8, 7, 4, groups, D=optional, z=optional, bias=optional, softplus=optional,
                               seed=groups)
    args = [x[k].to(dtype).requires_grad_() if isinstance(x[k], torch.Tensor) else x[k] for k in SCAN_ARGS]
    torch.library.opcheck(torch.ops.nas.selective_scan_cpu.default, args)
    y, last = torch.ops.nas.selective_scan_cpu(*args)
    g = torch.Generator().manual_seed(3)
    gy, g_last = torch.randn(y.shape, generator=g, dtype=dtype), torch.randn(last.shape, generator=g, dtype=dtype)
    torch.library.opcheck(torch.ops.nas.selective_scan_cpu_backward.default,
                          [a.detach() if isinstance(a, torch.Tensor) else a for a in args] + [gy, g_last])


@pytest.mark.parametrize("bias", [True, False])
def test_conv_operators(bias):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 6, 9, generator=g), torch.randn(6, 1, 4, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    args = [t if t is None else t.requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(torch.ops.nas.causal_conv1d_silu_cpu.default, args)
    torch.library.opcheck(torch.ops.nas.causal_conv1d_silu_cpu_backward.default,
                          [t if t is None else t.detach() for t in args] + [torch.randn(2, 6, 9, generator=g)])
