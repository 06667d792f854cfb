"""Helpers for the model tests: the scan backend to use, cached default-size models, key tables."""
from __future__ import annotations

import functools
import math

import torch

from nas.models import create_model
from nas.models.registry import model_spec


SCAN_BACKEND = "auto"  # what CPU users run: the compiled CPU kernel (the torch scan where no compiler is)


@functools.lru_cache(maxsize=None)
def default_model(name: str):
    """A model at its default (224) configuration, built once per session; do not modify it."""
    torch.manual_seed(0)
    return create_model(name)


def small_model(name: str, **overrides):
    """A model sized for a CPU forward in a test: the real layout, shrunk where it is large.

    Shrunk derived models keep the first layers of their default direction lists.
    """
    torch.manual_seed(0)
    num_layers = None
    if name.startswith("local_vim") and "demo" not in name:
        overrides = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_classes": 7, **overrides}
        num_layers = overrides["depth"]
    elif name.startswith("local_vssm") and "demo" not in name:
        overrides = {"img_size": 64, "dims": [16, 32, 48, 64], "depths": [1, 1, 2, 1], "num_classes": 7, **overrides}
        num_layers = sum(overrides["depths"])
    spec = model_spec(name)
    if num_layers is not None and not spec.search and "directions" not in overrides:
        overrides["directions"] = spec.default_directions()[:num_layers]
    return create_model(name, **{"backend": SCAN_BACKEND, **overrides})


# ---- state_dict tables: the key names and shapes of the released LocalMamba checkpoints ----

def vim_keys(C: int, depth: int = 20, K: int = 4, search: bool = False, mid_cls_token: bool = False,
             num_classes: int = 1000, L: int = 196, N: int = 16) -> dict[str, tuple]:
    Di, R = 2 * C, math.ceil(C / 16)
    keys = {"pos_embed": (1, L + mid_cls_token, C), "patch_embed.proj.weight": (C, 3, 16, 16),
            "patch_embed.proj.bias": (C,), "head.weight": (num_classes, C), "head.bias": (num_classes,),
            "norm_f.weight": (C,)}
    if mid_cls_token:
        keys["cls_token"] = (1, 1, C)
    else:
        keys["rope.freqs_cos"] = keys["rope.freqs_sin"] = (L, C)
    for i in range(depth):
        p = f"layers.{i}."
        keys[p + "norm.weight"] = (C,)
        keys[p + "mixer.in_proj.weight"] = (2 * Di, C)
        keys[p + "mixer.out_proj.weight"] = (C, Di)
        for k in range(K):
            keys[p + f"mixer.A_log_{k}"] = (Di, N)
            keys[p + f"mixer.D_{k}"] = (Di,)
            keys[p + f"mixer.conv1d_{k}.weight"] = (Di, 1, 4)
            keys[p + f"mixer.conv1d_{k}.bias"] = (Di,)
            keys[p + f"mixer.x_proj_{k}.weight"] = (R + 2 * N, Di)
            keys[p + f"mixer.dt_proj_{k}.weight"] = (Di, R)
            keys[p + f"mixer.dt_proj_{k}.bias"] = (Di,)
        keys.update(_attn_keys(p + "mixer.attn.", Di))
        if search:
            keys[p + "mixer.multi_scan.weights"] = (8, 1, 1, 1)
    return keys


def vssm_keys(dims, depths, K: int = 4, search: bool = False, num_classes: int = 1000, N: int = 16) -> dict:
    keys = {"patch_embed.0.weight": (dims[0], 3, 4, 4), "patch_embed.0.bias": (dims[0],),
            "patch_embed.2.weight": (dims[0],), "patch_embed.2.bias": (dims[0],),
            "classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
            "classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)}
    for s, (dim, depth) in enumerate(zip(dims, depths)):
        Di, R = 2 * dim, math.ceil(dim / 16)
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            keys[p + "norm.weight"] = keys[p + "norm.bias"] = (dim,)
            keys[p + "op.in_proj.weight"] = (2 * Di, dim)
            keys[p + "op.conv2d.weight"] = (Di, 1, 3, 3)
            keys[p + "op.conv2d.bias"] = (Di,)
            keys[p + "op.x_proj_weight"] = (K, R + 2 * N, Di)
            keys[p + "op.dt_projs_weight"] = (K, Di, R)
            keys[p + "op.dt_projs_bias"] = (K, Di)
            keys[p + "op.A_logs"] = (K * Di, N)
            keys[p + "op.Ds"] = (K * Di,)
            keys[p + "op.out_norm.weight"] = keys[p + "op.out_norm.bias"] = (Di,)
            keys[p + "op.out_proj.weight"] = (dim, Di)
            keys.update(_attn_keys(p + "op.multi_scan.attn.", Di))
            if search:
                keys[p + "op.multi_scan.weights"] = (8, 1, 1, 1)
        if s + 1 < len(dims):
            p = f"layers.{s}.downsample."
            keys[p + "reduction.weight"] = (2 * dim, 4 * dim)
            keys[p + "norm.weight"] = keys[p + "norm.bias"] = (4 * dim,)
    return keys


def _attn_keys(p: str, Di: int) -> dict:
    return {p + "norm.weight": (Di,), p + "norm.bias": (Di,), p + "global_reduce.weight": (Di // 8, Di),
            p + "global_reduce.bias": (Di // 8,), p + "channel_select.weight": (Di, Di // 8),
            p + "channel_select.bias": (Di,)}


def shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
