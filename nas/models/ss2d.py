"""SS2D, the LocalVMamba mixer: VMamba-v0's 2-D selective scan over searched directions.

in_proj -> (x, z); x: depthwise 3x3 conv2d + SiLU; all K directions scanned with stacked per-direction
x_proj / dt_proj / A / D; scans undone (window pads dropped); SCAttn per direction; merge
(``MultiScan``); out_norm; gate by silu(z); out_proj.

x_proj is token-wise, so it runs once on the raster tokens for all K directions (a batched einsum) and
``multi_direction_scan`` reads them through the scan-order table: a window scan's pad tokens are zero
inputs (LocalMamba pads after the conv2d, so x, and with it dt, B and C, are zero there) and the
output comes back in raster order. ``batched = False`` loops over the directions on permuted copies
instead (the original structure), kept as the test oracle and the benchmark baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.errors import UserError
from nas.models.mixed_scan import MultiScan
from nas.models.scattn import SCAttn
from nas.models.vim_mixer import a_log_init, dt_bias_init
from nas.ops import BACKENDS, DIRECTIONS, apply_scan, multi_direction_scan, scan_tables, selective_scan, undo_scan


class SS2D(nn.Module):
    """x (batch, H, W, d_model) channels-last -> (batch, H, W, d_model).

    directions: this block's directions (derived form) or None (search form: every candidate, alpha-weighted).
    """

    def __init__(self, d_model: int, directions=None, d_state: int = 16, ssm_ratio: float = 2.0, d_conv: int = 3,
                 scattn: str = "channel", backend: str = "auto", candidates=DIRECTIONS):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = Di = int(ssm_ratio * d_model)
        self.dt_rank = R = math.ceil(d_model / 16)
        if backend not in BACKENDS:
            raise UserError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.batched = True
        multi_scan = MultiScan(Di, directions, attn=SCAttn(Di, scattn), candidates=candidates)
        K = len(multi_scan.directions)
        self.out_norm = nn.LayerNorm(Di)
        self.in_proj = nn.Linear(d_model, 2 * Di, bias=False)
        self.conv2d = nn.Conv2d(Di, Di, d_conv, padding=(d_conv - 1) // 2, groups=Di)
        self.x_proj_weight = nn.Parameter(torch.stack([nn.Linear(Di, R + 2 * d_state, bias=False).weight
                                                       for _ in range(K)]))  # (K, R + 2N, Di)
        self.dt_projs_weight = nn.Parameter(torch.empty(K, Di, R).uniform_(-R ** -0.5, R ** -0.5))
        self.dt_projs_bias = nn.Parameter(torch.stack([dt_bias_init(Di) for _ in range(K)]))  # (K, Di)
        self.A_logs = nn.Parameter(a_log_init(Di, d_state).repeat(K, 1))  # (K * Di, N), direction-major
        self.Ds = nn.Parameter(torch.ones(K * Di))
        self.A_logs._no_weight_decay = self.Ds._no_weight_decay = True
        self.out_proj = nn.Linear(Di, d_model, bias=False)
        self.multi_scan = multi_scan

    @property
    def directions(self) -> tuple:
        return self.multi_scan.directions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, H, W, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2))).flatten(2)  # (batch, Di, L)
        ys = self._scan_batched(x, H, W) if self.batched else self._scan_loop(x, H, W)
        y = self.multi_scan.merge(self.multi_scan.attn(ys.transpose(2, 3)))  # (batch, L, Di)
        y = self.out_norm(y).view(batch, H, W, -1) * F.silu(z)
        return self.out_proj(y)

    def _scan_batched(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x (batch, Di, L) raster -> y (batch, K, Di, L) raster, all directions in one scan call."""
        batch, Di, L = x.shape
        N, R = self.d_state, self.dt_rank
        x_proj, dt_proj, dt_bias, A_log, Ds = self._direction_params()
        K = x_proj.shape[0]
        x_dbl = torch.einsum("bdl,kcd->bkcl", x, x_proj)
        dt, B, C = torch.split(x_dbl, [R, N, N], dim=2)
        dt = torch.einsum("bkrl,kdr->bkdl", dt, dt_proj)
        directions = tuple(self.directions[k] for k in self.multi_scan.slots())
        index, inverse = scan_tables(directions, H, W, x.device, trim_leading=True)
        return multi_direction_scan(x.unsqueeze(1).expand(batch, K, Di, L), dt, -torch.exp(A_log.float()), B, C,
                                    Ds.float(), None, dt_bias.float(), True, index=index, backend=self.backend,
                                    inverse=inverse)

    def _direction_params(self):
        """(x_proj (K, R+2N, Di), dt_proj (K, Di, R), dt bias (K, Di), A_log (K, Di, N), D (K, Di)) of the
        directions that run (all, or the active paths)."""
        K, Di = len(self.directions), self.d_inner
        params = (self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs.view(K, Di, -1),
                  self.Ds.view(K, Di))
        if self.multi_scan.active is None:
            return params
        slots = list(self.multi_scan.active)
        return tuple(p[slots] for p in params)

    def _scan_loop(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """One scan per direction over a permuted, zero-padded copy (LocalMamba's structure): the oracle."""
        Di, N, R = self.d_inner, self.d_state, self.dt_rank
        A = -torch.exp(self.A_logs.float()).view(-1, Di, N)
        Ds = self.Ds.float().view(-1, Di)
        outs = []
        for k in self.multi_scan.slots():
            direction = self.directions[k]
            xs = apply_scan(x, direction, H, W, layout="BCL")  # (batch, Di, S_k)
            dt, B, C = torch.split(torch.einsum("bds,cd->bcs", xs, self.x_proj_weight[k]), [R, N, N], dim=1)
            dt = torch.einsum("brs,dr->bds", dt, self.dt_projs_weight[k])
            y = selective_scan(xs, dt, A[k], B, C, Ds[k], None, self.dt_projs_bias[k].float(), True,
                               backend=self.backend)
            outs.append(undo_scan(y, direction, H, W, layout="BCL"))
        return torch.stack(outs, dim=1)
