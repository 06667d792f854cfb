"""Alpha bookkeeping of a search: probabilities per epoch, ``alphas.json``, TensorBoard and the heatmap."""
from __future__ import annotations

import json
import os

import torch

from nas.models import arch_parameters, derive_directions
from nas.ops import DIRECTIONS
from nas.viz import alpha_heatmap, save_figure


def layer_probs(model) -> list[list[float]]:
    """softmax(alpha) of every searched layer, (layers, 8), as plain floats."""
    return [a.detach().float().view(-1).softmax(0).tolist() for a in arch_parameters(model)]


def entropy_and_gap(probs: list[float], k: int = 4) -> tuple[float, float]:
    """Entropy (nats) of one layer's distribution, and the gap between its k-th and (k+1)-th probability."""
    p = torch.tensor(probs, dtype=torch.float64)
    entropy = -(p * p.clamp_min(1e-12).log()).sum().item()
    top = p.sort(descending=True).values
    return entropy, (top[k - 1] - top[k]).item() if k < len(probs) else top[-1].item()


class AlphaHistory:
    """The per-epoch record of every layer's probabilities; rank 0 writes it to ``alphas.json``."""

    def __init__(self, epochs=None):
        self.epochs = list(epochs or [])

    def record(self, epoch: int, probs: list[list[float]]) -> None:
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch] + [{"epoch": epoch, "probs": probs}]

    def to_json(self) -> dict:
        return {"directions": list(DIRECTIONS), "epochs": self.epochs}

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)


def report(logger, model, probs, epoch: int, run_dir: str, k: int = 4, stage_ends=None) -> dict:
    """TensorBoard scalars per layer and direction, the heatmap (TensorBoard and figures/alphas.png);
    returns the epoch's summary numbers for the log line."""
    scalars, entropies, gaps = {}, [], []
    for i, p in enumerate(probs):
        for name, value in zip(DIRECTIONS, p):
            scalars[f"alpha/layer{i:02d}/{name}"] = value
        entropy, gap = entropy_and_gap(p, k)
        scalars[f"alpha_entropy/layer{i:02d}"] = entropy
        scalars[f"alpha_gap/layer{i:02d}"] = gap
        entropies.append(entropy)
        gaps.append(gap)
    logger.scalars(scalars, epoch)
    if logger.enabled:
        kept = derive_directions(model, k=k)
        fig = alpha_heatmap(probs, kept, f"softmax(alpha), epoch {epoch}", stage_ends)
        logger.figure("alpha/heatmap", fig, epoch)
        os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
        save_figure(fig, os.path.join(run_dir, "figures", "alphas.png"))
    return {"alpha_entropy_mean": sum(entropies) / max(len(entropies), 1), "alpha_gap45_mean": sum(gaps) / max(len(gaps), 1)}
