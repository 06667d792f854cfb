"""The causal depthwise conv1d + SiLU at the head of every Mamba mixer, by the compiled CPU kernel.

PyTorch's depthwise conv1d backward on CPU takes several times the pass over memory it needs (in the
demo supernet's step it was the largest cost after the scan), so on CPU tensors this runs
``csrc/causal_conv_cpu.c``: one row (batch element, channel) per work item, time in the lanes of a
vector, the SiLU fused, its backward recomputing the conv. Elsewhere (CUDA, bf16, no compiler) it is
PyTorch's conv, which is also the reference the kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nas.ops import cpu_kernels, selfcheck


def causal_conv1d_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(conv1d(x, weight, bias, padding=k - 1, groups=C)[..., :S]) in PyTorch."""
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]])


class CausalConvSiluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        batch, C, S = x.shape
        k = weight.shape[-1]
        xc, w = x.contiguous(), weight.reshape(C, k).contiguous()
        b = None if bias is None else bias.contiguous()
        y = torch.empty_like(xc)
        cpu_kernels.run("conv_forward", x.dtype, xc, w, b, y, batch * C, C, S, k)
        ctx.save_for_backward(xc, w, b)
        ctx.weight_shape = weight.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xc, w, b = ctx.saved_tensors
        batch, C, S = xc.shape
        k = w.shape[1]
        gy = gy.to(xc.dtype).contiguous()
        gx = torch.empty_like(xc)
        gw = xc.new_empty((batch, C, k))  # per batch element, summed below
        gb = None if b is None else xc.new_empty((batch, C))
        cpu_kernels.run("conv_backward", xc.dtype, xc, w, b, gy, gx, gw, gb, batch * C, C, S, k)
        return gx, gw.sum(0).view(ctx.weight_shape), None if gb is None else gb.sum(0)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv1d): x (batch, C, S), weight (C, 1, k) (nn.Conv1d's depthwise layout),
    bias (C,) or None -> (batch, C, S), out[t] = silu(bias + sum_j weight[:, 0, j] x[t - (k - 1) + j]).

    The CPU kernel for fp32 / float64 CPU tensors when it builds here and passes its self-check
    (``nas.ops.selfcheck``), else ``causal_conv1d_silu_ref``."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if (all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors) and x.dtype in (torch.float32, torch.float64)
            and cpu_kernels.available() and selfcheck.settle("cpu", False, selfcheck.cpu_failure()) == "cpu"):
        return CausalConvSiluFn.apply(x, weight, bias)
    return causal_conv1d_silu_ref(x, weight, bias)
