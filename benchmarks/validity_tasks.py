"""Image tasks whose best scan directions are known by construction, for bench_search_validity.py.

The network is a one-layer LocalVim whose readout is a class token inserted at scan position n // 2 of every
direction (``mid_cls_token``). Within one layer the scan is causal, so the class token sees only the tokens
that come before it in a direction's order: that direction's *prefix*. Each task puts its label (a colour)
in a region R of the token grid and grey noise everywhere else, and names the candidate scans its search
chooses from (LocalMamba's 8 unless it says otherwise). The expected set is the candidates whose prefix holds
R, read off the scan tables the model itself uses (``nas.ops.scan_tables``).

Two more conditions make the expectation sharp, and ``expected_directions`` checks both:
- no direction sees only part of R (else "can carry the label" would depend on how it is spread over R);
- every expected direction has a token of R among the last ``reach`` steps before the class token, the
  tokens its causal conv1d (width 4) hands to the class token directly. The state path reaches further
  only after training: the released init zeroes dt_proj's bias, so dt = softplus(0) = 0.69 and the state
  keeps at most exp(-0.69) = 0.5 of itself per step. Measured: a carrier whose R lies 10+ steps back stays
  at chance after 20 epochs, one with R in the conv window learns it in one epoch; a direction that can
  carry the label only that slowly would not be an answer the search could be expected to find.

The tasks are written as PNG files in the ImageFolder layout (``train/<colour>/*.png``, ``val/<colour>/*.png``)
and read back through ``--data <folder>``, like any user's data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch.nn as nn
from PIL import Image

from nas.models.local_vim import LocalVim
from nas.models.registry import register_model
from nas.ops import DIRECTIONS, scan_tables

PATCH = 4
# class names sort into the label order; the colours are far apart in RGB
COLOURS = {"blue": (40, 80, 230), "green": (40, 200, 40), "red": (230, 40, 40), "yellow": (230, 210, 40)}
NOISE_STD = 25.0          # pixel noise on every token, R included
BACKGROUND = (60, 190)    # grey level range of the tokens outside R (one level per token)


@dataclass(frozen=True)
class Task:
    name: str
    grid: int                            # grid x grid tokens of PATCH x PATCH pixels
    cells: tuple[tuple[int, int], ...]   # (row, col) of the tokens of R
    # the search's candidate scans (search.candidates), 8 like LocalMamba's so every task has the same budget;
    # they hold h, h_flip, v, v_flip, the benchmark's fixed baseline
    candidates: tuple[str, ...] = DIRECTIONS

    @property
    def img_size(self) -> int:
        return self.grid * PATCH


# Grids where the 8 orders are distinct (not 7 x 7: w7 == h there). R is one token: on 4 x 4 grids it lies
# exactly 2 steps before the class token in every expected direction, so none has an easier path to it than
# another; on 6 x 6, (2, 3) is the only token whose expected set has 4 directions (1 or 3 steps back).
TASKS = (
    Task("token_2_3_of_6x6", 6, ((2, 3),)),
    Task("token_1_2_of_4x4", 4, ((1, 2),)),
    Task("token_2_1_of_4x4", 4, ((2, 1),)),
)

# The answer is a new order: on 5 x 5 no LocalMamba direction (nor any registered order but hilbert, w4 and
# spiral_flip) visits the centre token before the class token, so LocalMamba's 8 cannot carry it at all.
# hilbert and w4 have it 2 steps back; spiral_flip (12 steps back, out of reach) is left out of the candidates,
# and snake_h and diag stand in as new orders that do not see it. No two of the candidates coincide on 5 x 5.
PLANTED = (
    Task("token_2_2_of_5x5", 5, ((2, 2),), ("h", "h_flip", "v", "v_flip", "snake_h", "diag", "hilbert", "w4")),
)


def prefixes(grid: int, candidates=DIRECTIONS) -> dict[str, list[int]]:
    """Per candidate, the raster indices of the tokens it scans before the class token, in scan order
    (pad steps dropped)."""
    cls = grid * grid // 2
    table, _ = scan_tables(tuple(candidates), grid, grid, "cpu", cls)
    # source index s holds raster token s below the class token, s - 1 above it; -1 is a pad step
    return {d: [s if s < cls else s - 1 for s in row[:cls] if s >= 0] for d, row in zip(candidates, table.tolist())}


def last_steps(grid: int, reach: int, candidates=DIRECTIONS) -> dict[str, set[int]]:
    """Per candidate, the raster tokens among its last ``reach`` scan steps before the class token."""
    cls = grid * grid // 2
    table, _ = scan_tables(tuple(candidates), grid, grid, "cpu", cls)
    return {d: {s if s < cls else s - 1 for s in row[cls - reach:cls] if s >= 0}
            for d, row in zip(candidates, table.tolist())}


def expected_directions(cells, grid: int, reach: int, candidates=DIRECTIONS) -> list[str]:
    """The candidates whose prefix holds every cell of R, in candidate order (see the module docstring
    for the two conditions checked; either failing raises ValueError)."""
    if not cells or not all(0 <= r < grid and 0 <= c < grid for r, c in cells):
        raise ValueError(f"cells: expected (row, col) pairs inside the {grid} x {grid} grid, got {cells}")
    region = {r * grid + c for r, c in cells}
    near = last_steps(grid, reach, candidates)
    carriers = []
    for direction, seen in prefixes(grid, candidates).items():
        seen = set(seen)
        if region <= seen:
            if not region & near[direction]:
                raise ValueError(f"cells: {direction} sees R, but no token of R lies in its last {reach} steps "
                                 f"before the class token")
            carriers.append(direction)
        elif region & seen:
            raise ValueError(f"cells: {direction} sees {len(region & seen)} of the {len(region)} tokens of R; "
                             f"choose R inside one class of equal visibility")
    return carriers


def task_image(task: Task, colour: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image: a grey level per token, the tokens of R in ``colour``, pixel noise over all."""
    tokens = rng.uniform(*BACKGROUND, size=(task.grid, task.grid, 1)).repeat(3, axis=2)
    for r, c in task.cells:
        tokens[r, c] = COLOURS[colour]
    pixels = tokens.repeat(PATCH, axis=0).repeat(PATCH, axis=1)
    pixels = pixels + rng.normal(0.0, NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def write_task(task: Task, root: str, train_per_class: int, val_per_class: int, seed: int) -> str:
    """Write the task as PNG files under ``root`` (ImageFolder layout); returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for colour in COLOURS:
            folder = os.path.join(root, split, colour)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                task_image(task, colour, rng).save(os.path.join(folder, f"{i:04d}.png"))
    return root


class PrefixOnlyVim(LocalVim):
    """LocalVim with SCAttn taken out of every mixer (the identity instead).

    SCAttn's channel branch scales each direction's outputs by a function of their mean over ALL tokens,
    so every direction would carry the label to the class token through that gate, whatever its prefix.
    Measured on a 6 x 6 task: the complement of the expected set reached 100% with it, chance without it.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for layer in self.layers:
            layer.mixer.attn = nn.Identity()


MODEL_ARGS = dict(patch_size=PATCH, embed_dim=16, depth=1, d_state=4, mid_cls_token=True, rope=False,
                  drop_path_rate=0.0)


def register_models() -> tuple[str, str]:
    """Register the supernet and its derived model; returns (search model, derived model). Not done at
    import: the test suite lists every registered model."""
    register_model("validity_vim_search", PrefixOnlyVim, **MODEL_ARGS)
    register_model("validity_vim", PrefixOnlyVim, directions=lambda: [["h", "h_flip", "v", "v_flip"]], **MODEL_ARGS)
    return "validity_vim_search", "validity_vim"
