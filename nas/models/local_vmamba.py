"""LocalVMamba: a hierarchical (Swin-like) vision Mamba in the VMamba-v0 style with searched scans.

patch embedding (4 x 4 conv + LayerNorm, channels-last); stages of VSS blocks (LayerNorm -> SS2D ->
drop-path residual, no MLP) with PatchMerging between stages; LayerNorm, global average pool, linear
head. State_dict keys follow the released LocalMamba checkpoints.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.errors import UserError
from nas.models.arch import check_candidates, check_directions, published_directions
from nas.models.features import check_image, check_output_format, take_indices, to_format
from nas.models.layers import DropPath, Permute
from nas.models.registry import register_model
from nas.models.ss2d import SS2D
from nas.ops import DIRECTIONS


class VSSBlock(nn.Module):
    def __init__(self, dim: int, directions=None, drop_path: float = 0.0, **ss2d_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, directions, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.op(self.norm(x)))


class PatchMerging2D(nn.Module):
    """(batch, H, W, C) -> (batch, ceil(H/2), ceil(W/2), out_dim): 2x2 neighbours concatenated, LN, Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class Classifier(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).mean((1, 2)))


class LocalVMamba(nn.Module):
    CONFIG_KEYS = ("img_size", "patch_size", "in_chans", "dims", "depths", "d_state", "ssm_ratio", "num_classes",
                   "drop_path_rate", "directions", "scans_per_layer", "scattn", "backend", "candidates")

    def __init__(self, *, img_size=224, patch_size=4, in_chans=3, dims=(96, 192, 384, 768), depths=(2, 2, 9, 2),
                 d_state=16, ssm_ratio=2.0, num_classes=1000, drop_path_rate=0.2, directions=None, scans_per_layer=4,
                 scattn="channel", backend="auto", candidates=None, model_name="local_vmamba"):
        super().__init__()
        dims, depths = list(dims), list(depths)
        if len(dims) != len(depths):
            raise UserError(f"dims: expected one width per stage ({len(depths)} stages), got {dims}")
        if directions is not None:
            directions = check_directions(directions, sum(depths), scans_per_layer, model_name)
        if directions is not None and candidates is not None:
            raise UserError("candidates: only a search model has candidates; a derived model runs its directions")
        candidates = check_candidates(candidates)
        self.model_name = model_name
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, dims=dims, depths=depths,
                           d_state=d_state, ssm_ratio=ssm_ratio, num_classes=num_classes,
                           drop_path_rate=drop_path_rate, scans_per_layer=scans_per_layer,
                           directions=None if directions is None else [list(d) for d in directions],
                           scattn=scattn, backend=backend,
                           candidates=None if candidates == DIRECTIONS else list(candidates))
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_embed = nn.Sequential(nn.Conv2d(in_chans, dims[0], patch_size, stride=patch_size),
                                         Permute(0, 2, 3, 1), nn.LayerNorm(dims[0]))
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for s, (dim, depth) in enumerate(zip(dims, depths)):
            first = sum(depths[:s])
            blocks = nn.Sequential(*(
                VSSBlock(dim, None if directions is None else directions[first + b], dpr[first + b], d_state=d_state,
                         ssm_ratio=ssm_ratio, scattn=scattn, backend=backend, candidates=candidates)
                for b in range(depth)))
            downsample = PatchMerging2D(dim, dims[s + 1]) if s + 1 < len(dims) else nn.Identity()
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        self.classifier = Classifier(dims[-1], num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def blocks(self):
        return [block for stage in self.layers for block in stage.blocks]

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    @property
    def directions(self) -> list[list[str]]:
        return [list(block.op.directions) for block in self.blocks()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> last-stage features (batch, H/32, W/32, C) channels-last."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's forward_intermediates. (batch, 3, H, W) -> ([maps], last-stage features (batch, h, w, C)
        channels-last, what ``classifier`` takes), or the maps alone with ``intermediates_only``.

        Map i is stage i's output before its PatchMerging (what LocalMamba's detection backbone takes):
        (batch, dims[i], H_i, W_i) with H_0 = floor(H / patch) and H_i = ceil(H_(i-1) / 2) (the merge pads odd
        sizes), NCHW or channels-last (NHWC). ``norm`` passes the last stage's map through the classifier's
        LayerNorm (timm's rule: only the final norm exists). indices: None (every stage), the last n, or a list.
        ``stop_early`` (implied by ``intermediates_only``) runs no stage after the last taken one.
        """
        check_image(x, self.patch_embed[0].stride[0], self.model_name, "patch")
        check_output_format(output_fmt)
        take = take_indices(len(self.layers), indices, "indices", unit="stage")
        last = len(self.layers) - 1
        stop = take[-1] if stop_early or intermediates_only else last
        x = self.patch_embed(x)
        maps = []
        for i, stage in enumerate(self.layers[: stop + 1]):
            x = stage.blocks(x)
            if i in take:
                maps.append(to_format(self.classifier.norm(x) if norm and i == last else x, output_fmt))
            x = stage.downsample(x)
        return maps if intermediates_only else (maps, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


_VSSM_T = dict(dims=[96, 192, 384, 768], depths=[2, 2, 9, 2], drop_path_rate=0.2)
_VSSM_S = dict(dims=[96, 192, 384, 768], depths=[2, 2, 27, 2], drop_path_rate=0.2)
_VSSM_SEARCH = dict(dims=[32, 64, 128, 256], drop_path_rate=0.1)
_VSSM_DEMO = dict(img_size=28, dims=[32, 64, 128], depths=[1, 2, 1], num_classes=10, drop_path_rate=0.0)

register_model("local_vssm_tiny", LocalVMamba, directions="local_vssm_tiny", aliases=("local_vmamba_tiny",),
               **_VSSM_T)
register_model("local_vssm_small", LocalVMamba, directions="local_vssm_small", aliases=("local_vmamba_small",),
               **_VSSM_S)
register_model("local_vssm_tiny_search", LocalVMamba, aliases=("local_vmamba_tiny_search",),
               **{**_VSSM_SEARCH, "depths": [2, 2, 9, 2]})
register_model("local_vssm_small_search", LocalVMamba, aliases=("local_vmamba_small_search",),
               **{**_VSSM_SEARCH, "depths": [2, 2, 27, 2]})
register_model("local_vssm_demo", LocalVMamba, directions=lambda: published_directions("local_vssm_tiny")[:4],
               aliases=("local_vmamba_demo",), **_VSSM_DEMO)
register_model("local_vssm_demo_search", LocalVMamba, aliases=("local_vmamba_demo_search",), **_VSSM_DEMO)
