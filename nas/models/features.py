"""timm's feature interface, shared by both families: which layers to take, what each feature map is, and the
input checks a dense-prediction caller needs before any work.

``FeatureInfo`` answers as timm's does (``channels()``, ``reduction()``, ``module_name()``, ``get()``,
``get_dicts()``), so detection and segmentation code written against timm backbones reads ours unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch

from nas.errors import UserError

OUTPUT_FORMATS = ("NCHW", "NHWC")


def take_indices(num_layers: int, indices, what: str = "out_indices", unit: str = "layer") -> list[int]:
    """timm's rule for ``indices``: None is every one of ``num_layers``, an int n the last n, a sequence names
    them (negative counts from the end). Returns them ascending; a value out of range or named twice is a
    UserError naming it and what is allowed."""
    allowed = f"expected {unit} indices in -{num_layers} .. {num_layers - 1}"
    if indices is None:
        return list(range(num_layers))
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)) or isinstance(indices, str):
        raise UserError(f"{what}: expected an int (the last n) or a list of {unit} indices, got {indices!r}")
    if isinstance(indices, int):
        if not 1 <= indices <= num_layers:
            raise UserError(f"{what}: {indices} as a count takes the last n {unit}s; expected 1 .. {num_layers}")
        return list(range(num_layers - indices, num_layers))
    taken = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_layers <= i < num_layers:
            raise UserError(f"{what}: {i!r} in {list(indices)} is out of range; {allowed}")
        taken.append(i % num_layers)
    repeated = sorted({i for i in taken if taken.count(i) > 1})
    if repeated:
        raise UserError(f"{what}: {unit} {', '.join(map(str, repeated))} named more than once in {list(indices)}; "
                        f"{allowed}, each once")
    if not taken:
        raise UserError(f"{what}: an empty list takes no features; {allowed}")
    return sorted(taken)


def check_image(x: torch.Tensor, min_size: int, model_name: str, what: str) -> None:
    """A (batch, C, H, W) input at least ``min_size`` pixels a side, else a one-line UserError."""
    if x.dim() != 4:
        raise UserError(f"input: expected a (batch, channels, height, width) tensor for {model_name}, "
                        f"got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H < min_size or W < min_size:
        raise UserError(f"input: a {H} x {W} image is smaller than {model_name}'s {what} ({min_size} x {min_size}); "
                        f"expected at least {min_size} pixels a side")


def check_output_format(output_fmt: str) -> None:
    if output_fmt not in OUTPUT_FORMATS:
        raise UserError(f"output_fmt: expected one of {', '.join(OUTPUT_FORMATS)}, got {output_fmt!r}")


def to_format(x: torch.Tensor, output_fmt: str) -> torch.Tensor:
    """(batch, H, W, C) channels-last -> the asked layout."""
    return x.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x


class FeatureInfo:
    """One entry per feature map a backbone returns: ``num_chs``, ``reduction`` (input pixels per feature
    pixel) and ``module`` (the state_dict prefix of the layer it is taken after), as timm's FeatureInfo."""

    def __init__(self, entries: list[dict], out_indices: list[int]):
        self.info = [dict(e) for e in entries]
        self.out_indices = list(out_indices)

    def _select(self, key: str, idx=None):
        if idx is None:
            return [e[key] for e in self.info]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get(self, key: str, idx=None):
        return self._select(key, idx)

    def get_dicts(self, keys=None, idx=None):
        chosen = self.info if idx is None else ([self.info[i] for i in idx] if isinstance(idx, (list, tuple))
                                                else [self.info[idx]])
        dicts = [e if keys is None else {k: e[k] for k in keys} for e in chosen]
        return dicts if idx is None or isinstance(idx, (list, tuple)) else dicts[0]

    def channels(self, idx=None):
        return self._select("num_chs", idx)

    def reduction(self, idx=None):
        return self._select("reduction", idx)

    def module_name(self, idx=None):
        return self._select("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info})"
