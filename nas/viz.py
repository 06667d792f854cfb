"""Figures of a search: the layers x directions heatmap of softmax(alpha) with the kept directions marked, the
probabilities over the epochs, and the 8 scan paths."""
from __future__ import annotations

import itertools
import string

import matplotlib
import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
import matplotlib.patheffects
import matplotlib.ticker
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from nas.atomic import atomic_write
from nas.ops import DIRECTIONS, scan_order


def _figure(**kwargs) -> Figure:
    """A figure drawn by Agg without pyplot, so that the user's matplotlib backend is left alone."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def stage_ends(depths) -> list[int] | None:
    """Layer counts at which each stage of a hierarchical model ends ([2, 2, 9, 2] -> [2, 4, 13, 15]); None
    for plain models (no depths)."""
    return list(itertools.accumulate(depths)) if depths else None


def decimals_to_tell_apart(pairs, lowest: int = 3, highest: int = 9) -> int:
    """The fewest decimals (from ``lowest`` to ``highest``) at which every pair (a, b) of numbers that differ
    at ``highest`` decimals prints as two different numbers."""
    pairs = [(a, b) for a, b in pairs if round(a, highest) != round(b, highest)]
    for decimals in range(lowest, highest):
        if all(f"{a:.{decimals}f}" != f"{b:.{decimals}f}" for a, b in pairs):
            return decimals
    return highest


def group_letters(groups) -> dict[str, str]:
    """{direction: letter} for one layer's groups of coinciding directions (first group "a", ...)."""
    return {name: string.ascii_lowercase[g] for g, names in enumerate(groups) for name in names}


def alpha_heatmap(probs, kept, title: str = "softmax(alpha) per layer", stage_ends=None, coinciding=None,
                  candidates=DIRECTIONS):
    """probs: (layers, K) probabilities of ``candidates``; kept: per-layer lists of direction names (marked with
    a box); stage_ends: layer counts after which a stage ends (LocalVMamba), drawn as lines; coinciding: per
    layer, groups of directions that are the same scan on that layer's grid (lettered cells). Returns a Figure.

    The colours diverge from 1/K (white: every probability before the search has learned anything), stretched
    to the largest deviation on each side, so that an early search whose probabilities are all within 1e-4 of
    1/K still shows which directions lead."""
    probs = np.asarray(probs, dtype=float)
    layers, candidates = probs.shape[0], list(candidates)
    uniform = 1 / len(candidates)
    spread = 1e-9  # TwoSlopeNorm needs vmin < 1/K < vmax, also for a layer of exactly uniform probabilities
    vmin, vmax = min(probs.min(), uniform - spread), max(probs.max(), uniform + spread)
    fig = _figure(figsize=(max(6.4, 0.4 * len(candidates) + 3.2), 1.4 + 0.32 * layers))
    ax = fig.subplots()
    image = ax.imshow(probs, cmap="RdBu_r", aspect="auto",
                      norm=matplotlib.colors.TwoSlopeNorm(vcenter=uniform, vmin=vmin, vmax=vmax))
    ax.set_xticks(range(len(candidates)), candidates, rotation=45, ha="right")
    ax.set_yticks(range(layers), [str(i) for i in range(layers)])
    ax.set_xlabel("scan direction")
    ax.set_ylabel("layer")
    ax.set_title(title)
    outline = [matplotlib.patheffects.withStroke(linewidth=3, foreground="white")]  # visible on every colour
    for i, names in enumerate(kept):
        for name in names:
            j = candidates.index(name)
            ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5,
                                       path_effects=outline))
    lettered = False
    for i, groups in enumerate(coinciding or []):
        for name, letter in group_letters(groups).items():
            ax.text(candidates.index(name), i, letter, ha="center", va="center", fontsize=8, path_effects=outline)
            lettered = True
    if lettered:
        ax.set_xlabel("scan direction (a, b: the same scan on that layer's grid)")
    for end in stage_ends or []:
        if 0 < end < layers:
            ax.axhline(end - 0.5, color="#2ca02c", linewidth=2.2)
    bar = fig.colorbar(image, ax=ax, label=f"probability (white: 1/{len(candidates)})")
    ticks = [vmin, uniform, vmax]
    decimals = decimals_to_tell_apart(zip(ticks, ticks[1:]))
    bar.set_ticks(ticks, labels=[f"{t:.{decimals}f}" for t in ticks])
    fig.tight_layout()
    return fig


def save_figure(fig, path: str) -> None:
    """Write a figure as PNG atomically, then close it (ours, or one pyplot made, as optuna's are)."""
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        if fig.canvas.manager is not None:  # only pyplot's figures have a manager, and pyplot is then loaded
            import matplotlib.pyplot as plt
            plt.close(fig)


def alpha_history_figure(epochs: list[dict], kept=None, title: str = "softmax(alpha) over the search",
                         candidates=DIRECTIONS):
    """Small multiples, one panel per layer: each candidate's probability against the epoch.

    epochs: the ``epochs`` list of ``alphas.json`` ({"epoch": e, "probs": [[K floats] per layer]}, columns
    ``candidates``); kept: per-layer lists of the kept directions, drawn solid (the others dashed and fainter)."""
    xs = [e["epoch"] for e in epochs]
    probs = np.asarray([e["probs"] for e in epochs], dtype=float)  # (epochs, layers, K)
    layers = probs.shape[1]
    cols = min(5, layers)
    rows = -(-layers // cols)
    fig = _figure(figsize=(max(6.5, 2.8 * cols), 2.0 * rows + 1.3))
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    colors = matplotlib.colormaps["tab10" if len(candidates) <= 10 else "tab20"].colors
    for i, ax in enumerate(axes.flat):
        if i >= layers:
            ax.axis("off")
            continue
        for j, name in enumerate(candidates):
            dropped = kept is not None and name not in kept[i]
            ax.plot(xs, probs[:, i, j], color=colors[j], marker="." if len(xs) < 12 else None,
                    linestyle="--" if dropped else "-", linewidth=1.0 if dropped else 1.8, alpha=0.6 if dropped else 1)
        ax.set_title(f"layer {i}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    # probabilities near 1/8 early in a search: full values (no "+1.25e-1" offset), few ticks, integer epochs
    first = axes.flat[0]
    first.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=5, integer=True))
    first.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=4))
    formatter = matplotlib.ticker.ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    first.yaxis.set_major_formatter(formatter)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    handles = [matplotlib.lines.Line2D([], [], color=colors[j], linewidth=1.8) for j in range(len(candidates))]
    height = fig.get_figheight()
    top = 1 - 0.6 / height  # room for the title and one legend row (inches)
    if kept is not None:
        title += " (solid: kept, dashed: dropped)"
    fig.suptitle(title, y=1 - 0.05 / height, fontsize=10)
    fig.legend(handles, list(candidates), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / height), ncol=8,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def scan_orders_figure(H: int = 14, W: int = 14, candidates=DIRECTIONS):
    """The candidate scans drawn on an H x W token grid, four per row: the path through the token centres,
    coloured from its first token (dark) to its last (yellow), a circle at the start and an arrow at the end."""
    rows = -(-len(candidates) // 4)
    fig = _figure(figsize=(13, 3.5 * rows))
    axes = fig.subplots(rows, 4, squeeze=False)
    for ax in axes.flat[len(candidates):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, candidates):
        order = scan_order(name, H, W)
        order = order[order >= 0].numpy()  # pad tokens hold no image content
        ys, xs = order // W, order % W
        segments = np.stack([np.stack([xs[:-1], ys[:-1]], 1), np.stack([xs[1:], ys[1:]], 1)], 1)
        lines = LineCollection(segments, cmap="viridis", linewidths=1.6)
        lines.set_array(np.arange(len(segments)))
        ax.add_collection(lines)
        ax.scatter(xs, ys, s=4, color="0.6", zorder=1)
        ax.scatter([xs[0]], [ys[0]], s=60, facecolors="none", edgecolors="red", linewidths=1.8, zorder=3)
        if len(xs) > 1:
            ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]),
                        arrowprops=dict(arrowstyle="->", color="red", lw=1.8))
        ax.set_xlim(-0.7, W - 0.3)
        ax.set_ylim(H - 0.3, -0.7)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name)
    fig.suptitle(f"the {len(candidates)} candidate scans on a {H} x {W} token grid (red circle: first token, "
                 f"arrow: last token)")
    fig.tight_layout()
    return fig
