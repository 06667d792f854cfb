"""Figures of a search: the layers x directions heatmap of softmax(alpha) with the kept directions marked."""
from __future__ import annotations

import itertools

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matplotlib.collections import LineCollection  # noqa: E402

from nas.ops import DIRECTIONS, scan_order  # noqa: E402


def stage_ends(depths) -> list[int] | None:
    """Layer counts at which each stage of a hierarchical model ends ([2, 2, 9, 2] -> [2, 4, 13, 15]); None
    for plain models (no depths)."""
    return list(itertools.accumulate(depths)) if depths else None


def alpha_heatmap(probs, kept, title: str = "softmax(alpha) per layer", stage_ends=None):
    """probs: (layers, 8) probabilities; kept: per-layer lists of direction names (marked with a box);
    stage_ends: layer counts after which a stage ends (LocalVMamba), drawn as lines. Returns a Figure."""
    probs = np.asarray(probs, dtype=float)
    layers = probs.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.32 * layers))
    image = ax.imshow(probs, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(probs.max(), 1e-6))
    ax.set_xticks(range(len(DIRECTIONS)), DIRECTIONS, rotation=45, ha="right")
    ax.set_yticks(range(layers), [str(i) for i in range(layers)])
    ax.set_xlabel("scan direction")
    ax.set_ylabel("layer")
    ax.set_title(title)
    for i, names in enumerate(kept):
        for name in names:
            j = DIRECTIONS.index(name)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.6))
    for end in stage_ends or []:
        if 0 < end < layers:
            ax.axhline(end - 0.5, color="red", linewidth=1.2)
    fig.colorbar(image, ax=ax, label="probability")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)


def alpha_history_figure(epochs: list[dict], title: str = "softmax(alpha) over the search"):
    """Small multiples, one panel per layer: each direction's probability against the epoch.

    epochs: the ``epochs`` list of ``alphas.json`` ({"epoch": e, "probs": [[8 floats] per layer]})."""
    xs = [e["epoch"] for e in epochs]
    probs = np.asarray([e["probs"] for e in epochs], dtype=float)  # (epochs, layers, 8)
    layers = probs.shape[1]
    cols = min(5, layers)
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.5, 2.6 * cols), 1.9 * rows + 1.2), sharex=True,
                             sharey=True, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for i, ax in enumerate(axes.flat):
        if i >= layers:
            ax.axis("off")
            continue
        for j, name in enumerate(DIRECTIONS):
            ax.plot(xs, probs[:, i, j], color=colors[j], linewidth=1.3, label=name, marker="." if len(xs) < 12 else None)
        ax.set_title(f"layer {i}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    top = 1 - 0.9 / fig.get_figheight()
    fig.suptitle(title, y=0.99, fontsize=10)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, top + 0.6 / fig.get_figheight()), ncol=4,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def scan_orders_figure(H: int = 14, W: int = 14):
    """The 8 candidate scans drawn on an H x W token grid: the path through the token centres, coloured from
    its first token (dark) to its last (yellow), a circle at the start and an arrow at the end."""
    fig, axes = plt.subplots(2, 4, figsize=(13, 7))
    for ax, name in zip(axes.flat, DIRECTIONS):
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
    fig.suptitle(f"the 8 candidate scans on a {H} x {W} token grid (red circle: first token, arrow: last token)")
    fig.tight_layout()
    return fig
