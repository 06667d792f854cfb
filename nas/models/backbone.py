"""Derived and search models as detection and segmentation backbones, the way timm and LocalMamba give them.

``create_model(name, features_only=True, out_indices=...)`` builds one of these; its forward returns a list of
NCHW feature maps and its ``feature_info`` describes them (timm's FeatureInfo). The state_dict keys are those
of LocalMamba's detection/segmentation backbones (``Backbone_LocalVisionMamba``, ``Backbone_LocalVSSM``): the
classification model's keys without its classifier, plus one LayerNorm per output:
- LocalVim: the hidden state each layer in ``out_indices`` returns (its mixer's output), through
  ``outnorm_{j}`` (j = 0, 1, ... in output order), as (batch, C, ceil(H/patch), ceil(W/patch)); ``norm_f`` and
  ``head`` removed. Default out_indices: the last layer of each quarter of the depth (4, 9, 14, 19 of 20;
  every layer below 4 layers).
- LocalVMamba: the output of each stage in ``out_indices`` before its PatchMerging, through ``outnorm{i}``
  (i = the stage), as (batch, dims[i], H/patch/2^i, W/patch/2^i) (rounded as the merges pad); ``classifier``
  removed. Default: every stage.

``load_backbone_checkpoint`` loads a classification checkpoint (any form ``read_state_dict`` reads) or a
LocalMamba backbone / whole detector state_dict into a backbone and reports what was missing, unexpected and
resized. ``FPNHead`` is a light dense-prediction head over the maps.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from nas import config as cfglib
from nas.errors import UserError
from nas.models.arch import published_names
from nas.models.checkpoint import load_checkpoint, read_state_dict
from nas.models.features import FeatureInfo, take_indices, to_format
from nas.models.local_vim import LocalVim, resize_grid_embedding, resize_pos_embed
from nas.models.local_vmamba import LocalVMamba


def default_vim_indices(depth: int) -> list[int]:
    """The last layer of each quarter of the depth: (4, 9, 14, 19) of 20 as LocalMamba, (5, 11, 17, 23) of 24
    as ViTDet; every layer when there are fewer than 4."""
    return sorted({math.ceil((q + 1) * depth / 4) - 1 for q in range(4)})


class _Backbone:
    """What both families' backbones share: the forward over ``out_indices`` and the refusal of what the
    removed classifier did."""

    CLASSIFIER_PREFIXES: tuple[str, ...] = ()

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=True):
        if norm or not intermediates_only:
            raise UserError(f"{self.model_name} backbone: its final norm and classifier are removed (as in "
                            f"LocalMamba's backbones); call forward_intermediates with intermediates_only=True and "
                            f"norm=False, or use the classification model")
        return super().forward_intermediates(x, indices, False, stop_early, output_fmt, True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(batch, 3, H, W) -> [(batch, feature_info.channels()[j], h_j, w_j)] for each of ``out_indices``."""
        maps = self.forward_intermediates(x, self.out_indices, output_fmt="NHWC")
        return [to_format(norm(m), "NCHW") for norm, m in zip(self.outnorms(), maps)]

    def resize_position_tables(self, state: dict, grid) -> list[str]:
        return []


class LocalVimBackbone(_Backbone, LocalVim):
    CLASSIFIER_PREFIXES = ("head.", "norm_f.")

    def __init__(self, *, out_indices=None, **config):
        super().__init__(**config)
        del self.head, self.norm_f
        depth = self.num_layers
        self.out_indices = take_indices(depth, default_vim_indices(depth) if out_indices is None else out_indices)
        for j in range(len(self.out_indices)):
            self.add_module(f"outnorm_{j}", nn.LayerNorm(self.embed_dim))
        self.config["out_indices"] = list(self.out_indices)
        self.feature_info = FeatureInfo([{"num_chs": self.embed_dim, "reduction": self.patch_embed.patch_size,
                                          "module": f"layers.{i}"} for i in self.out_indices], self.out_indices)

    def outnorms(self) -> list[nn.Module]:
        return [getattr(self, f"outnorm_{j}") for j in range(len(self.out_indices))]

    def resize_position_tables(self, state: dict, grid) -> list[str]:
        """Resize ``pos_embed`` and the RoPE tables of ``state`` (in place) from the checkpoint's token grid to
        this backbone's, bicubically; returns the keys resized. The checkpoint's grid: ``grid`` if given, else
        the square one of its token count (LocalMamba's rule)."""
        expected = self.state_dict()
        resized = []
        for key in ("pos_embed", "rope.freqs_cos", "rope.freqs_sin"):
            if key not in state or key not in expected or state[key].shape == expected[key].shape \
                    or state[key].shape[-1] != expected[key].shape[-1]:
                continue  # absent, already fitting, or another width (check_state_dict reports that)
            table = state[key][0] if key == "pos_embed" else state[key]
            extra = int(self.mid_cls_token and key == "pos_embed")
            old = _source_grid(table.shape[0] - extra, grid, key)
            if key == "pos_embed":
                state[key] = resize_pos_embed(table, old, self.grid, self.mid_cls_token)[None]
            else:
                state[key] = resize_grid_embedding(table, old, self.grid)
            resized.append(f"{key} {old[0]}x{old[1]} -> {self.grid[0]}x{self.grid[1]}")
        return resized


class LocalVMambaBackbone(_Backbone, LocalVMamba):
    CLASSIFIER_PREFIXES = ("classifier.",)

    def __init__(self, *, out_indices=None, **config):
        super().__init__(**config)
        del self.classifier
        dims, stride = self.config["dims"], self.patch_embed[0].stride[0]
        self.out_indices = take_indices(len(dims), out_indices, unit="stage")
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", nn.LayerNorm(dims[i]))
        self.config["out_indices"] = list(self.out_indices)
        self.feature_info = FeatureInfo([{"num_chs": dims[i], "reduction": stride * 2 ** i, "module": f"layers.{i}"}
                                         for i in self.out_indices], self.out_indices)

    def outnorms(self) -> list[nn.Module]:
        return [getattr(self, f"outnorm{i}") for i in self.out_indices]


_BACKBONES = {LocalVim: LocalVimBackbone, LocalVMamba: LocalVMambaBackbone}


def backbone_class(cls: type) -> type:
    return _BACKBONES[cls]


def arch_model_args(directions) -> dict:
    """The ``model_args`` of an arch file (scans per layer, widths, depth) when ``directions`` names one, so that
    a backbone built from ``runs/NAME/arch.yaml`` is the searched network; {} for anything else."""
    if not isinstance(directions, (str, os.PathLike)) or directions in published_names():
        return {}
    path = os.fspath(directions)
    if not os.path.isfile(path):
        return {}  # resolve_directions names the missing file
    try:
        with open(path, encoding="utf-8") as f:
            arch = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise UserError(f"directions: {cfglib.yaml_error_message(path, exc)}") from None
    return dict(arch.get("model_args") or {}) if isinstance(arch, dict) else {}  # a bare list has none


def _source_grid(tokens: int, grid, key: str) -> tuple[int, int]:
    if grid is not None:
        grid = tuple(grid)
        if len(grid) != 2 or grid[0] * grid[1] != tokens:
            raise UserError(f"grid: {grid} does not hold the {tokens} tokens of the checkpoint's {key}; expected "
                            f"(rows, columns) of the token grid it was trained on")
        return grid
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"checkpoint: its {key} has {tokens} tokens, not a square grid; pass grid=(rows, columns) "
                        f"of the token grid it was trained on")
    return side, side


class BackboneLoad(NamedTuple):
    missing: list[str]      # keys of the backbone the checkpoint lacks (its outnorms): left as initialised
    unexpected: list[str]   # keys of the checkpoint the backbone has no use for (the classifier, a detector's rest)
    resized: list[str]      # position tables resized to the backbone's token grid


def load_backbone_checkpoint(backbone: _Backbone, path_or_state, grid=None) -> BackboneLoad:
    """Load a checkpoint into a backbone (in place) and report what did not carry over.

    path_or_state: a classification checkpoint of the same model (ours or a released LocalMamba one, any form
    ``read_state_dict`` reads), a backbone state_dict with LocalMamba's ``outnorm`` names, or a whole detector
    or segmentor whose backbone keys start with ``backbone.``. Everything but the classifier, the outnorms and
    the position tables (resized bicubically to the backbone's grid) must fit exactly: a checkpoint of another
    model is a UserError naming its keys. grid: (rows, columns) of a checkpoint's non-square token grid.
    """
    state = read_state_dict(path_or_state)
    unexpected = []
    if any(k.startswith("backbone.") for k in state):  # a whole mmdet/mmseg model: take its backbone
        unexpected = [k for k in state if not k.startswith("backbone.")]
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    expected = backbone.state_dict()
    unexpected += [k for k in state if k.startswith(backbone.CLASSIFIER_PREFIXES)
                   or (k.startswith("outnorm") and k not in expected)]
    dropped = set(unexpected)
    state = {k: v for k, v in state.items() if k not in dropped}
    resized = backbone.resize_position_tables(state, grid)
    missing = [k for k in expected if k.startswith("outnorm") and k not in state]
    state.update({k: expected[k] for k in missing})
    load_checkpoint(backbone, state)
    return BackboneLoad(missing, unexpected, resized)


class FPNHead(nn.Module):
    """A light FPN-style dense-prediction head.

    Each map gets a 1 x 1 lateral conv to ``dim`` channels; from the coarsest map down, the running sum is
    upsampled (bilinear) to the next finer map and added; a 3 x 3 conv + BatchNorm + ReLU and a 1 x 1
    classifier follow, and the logits are upsampled to the image. Works on a plain (one-stride) backbone too.
    maps: [(batch, C_j, h_j, w_j)] -> (batch, num_classes, H, W).
    """

    def __init__(self, in_channels: list[int], num_classes: int, dim: int = 64):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU())
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        order = sorted(range(len(maps)), key=lambda j: maps[j].shape[-2] * maps[j].shape[-1])  # coarsest first
        top = None
        for j in order:
            lateral = self.laterals[j](maps[j])
            top = lateral if top is None else lateral + F.interpolate(top, size=lateral.shape[-2:], mode="bilinear",
                                                                      align_corners=False)
        logits = self.classifier(self.fuse(top))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
