"""Alpha bookkeeping of a search: probabilities per epoch, ``alphas.json``, TensorBoard and the heatmap;
which candidate scans coincide on each layer's token grid."""
from __future__ import annotations

import json
import os
import re

import torch

from nas.atomic import atomic_write
from nas.errors import UserError
from nas.models import LocalVim, LocalVMamba, derive_directions, search_candidates, search_scans
from nas.models.search_space import AUTO_MASS, kept_counts
from nas.ops import DIRECTIONS
from nas.ops.directions import coinciding_directions
from nas.viz import alpha_heatmap, save_figure


def alpha_tag(layer: int, direction: str) -> str:
    """TensorBoard tag of one layer's probability of one direction (``alpha/layer00/w7_flip``)."""
    return f"alpha/layer{layer:02d}/{direction}"


def layer_grids(model) -> list[tuple[int, int]]:
    """The token grid (H, W) each searchable layer scans at the model's configured image size."""
    if isinstance(model, LocalVim):
        return [tuple(model.grid)] * model.num_layers
    if isinstance(model, LocalVMamba):
        size, patch = model.config["img_size"], model.config["patch_size"]
        h, w = (size, size) if isinstance(size, int) else size
        h, w = h // patch, w // patch  # the patch conv has no padding
        grids = []
        for depth in model.config["depths"]:
            grids += [(h, w)] * depth
            h, w = -(-h // 2), -(-w // 2)  # PatchMerging pads odd sizes
        return grids
    raise UserError(f"model: cannot tell which token grids {type(model).__name__} scans")


def coinciding_per_layer(model) -> list[tuple[tuple[str, ...], ...]]:
    """Per layer, the groups of candidate directions that scan its grid as the same sequence (see
    ``nas.ops.directions.coinciding_directions``; SS2D's pads reach the scan as zeros)."""
    zero_pads, candidates = isinstance(model, LocalVMamba), search_candidates(model)
    return [coinciding_directions(H, W, zero_pads, candidates) for H, W in layer_grids(model)]


def coincidence_note(model) -> str | None:
    """One log line naming the layers on which candidate scans coincide, or None when none do."""
    per_layer = list(zip(layer_grids(model), coinciding_per_layer(model)))
    parts, start = [], 0
    for i in range(1, len(per_layer) + 1):
        if i < len(per_layer) and per_layer[i] == per_layer[start]:
            continue
        (H, W), groups = per_layer[start]
        if groups:
            layers = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            same = ", ".join(" = ".join(g) for g in groups)
            parts.append(f"{layers} ({H} x {W} tokens): {same}")
        start = i
    if not parts:
        return None
    return ("note: some candidate scans are the same sequence on their layer's token grid, so the search splits one "
            f"scan's weight between their names: {'; '.join(parts)}. "
            "`derive.py RUN --distinct` keeps k distinct orders per layer.")


def write_tensorboard_layout(writer, num_layers: int, candidates=DIRECTIONS) -> None:
    """TensorBoard's Custom Scalars tab: one chart per layer holding its candidates' probabilities."""
    charts = {f"layer {i:02d}": ["Multiline", [f"^{re.escape(alpha_tag(i, d))}$" for d in candidates]]
              for i in range(num_layers)}
    writer.add_custom_scalars({"direction probabilities (softmax(alpha))": charts})


def layer_probs(model) -> list[list[float]]:
    """softmax(alpha) of every searched layer (its ``MultiScan.path_weights``), (layers, K), as plain floats."""
    return [m.path_weights().detach().float().tolist() for m in search_scans(model)]


def entropy_and_gap(probs: list[float], k: int = 4) -> tuple[float, float]:
    """Entropy (nats) of one layer's distribution, and the gap between its k-th and (k+1)-th probability."""
    p = torch.tensor(probs, dtype=torch.float64)
    entropy = -(p * p.clamp_min(1e-12).log()).sum().item()
    top = p.sort(descending=True).values
    return entropy, (top[k - 1] - top[k]).item() if k < len(probs) else top[-1].item()


class AlphaHistory:
    """The per-epoch record of every layer's probabilities over ``candidates``; rank 0 writes it to ``alphas.json``
    (``{"directions": [candidate names], "epochs": [{"epoch": int, "probs": [[K floats] per layer]}, ...]}``)."""

    def __init__(self, epochs=None, candidates=DIRECTIONS):
        self.candidates = list(candidates)
        self.epochs = list(epochs or [])

    def record(self, epoch: int, probs: list[list[float]]) -> None:
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch] + [{"epoch": epoch, "probs": probs}]

    def to_json(self) -> dict:
        return {"directions": self.candidates, "epochs": self.epochs}

    def write(self, path: str) -> None:
        with atomic_write(path) as f:
            json.dump(self.to_json(), f)


def report(logger, model, probs, epoch: int, run_dir: str, k=4, stage_ends=None, auto_mass: float = AUTO_MASS) -> dict:
    """TensorBoard scalars per layer and direction (charted per layer by ``write_tensorboard_layout``), the
    heatmap with coinciding scans marked (TensorBoard and figures/alphas.png); returns the epoch's summary
    numbers for the log line."""
    scalars, entropies, gaps, candidates = {}, [], [], search_candidates(model)
    counts = kept_counts(k, probs, len(candidates), auto_mass)  # strategy.k as an int, per layer, or auto
    for i, (p, k) in enumerate(zip(probs, counts)):
        for name, value in zip(candidates, p):
            scalars[alpha_tag(i, name)] = value
        entropy, gap = entropy_and_gap(p, k)
        scalars[f"alpha_entropy/layer{i:02d}"] = entropy
        scalars[f"alpha_gap/layer{i:02d}"] = gap
        entropies.append(entropy)
        gaps.append(gap)
    logger.scalars(scalars, epoch)
    if logger.enabled:
        kept = derive_directions(model, k=counts)
        fig = alpha_heatmap(probs, kept, f"softmax(alpha), epoch {epoch}", stage_ends,
                            coinciding=coinciding_per_layer(model), candidates=candidates)
        logger.figure("alpha/heatmap", fig, epoch)
        os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
        save_figure(fig, os.path.join(run_dir, "figures", "alphas.png"))
    return {"alpha_entropy_mean": sum(entropies) / max(len(entropies), 1), "alpha_gap45_mean": sum(gaps) / max(len(gaps), 1)}
