"""LocalVim: a plain (ViT-like) vision Mamba whose layers scan tokens in searched directions.

patch embedding (16 x 16 conv, images padded to a multiple of the patch) + absolute position
embedding; ``depth`` blocks of RMSNorm pre-norm -> LocalVimMixer with the residual kept in fp32 and
2-D RoPE applied to the hidden states and the residual before every block; final add + RMSNorm,
mean over tokens (or the middle class token), linear head. State_dict keys follow the released
LocalMamba checkpoints (``nas.models.checkpoint`` reads them in all their saved forms).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas.errors import UserError
from nas.models.arch import check_candidates, check_directions, published_directions
from nas.models.features import check_image, check_output_format, take_indices, to_format
from nas.models.layers import DropPath, RMSNorm
from nas.models.registry import register_model
from nas.models.vim_mixer import LocalVimMixer
from nas.ops import DIRECTIONS


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def resize_grid_embedding(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(old_h*old_w, C) per-token table -> (new_h*new_w, C), bicubic (as LocalMamba's detection backbone)."""
    if old == new:
        return table
    grid = table.reshape(1, *old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1).to(table.dtype)


def rope_tables(dim: int, grid: tuple[int, int], pt_seq_len: int = 14, theta: float = 10000.0):
    """EVA-02 style 2-D rotary tables (cos, sin), each (H*W, dim): the first half of the channels
    rotates with the row, the second half with the column; positions scaled to a pt_seq_len grid."""
    half = dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))

    def axis(n: int) -> torch.Tensor:
        t = torch.arange(n) / n * pt_seq_len
        return torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # (n, half)

    H, W = grid
    rows = axis(H)[:, None, :].expand(H, W, half)
    cols = axis(W)[None, :, :].expand(H, W, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(H * W, dim)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def resize_pos_embed(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int], mid_cls_token: bool = False):
    """(old_h*old_w [+1], C) position table -> (new_h*new_w [+1], C); the middle class token's entry is kept
    as it is and put back in the middle (position ``num_patches // 2``)."""
    if not mid_cls_token:
        return resize_grid_embedding(pos, old, new)
    c = (pos.shape[0] - 1) // 2
    patches = resize_grid_embedding(torch.cat([pos[:c], pos[c + 1:]]), old, new)
    c_new = patches.shape[0] // 2
    return torch.cat([patches[:c_new], pos[c:c + 1], patches[c_new:]])


class RotaryEmbedding2D(nn.Module):
    """Holds the rotary tables of the training grid as persistent buffers (keys ``freqs_cos``, ``freqs_sin``)."""

    def __init__(self, dim: int, grid: tuple[int, int], pt_seq_len: int = 14):
        super().__init__()
        self.grid = grid
        cos, sin = rope_tables(dim, grid, pt_seq_len)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def tables(self, grid: tuple[int, int]):
        return (resize_grid_embedding(self.freqs_cos, self.grid, grid),
                resize_grid_embedding(self.freqs_sin, self.grid, grid))

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin


class PatchEmbed(nn.Module):
    """Conv patchify; images are zero-padded at the bottom/right to a multiple of the patch size."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor):
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class VimBlock(nn.Module):
    """residual <- residual + drop_path(hidden) (fp32); hidden <- mixer(RMSNorm(residual))."""

    def __init__(self, dim: int, mixer: LocalVimMixer, drop_path: float = 0.0):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden, residual, grid):
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()
        return self.mixer(self.norm(residual), grid), residual


class LocalVim(nn.Module):
    CONFIG_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "d_state", "expand", "num_classes",
                   "drop_path_rate", "directions", "scans_per_layer", "mid_cls_token", "rope", "pt_seq_len",
                   "scattn", "backend", "candidates")

    def __init__(self, *, img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=20, d_state=16, expand=2,
                 num_classes=1000, drop_path_rate=0.1, directions=None, scans_per_layer=4, mid_cls_token=False,
                 rope=True, pt_seq_len=14, scattn="channel", backend="auto", candidates=None, model_name="local_vim"):
        super().__init__()
        if embed_dim % 4:
            raise UserError(f"embed_dim: expected a multiple of 4 (2-D RoPE splits it in rotating pairs), got {embed_dim}")
        if directions is not None:
            directions = check_directions(directions, depth, scans_per_layer, model_name)
        if directions is not None and candidates is not None:
            raise UserError("candidates: only a search model has candidates; a derived model runs its directions")
        candidates = check_candidates(candidates)
        self.model_name = model_name
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, d_state=d_state, expand=expand, num_classes=num_classes,
                           drop_path_rate=drop_path_rate, scans_per_layer=scans_per_layer,
                           directions=None if directions is None else [list(d) for d in directions],
                           mid_cls_token=mid_cls_token, rope=rope, pt_seq_len=pt_seq_len, scattn=scattn,
                           backend=backend, candidates=None if candidates == DIRECTIONS else list(candidates))
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.mid_cls_token = mid_cls_token
        img_h, img_w = _pair(img_size)
        self.grid = (-(-img_h // patch_size), -(-img_w // patch_size))
        num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if mid_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + mid_cls_token, embed_dim))
        self.rope = RotaryEmbedding2D(embed_dim, self.grid, pt_seq_len) if rope else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()  # LocalMamba's per-layer rule
        self.layers = nn.ModuleList(
            VimBlock(embed_dim, LocalVimMixer(embed_dim, None if directions is None else directions[i], d_state,
                                              expand=expand, scattn=scattn, backend=backend,
                                              mid_cls_token=mid_cls_token, candidates=candidates), dpr[i])
            for i in range(depth))
        self.drop_path = DropPath(drop_path_rate)
        self.norm_f = RMSNorm(embed_dim)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        # As the released code does (Vim's init): every Linear, dt_proj included, gets trunc_normal(0.02)
        # weights and zero biases, which overrides Mamba's dt init in the mixers.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer in self.layers:  # GPT-2 style: residual-path projections scaled by 1/sqrt(depth)
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(depth)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def directions(self) -> list[list[str]]:
        return [list(layer.mixer.directions) for layer in self.layers]

    def _pos_embed(self, grid) -> torch.Tensor:
        return resize_pos_embed(self.pos_embed[0], self.grid, grid, self.mid_cls_token)

    def _run(self, x: torch.Tensor, take=(), stop: int | None = None):
        """Embed and run layers 0 .. stop (all by default). Returns (hidden, residual, grid, class-token position,
        [hidden after each layer in ``take``]); hidden is the layer's mixer output (batch, L, C), the residual
        stream fp32."""
        x, grid = self.patch_embed(x)
        cls_position = x.shape[1] // 2  # the released rule: token_position = num_patches // 2
        if self.mid_cls_token:
            x = torch.cat([x[:, :cls_position], self.cls_token.expand(x.shape[0], -1, -1), x[:, cls_position:]], dim=1)
        hidden, residual = x + self._pos_embed(grid), None
        if self.rope is not None:
            cos, sin = self.rope.tables(grid)
            if self.mid_cls_token:  # the class token has no grid position: it is not rotated
                cos = torch.cat([cos[:cls_position], cos.new_ones(1, cos.shape[1]), cos[cls_position:]])
                sin = torch.cat([sin[:cls_position], sin.new_zeros(1, sin.shape[1]), sin[cls_position:]])
        taken = []
        for i, layer in enumerate(self.layers[: None if stop is None else stop + 1]):
            if self.rope is not None:
                hidden = self.rope.apply(hidden, cos, sin)
                residual = None if residual is None else self.rope.apply(residual, cos, sin)
            hidden, residual = layer(hidden, residual, grid)
            if i in take:
                taken.append(hidden)
        return hidden, residual, grid, cls_position, taken

    def _pool(self, hidden: torch.Tensor, residual: torch.Tensor, cls_position: int) -> torch.Tensor:
        hidden = self.norm_f(residual + self.drop_path(hidden))
        return hidden[:, cls_position] if self.mid_cls_token else hidden.mean(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> pooled features (batch, embed_dim)."""
        hidden, residual, _, cls_position, _ = self._run(x)
        return self._pool(hidden, residual, cls_position)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's forward_intermediates. (batch, 3, H, W) -> ([maps], pooled features (batch, C)), or the maps
        alone with ``intermediates_only``.

        A map is the hidden state a layer returns (its mixer's output, what LocalMamba's detection backbone
        takes) as (batch, C, ceil(H/patch), ceil(W/patch)) (NCHW) or channels-last (NHWC), without the middle
        class token; ``norm`` passes it through ``norm_f`` first. indices: None (every layer), the last n, or
        a list of layers. ``stop_early`` (implied by ``intermediates_only``) runs no layer after the last taken
        one; the pooled features are then those of the stream at that layer. ``head(pooled)`` is the logits.
        """
        check_image(x, self.patch_embed.patch_size, self.model_name, "patch")
        check_output_format(output_fmt)
        take = take_indices(self.num_layers, indices, "indices")
        stop = take[-1] if stop_early or intermediates_only else None
        hidden, residual, grid, cls_position, taken = self._run(x, take, stop)
        maps = []
        for h in taken:
            h = self.norm_f(h) if norm else h
            if self.mid_cls_token:
                h = torch.cat([h[:, :cls_position], h[:, cls_position + 1:]], dim=1)
            maps.append(to_format(h.reshape(h.shape[0], *grid, h.shape[-1]), output_fmt))
        if intermediates_only:
            return maps
        return maps, self._pool(hidden, residual, cls_position)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


_VIM_T = dict(patch_size=16, embed_dim=192, depth=20)
_VIM_DEMO = dict(img_size=28, patch_size=4, embed_dim=48, depth=4, num_classes=10, drop_path_rate=0.0)

register_model("local_vim_tiny", LocalVim, directions="local_vim_tiny", **_VIM_T)
register_model("local_vim_small", LocalVim, directions="local_vim_small", **{**_VIM_T, "embed_dim": 384})
register_model("local_vim_tiny_middle_cls_token", LocalVim, directions="local_vim_tiny", mid_cls_token=True,
               rope=False, **_VIM_T)
register_model("local_vim_tiny_search", LocalVim, **{**_VIM_T, "embed_dim": 128})
register_model("local_vim_demo", LocalVim, directions=lambda: published_directions("local_vim_tiny")[:4], **_VIM_DEMO)
register_model("local_vim_demo_search", LocalVim, **_VIM_DEMO)
