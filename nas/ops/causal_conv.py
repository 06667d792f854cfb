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

from nas.ops import cpu_kernels
from nas.ops.selective_scan import resolve_backend


def causal_conv1d_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(conv1d(x, weight, bias, padding=k - 1, groups=C)[..., :S]) in PyTorch."""
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]])


# torch.library's schema API, not ``custom_op`` (whose wrapper imports torch._dynamo on first use)
torch.library.define("nas::causal_conv1d_silu_cpu", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
torch.library.define("nas::causal_conv1d_silu_cpu_backward",
                     "(Tensor x, Tensor weight, Tensor? bias, Tensor gy) -> Tensor[]")


def causal_conv1d_silu_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel as the operator ``nas::causal_conv1d_silu_cpu`` (backward ``..._backward``): x (batch, C, S),
    weight (C, 1, k), bias (C,) or None -> (batch, C, S), x's dtype (fp32 or float64, all three alike)."""
    return torch.ops.nas.causal_conv1d_silu_cpu(x, weight, bias)


@torch.library.impl("nas::causal_conv1d_silu_cpu", "cpu")
def _forward(x, weight, bias):
    batch, C, S = x.shape
    k = weight.shape[-1]
    xc, w = x.contiguous(), weight.reshape(C, k).contiguous()
    y = torch.empty_like(xc)
    cpu_kernels.run("conv_forward", x.dtype, xc, w, None if bias is None else bias.contiguous(), y, batch * C, C, S, k)
    return y


@torch.library.register_fake("nas::causal_conv1d_silu_cpu")
def _forward_fake(x, weight, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.impl("nas::causal_conv1d_silu_cpu_backward", "cpu")
def _backward_kernel(x, weight, bias, gy):
    """The kernel's backward (it recomputes the conv): [grad x, grad weight, grad bias (empty without bias)]."""
    batch, C, S = x.shape
    k = weight.shape[-1]
    xc, w = x.contiguous(), weight.reshape(C, k).contiguous()
    b = None if bias is None else bias.contiguous()
    gy = gy.to(xc.dtype).contiguous()
    gx = torch.empty_like(xc)
    gw = xc.new_empty((batch, C, k))  # per batch element, summed below
    gb = None if b is None else xc.new_empty((batch, C))
    cpu_kernels.run("conv_backward", xc.dtype, xc, w, b, gy, gx, gw, gb, batch * C, C, S, k)
    return [gx, gw.sum(0).view(weight.shape), x.new_empty(0) if gb is None else gb.sum(0)]


@torch.library.register_fake("nas::causal_conv1d_silu_cpu_backward")
def _backward_fake(x, weight, bias, gy):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)
            for t in (x, weight, bias)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = torch.ops.nas.causal_conv1d_silu_cpu_backward(x, weight, bias, gy)
    return gx, gw, None if bias is None else gb


torch.library.register_autograd("nas::causal_conv1d_silu_cpu", _backward, setup_context=_setup_context)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv1d): x (batch, C, S), weight (C, 1, k) (nn.Conv1d's depthwise layout),
    bias (C,) or None -> (batch, C, S), out[t] = silu(bias + sum_j weight[:, 0, j] x[t - (k - 1) + j]).

    The CPU kernel for fp32 / float64 CPU tensors when it builds here and passes its self-check
    (``nas.ops.selfcheck``), else ``causal_conv1d_silu_ref``."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if (all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors) and x.dtype in (torch.float32, torch.float64)
            and resolve_backend("auto", x.device) == "cpu"):
        return causal_conv1d_silu_cpu(x, weight, bias)
    return causal_conv1d_silu_ref(x, weight, bias)
