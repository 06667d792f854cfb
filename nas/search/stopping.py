"""The search's stopping rule (``search.stop``): end when the derived architecture has settled.

After epoch e the rule reads the alpha history (``alphas.json``'s per-epoch probabilities) and stops when
- e >= ``min_epochs``;
- the derived architecture (every layer's kept set, as ``derive.py`` takes it: strategy.k as an int, one int
  per layer or ``auto``) is the same at epochs e - patience, ..., e (it has not changed for ``patience`` epochs);
- every layer's margin, its weakest kept probability minus its strongest dropped one, is at least
  ``min_margin`` at epoch e.

The decision is a function of the history alone, so a resumed run takes it again from its checkpoint's history:
the same settings keep a stopped run stopped, a larger ``patience`` (or ``patience: null``) lets it continue as if
it had never stopped. Off by default (``patience: null``): LocalMamba's fixed schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nas import config as cfglib
from nas.models import derive_directions

STOP_DEFAULTS = {
    "patience": None,    # epochs the derived architecture must hold unchanged; null: no stopping rule
    "min_margin": 0.01,  # every layer's weakest kept minus strongest dropped probability, at least this
    "min_epochs": 2,     # never stop before this many epochs
}
STOP_CHECKS = {
    "patience": cfglib.integer(1).or_none("no stopping rule"),
    "min_margin": cfglib.number(0, 1),
    "min_epochs": cfglib.integer(1),
}


def check_stop(cfg: dict | None) -> None:
    """One-line UserError for a bad ``search.stop`` section."""
    cfglib.validate(stop_settings(cfg), STOP_CHECKS, "search.stop.")


def stop_settings(cfg: dict | None) -> dict:
    """``search.stop`` with its defaults (a config saved before it existed has none: no stopping)."""
    return {**STOP_DEFAULTS, **(cfg or {})}


def margins(probs: list[list[float]], kept: list[list[int]]) -> list[float]:
    """Per layer, the weakest kept probability minus the strongest dropped one (the weakest kept one when a
    layer keeps every candidate). probs: (layers, K); kept: per layer, the kept candidate indices."""
    out = []
    for row, keep in zip(probs, kept):
        dropped = [p for i, p in enumerate(row) if i not in keep]
        out.append(min(row[i] for i in keep) - max(dropped, default=0.0))
    return out


def kept_sets(probs: list[list[float]], k, candidates, auto_mass: float) -> list[list[int]]:
    """Per layer, the indices of the candidates ``derive.py`` keeps (``derive_directions`` on log p: the same
    ranking as on alpha, whose softmax p is)."""
    rows = torch.tensor(probs, dtype=torch.float64).clamp_min(1e-300).log()
    names = derive_directions(rows, k, tuple(candidates), auto_mass)
    return [[candidates.index(n) for n in layer] for layer in names]


@dataclass(frozen=True)
class StopState:
    """Where the rule stands after an epoch: stable = epochs the derived architecture has held unchanged."""

    epoch: int
    stable: int
    margins: list[float]
    stop: bool


def stop_state(epochs: list[dict], settings: dict, k, candidates, auto_mass: float) -> StopState | None:
    """The rule after the last epoch of ``epochs`` (AlphaHistory's ``[{"epoch", "probs"}, ...]``, in order);
    None before the first epoch."""
    if not epochs:
        return None
    arches = [kept_sets(e["probs"], k, candidates, auto_mass) for e in epochs]
    stable = 0
    while stable + 1 < len(arches) and arches[-2 - stable] == arches[-1]:
        stable += 1
    last = epochs[-1]
    gaps = margins(last["probs"], arches[-1])
    patience = settings["patience"]
    stop = (patience is not None and last["epoch"] >= settings["min_epochs"] and stable >= patience
            and min(gaps) >= settings["min_margin"])
    return StopState(last["epoch"], stable, gaps, stop)
