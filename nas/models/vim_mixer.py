"""The LocalVim mixer: Mamba with one causal conv1d / x_proj / dt_proj / A_log / D per scan direction.

Per direction: x and z (the two halves of the shared in_proj) are permuted together into the scan
order, with zero tokens where a window scan pads; causal conv1d (width 4) + SiLU; x_proj -> (dt, B,
C); dt_proj; the selective scan gated by silu(z); the scan undone (pads dropped); SCAttn. The
directions are then merged (``MultiScan``) and projected by the shared out_proj.

All directions run together: the inputs of every direction are gathered with one index table into a
(batch, K, channels, S) tensor (S = the longest scan; shorter scans end in zero tokens, which the
causal conv and scan never carry backwards), then one grouped conv1d, two batched einsums and ONE
``multi_direction_scan`` call. ``batched = False`` switches to a loop over the directions (the
original structure), kept as the test oracle and the benchmark baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from nas.errors import UserError
from nas.models.mixed_scan import MultiScan
from nas.models.scattn import SCAttn
from nas.ops import (BACKENDS, DIRECTIONS, apply_scan, gather_steps, multi_direction_scan, scan_tables, selective_scan,
                     take_steps, undo_scan)
from nas.ops.causal_conv import causal_conv1d_silu


def dt_bias_init(d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt bias: softplus(bias) log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def a_log_init(d_inner: int, d_state: int) -> torch.Tensor:
    """S4D-real init: A = -(1..N) for every channel, stored as log."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


class LocalVimMixer(nn.Module):
    """hidden (batch, L_src, d_model) on an H x W token grid -> (batch, L_src, d_model).

    directions: the layer's directions (derived form) or None (search form: every candidate, alpha-weighted).
    mid_cls_token: the source holds a class token at index (L_src - 1) // 2, which every scan also
    visits at that position (the middle-class-token variant).
    """

    def __init__(self, d_model: int, directions=None, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scattn: str = "channel", backend: str = "auto", mid_cls_token: bool = False, candidates=DIRECTIONS):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        if backend not in BACKENDS:
            raise UserError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.mid_cls_token = mid_cls_token
        self.batched = True
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.multi_scan = MultiScan(self.d_inner, directions, candidates=candidates)
        dt_std = self.dt_rank ** -0.5
        for k in range(len(self.multi_scan.directions)):
            A_log = nn.Parameter(a_log_init(self.d_inner, d_state))
            A_log._no_weight_decay = True
            setattr(self, f"A_log_{k}", A_log)
            setattr(self, f"conv1d_{k}", nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                   padding=d_conv - 1))
            setattr(self, f"x_proj_{k}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner)
            nn.init.uniform_(dt_proj.weight, -dt_std, dt_std)
            with torch.no_grad():
                dt_proj.bias.copy_(dt_bias_init(self.d_inner))
            setattr(self, f"dt_proj_{k}", dt_proj)
            D = nn.Parameter(torch.ones(self.d_inner))
            D._no_weight_decay = True
            setattr(self, f"D_{k}", D)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.attn = SCAttn(self.d_inner, scattn)

    @property
    def directions(self) -> tuple:
        return self.multi_scan.directions

    def _stacked(self, name: str, slots) -> torch.Tensor:
        return torch.stack([self.get_parameter(name.format(k)) for k in slots])

    def forward(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        xz = self.in_proj(hidden)
        ys = self._scan_batched(xz, grid) if self.batched else self._scan_loop(xz, grid)
        ys = self.attn(ys)  # (batch, K, L_src, d_inner)
        return self.out_proj(self.multi_scan.merge(ys))

    def _scan_batched(self, xz: torch.Tensor, grid) -> torch.Tensor:
        """xz (batch, L_src, 2*d_inner) -> y (batch, K, L_src, d_inner), all directions in one scan call."""
        batch, n_src, _ = xz.shape
        slots = self.multi_scan.slots()
        K, Di, N, R = len(slots), self.d_inner, self.d_state, self.dt_rank
        cls_position = (n_src - 1) // 2 if self.mid_cls_token else None
        table, inverse = scan_tables(tuple(self.directions[k] for k in slots), *grid, xz.device, cls_position)
        S = table.shape[1]
        # x and z each read channel-major from the small source into (batch, K, Di, S) contiguous blocks,
        # which the conv and the scan take without another copy
        x, z = (gather_steps(half.unsqueeze(1).expand(batch, K, Di, n_src), table)
                for half in xz.transpose(1, 2).split(Di, dim=1))
        conv_w = torch.cat([getattr(self, f"conv1d_{k}").weight for k in slots])
        conv_b = torch.cat([getattr(self, f"conv1d_{k}").bias for k in slots])
        x = causal_conv1d_silu(x.reshape(batch, K * Di, S), conv_w, conv_b).view(batch, K, Di, S)
        x_dbl = torch.einsum("bkds,kcd->bkcs", x, self._stacked("x_proj_{}.weight", slots))
        dt, B, C = torch.split(x_dbl, [R, N, N], dim=2)
        dt = torch.einsum("bkrs,kdr->bkds", dt, self._stacked("dt_proj_{}.weight", slots))
        A = -torch.exp(self._stacked("A_log_{}", slots).float())
        y = multi_direction_scan(x, dt, A, B, C, self._stacked("D_{}", slots).float(), z,
                                 self._stacked("dt_proj_{}.bias", slots).float(), True, backend=self.backend)
        # back to source order, token-major: SCAttn and the merge then read contiguous rows
        return take_steps(y.transpose(2, 3), inverse, dim=-2)

    def _scan_loop(self, xz: torch.Tensor, grid) -> torch.Tensor:
        """The per-direction loop over permuted copies (LocalMamba's structure): the oracle."""
        H, W = grid
        batch, n_src, _ = xz.shape
        c = (n_src - 1) // 2 if self.mid_cls_token else None
        if c is not None:
            cls_xz, xz = xz[:, c:c + 1], torch.cat([xz[:, :c], xz[:, c + 1:]], dim=1)
        outs = []
        for k in self.multi_scan.slots():
            direction = self.directions[k]
            seq = apply_scan(xz, direction, H, W)  # (batch, S_k, 2*Di)
            if c is not None:
                seq = torch.cat([seq[:, :c], cls_xz, seq[:, c:]], dim=1)
            x, z = seq.transpose(1, 2).chunk(2, dim=1)
            conv = getattr(self, f"conv1d_{k}")
            x = causal_conv1d_silu(x, conv.weight, conv.bias)
            dt, B, C = torch.split(getattr(self, f"x_proj_{k}")(x.transpose(1, 2)),
                                   [self.dt_rank, self.d_state, self.d_state], dim=2)
            dt_proj = getattr(self, f"dt_proj_{k}")
            dt = (dt @ dt_proj.weight.t()).transpose(1, 2)
            y = selective_scan(x, dt, -torch.exp(getattr(self, f"A_log_{k}").float()),
                               B.transpose(1, 2), C.transpose(1, 2), getattr(self, f"D_{k}").float(), z,
                               dt_proj.bias.float(), True, backend=self.backend)
            if c is not None:
                cls_y, y = y[..., c:c + 1], torch.cat([y[..., :c], y[..., c + 1:]], dim=-1)
            y = undo_scan(y, direction, H, W, layout="BCL")
            if c is not None:
                y = torch.cat([y[..., :c], cls_y, y[..., c:]], dim=-1)
            outs.append(y)
        return torch.stack(outs, dim=1).transpose(2, 3)
