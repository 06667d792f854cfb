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

Tasks where random choices fail (``PAIRS``) need two directions together: R is two tokens, each within the
conv's reach of one direction only (the others see it 11 or more steps back, or not at all), and each carries one
bit of the label (blue or red: four classes, ``blue_red`` = R's first token blue, its second red). A set holding one
of the two directions reads one bit (50% at best), so the answer is the pair, k = 2, and a random 2-of-8 set holds
it once in C(8, 2) = 28 draws. Within one layer the directions' outputs are summed before the readout, so the
label cannot be one no single direction reads alone (a sum cannot compute an XOR): the bits are the honest form.

The tasks are written as PNG files in the ImageFolder layout (``train/<colour>/*.png``, ``val/<colour>/*.png``)
and read back through ``--data <folder>``, like any user's data.
"""
from __future__ import annotations

import inspect
import itertools
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
    bits: bool = False                   # each token of R carries one bit of the label (PAIRS), not the label

    @property
    def img_size(self) -> int:
        return self.grid * PATCH

    @property
    def classes(self) -> dict[str, tuple[tuple[int, int, int], ...]]:
        """Class name -> the colour of each token of R, in the order the class names sort (ImageFolder's labels)."""
        if not self.bits:
            return {name: (rgb,) * len(self.cells) for name, rgb in COLOURS.items()}
        combos = itertools.product(BITS, repeat=len(self.cells))
        return {"_".join(names): tuple(COLOURS[n] for n in names) for names in combos}


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


# The answer is a pair of directions on a 6 x 6 grid (cells within the conv's reach of one direction each, listed in
# ``pair_directions``'s order); neither pair is inside the fixed h, h_flip, v, v_flip.
PAIRS = (
    Task("pair_v_flip_w7_flip_6x6", 6, ((0, 3), (4, 4)), bits=True),  # 1 and 2 steps back; others 11+
    Task("pair_v_w7_flip_6x6", 6, ((4, 2), (4, 5)), bits=True),       # 2 and 3 steps back; others 9+
)
BITS = ("blue", "red")


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


def steps_back(grid: int, cell: tuple[int, int], candidates=DIRECTIONS) -> dict[str, int]:
    """Per candidate that scans ``cell`` before the class token: how many steps before it (1: just before)."""
    token = cell[0] * grid + cell[1]
    return {d: len(seen) - seen.index(token) for d, seen in prefixes(grid, candidates).items() if token in seen}


def pair_directions(cells, grid: int, reach: int, candidates=DIRECTIONS) -> list[str]:
    """For a task whose tokens of R carry one bit each: per token, the one candidate that has it within its last
    ``reach`` steps before the class token (ValueError when none or several do), in candidate order."""
    found = []
    for cell in cells:
        near = [d for d, back in steps_back(grid, cell, candidates).items() if back <= reach]
        if len(near) != 1:
            raise ValueError(f"cells: {cell} is within the last {reach} steps of {len(near)} candidates "
                             f"({', '.join(near) or 'none'}); a bit needs exactly one")
        found.append(near[0])
    if len(set(found)) != len(found):
        raise ValueError(f"cells: one direction ({found}) sees two tokens of R; each bit needs its own")
    return [d for d in candidates if d in found]


def task_answer(task: Task, reach: int) -> list[str]:
    """The task's expected set E: ``pair_directions`` for a task of bits, else ``expected_directions``."""
    find = pair_directions if task.bits else expected_directions
    return find(task.cells, task.grid, reach, task.candidates)


def task_image(task: Task, label: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``label``: a grey level per token, the tokens of R in the class's colours, pixel
    noise over all."""
    tokens = rng.uniform(*BACKGROUND, size=(task.grid, task.grid, 1)).repeat(3, axis=2)
    for (r, c), rgb in zip(task.cells, task.classes[label]):
        tokens[r, c] = rgb
    pixels = tokens.repeat(PATCH, axis=0).repeat(PATCH, axis=1)
    pixels = pixels + rng.normal(0.0, NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def write_task(task: Task, root: str, train_per_class: int, val_per_class: int, seed: int) -> str:
    """Write the task as PNG files under ``root`` (ImageFolder layout); returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in task.classes:
            folder = os.path.join(root, split, label)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                task_image(task, label, rng).save(os.path.join(folder, f"{i:04d}.png"))
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

    # the model checks read a constructor's defaults from its signature: LocalVim's, which this one takes
    __init__.__signature__ = inspect.signature(LocalVim.__init__)


MODEL_ARGS = dict(patch_size=PATCH, embed_dim=16, depth=1, d_state=4, mid_cls_token=True, rope=False,
                  drop_path_rate=0.0)


def register_models() -> tuple[str, str]:
    """Register the supernet and its derived model; returns (search model, derived model). Not done at
    import: the test suite lists every registered model."""
    register_model("validity_vim_search", PrefixOnlyVim, **MODEL_ARGS)
    register_model("validity_vim", PrefixOnlyVim, directions=lambda: [["h", "h_flip", "v", "v_flip"]], **MODEL_ARGS)
    return "validity_vim_search", "validity_vim"
