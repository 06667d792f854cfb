"""FLOPs of LocalVim / LocalVMamba models for one image, counted analytically.

Convention (fvcore's, which produced the published LocalMamba/VMamba figures): a Linear, conv or
einsum counts its multiply-accumulates; LayerNorm 5 per element (4 without affine parameters, and
for RMSNorm), average pooling 1 per element; element-wise activations, gates, adds and the softmax
are free. The selective scan counts ``9 * L * D * N`` plus ``L * D`` for the D skip and ``L * D`` for
the silu(z) gate when the scan applies it (LocalMamba's ``flops_selective_scan_fn``), with L the
padded scan length the model really runs. Every direction's projections count.

``convention="released"`` reproduces instead what the released code reported: LocalVMamba's figures
came from fvcore (the same count as above), but LocalVim's own ``flops()`` counted the conv1d, x_proj
and dt_proj of one direction only, the scan as ``5*L*D*N + 2*L*D`` per direction, one norm per layer
and nothing for SCAttn's per-token work; that is where its published 1.5G / 4.8G come from.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nas.errors import UserError
from nas.models.local_vim import LocalVim
from nas.models.local_vmamba import LocalVMamba
from nas.models.scattn import SCAttn
from nas.ops import scan_tables


def selective_scan_flops(L: int, D: int, N: int, with_D: bool = True, with_z: bool = False) -> int:
    return 9 * L * D * N + (L * D if with_D else 0) + (L * D if with_z else 0)


def layer_norm_flops(numel: int, affine: bool = True) -> int:
    return (5 if affine else 4) * numel


def scattn_flops(attn: SCAttn, L: int) -> int:
    """One SCAttn call on L tokens of one direction."""
    C, r = attn.global_reduce.in_features, attn.global_reduce.out_features
    total = layer_norm_flops(L * C) + L * C + 2 * C * r  # norm, mean, global_reduce, channel_select
    if attn.mode == "full":
        total += L * C * r + L * 2 * r
    return total


def _merge_flops(multi_scan, L: int, Di: int) -> int:
    return layer_norm_flops(len(multi_scan.directions) * L * Di, affine=False) if multi_scan.search else 0


def _vim_flops(model: LocalVim, H: int, W: int) -> int:
    p = model.patch_embed.patch_size
    grid = (-(-H // p), -(-W // p))
    L = grid[0] * grid[1]
    n_src = L + model.mid_cls_token
    C = model.embed_dim
    total = L * C * model.patch_embed.proj.in_channels * p * p
    for layer in model.layers:
        mixer = layer.mixer
        K, Di, N, R = len(mixer.directions), mixer.d_inner, mixer.d_state, mixer.dt_rank
        cls_position = (n_src - 1) // 2 if mixer.mid_cls_token else None
        S = scan_tables(mixer.directions, *grid, torch.device("cpu"), cls_position)[0].shape[1]
        total += layer_norm_flops(n_src * C, affine=False)  # RMSNorm
        total += n_src * C * 2 * Di  # in_proj
        total += K * S * Di * (mixer.d_conv + R + 2 * N) + K * S * R * Di  # conv1d, x_proj, dt_proj
        total += selective_scan_flops(S, K * Di, N, with_z=True)
        total += K * scattn_flops(mixer.attn, n_src) + _merge_flops(mixer.multi_scan, n_src, Di)
        total += n_src * Di * C  # out_proj
    total += layer_norm_flops(n_src * C, affine=False) + n_src * C  # norm_f, pooling
    return total + C * model.num_classes


def _vmamba_flops(model: LocalVMamba, H: int, W: int) -> int:
    conv = model.patch_embed[0]
    p = conv.stride[0]
    H, W = (H - p) // p + 1, (W - p) // p + 1
    C = conv.out_channels
    total = H * W * C * conv.in_channels * p * p + layer_norm_flops(H * W * C)
    for stage in model.layers:
        for block in stage.blocks:
            op = block.op
            L, C = H * W, op.d_model
            K, Di, N, R = len(op.directions), op.d_inner, op.d_state, op.dt_rank
            S = scan_tables(op.directions, H, W, torch.device("cpu"), trim_leading=True)[0].shape[1]
            total += layer_norm_flops(L * C) + L * C * 2 * Di + L * Di * op.conv2d.kernel_size[0] ** 2
            total += K * L * Di * (R + 2 * N) + K * L * R * Di  # x_proj, dt_proj (raster tokens)
            total += selective_scan_flops(S, K * Di, N)
            total += K * scattn_flops(op.multi_scan.attn, L) + _merge_flops(op.multi_scan, L, Di)
            total += layer_norm_flops(L * Di) + L * Di * C  # out_norm, out_proj
        if isinstance(stage.downsample, nn.Module) and hasattr(stage.downsample, "reduction"):
            H, W = -(-H // 2), -(-W // 2)
            red = stage.downsample.reduction
            total += layer_norm_flops(H * W * red.in_features) + H * W * red.in_features * red.out_features
    C = model.classifier.norm.normalized_shape[0]
    total += layer_norm_flops(H * W * C) + H * W * C
    return total + C * model.num_classes


def _vim_flops_released(model: LocalVim, H: int, W: int) -> int:
    """The released LocalVim ``flops()`` formula (transcribed, quirks included)."""
    p = model.patch_embed.patch_size
    L = -(-H // p) * -(-W // p)
    C = model.embed_dim
    total = L * C * model.patch_embed.proj.in_channels * p * p
    L += model.mid_cls_token
    for layer in model.layers:
        m = layer.mixer
        Di, N, R = m.d_inner, m.d_state, m.dt_rank
        total += L * C * 2 * Di + (L + m.d_conv - 1) * Di * m.d_conv + L * Di * (R + 2 * N) + L * R * Di
        total += len(m.directions) * (5 * L * Di * N + 2 * L * Di)
        total += 2 * m.attn.global_reduce.in_features * m.attn.global_reduce.out_features
        total += L * Di * C + L * C
    return total + C * 1000


def flops(model: nn.Module, img_size=None, convention: str = "fvcore") -> int:
    """FLOPs of one forward pass on one (3, H, W) image; img_size: int, (H, W) or None (the model's).

    convention: "fvcore" (default; see the module docstring) or "released" (what the released code
    reported, to compare with the published figures).
    """
    if convention not in ("fvcore", "released"):
        raise UserError(f"convention: expected 'fvcore' or 'released', got {convention!r}")
    if img_size is None:
        img_size = model.config["img_size"]
    H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if isinstance(model, LocalVim):
        return _vim_flops(model, H, W) if convention == "fvcore" else _vim_flops_released(model, H, W)
    if isinstance(model, LocalVMamba):
        return _vmamba_flops(model, H, W)
    raise UserError(f"model: flops() supports LocalVim and LocalVMamba models, got {type(model).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
