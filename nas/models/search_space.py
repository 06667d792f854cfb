"""Alpha (the architecture parameters) and the derivation of a final architecture from them.

Every searchable layer owns one ``MultiScan`` whose ``weights`` parameter (K, 1, 1, 1) is its alpha, one entry
per candidate scan (``search_candidates``: LocalMamba's 8 ``DIRECTIONS`` unless the search space names others)
(``alpha_state_keys`` says where they sit in a state_dict). Alphas are ordinary ``nn.Parameter``s, so DDP
synchronizes them; ``split_parameters`` separates them for their own optimizer group.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nas.errors import UserError
from nas.models.mixed_scan import MultiScan
from nas.ops import DIRECTIONS


def search_scans(model: nn.Module) -> list[MultiScan]:
    """The ``MultiScan`` of every searchable layer, in layer order; [] for derived models."""
    return [m for m in model.modules() if isinstance(m, MultiScan) and m.search]


def search_candidates(model: nn.Module) -> tuple[str, ...]:
    """The candidate scans of a search model (every searchable layer has the same list), in alpha order."""
    scans = search_scans(model)
    if not scans:
        name = getattr(model, "model_name", type(model).__name__)
        raise UserError(f"model: {name} has no alpha parameters (it is not a search model)")
    return scans[0].directions


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The alpha of every searchable layer, in layer order (one value per candidate); [] for derived models."""
    return [m.weights for m in search_scans(model)]


def alpha_state_keys(model_or_state) -> list[str]:
    """The state_dict keys of the layers' alphas, in layer order.

    model_or_state: a model (its ``MultiScan`` modules name the keys; a derived model names those of its
    supernet) or a search model's state_dict read without building the model (its keys that hold an alpha).
    """
    if isinstance(model_or_state, nn.Module):
        return [f"{name}.weights" for name, m in model_or_state.named_modules() if isinstance(m, MultiScan)]
    return [k for k in model_or_state if k.endswith("multi_scan.weights")]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, alphas): every trainable parameter except the alphas, and the alphas in layer order."""
    alphas = arch_parameters(model)
    alpha_ids = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if id(p) not in alpha_ids]
    return weights, alphas


def set_active_paths(model: nn.Module, paths) -> nn.Module:
    """Make every searchable layer run only some of its directions on the next forwards (sampled search).

    paths: one collection of distinct candidate indices per searchable layer (layer order, as
    ``arch_parameters``), or None to run all directions again. Inactive directions' scans are not
    computed (their weights get no gradient); the merge renormalizes softmax(alpha) over the active ones.
    """
    scans = search_scans(model)
    if paths is None:
        for m in scans:
            m.active = None
        return model
    paths = list(paths)
    if len(paths) != len(scans):
        raise ValueError(f"paths: expected one index list per searchable layer ({len(scans)}), got {len(paths)}")
    checked = []
    for i, (p, m) in enumerate(zip(paths, scans)):
        idx = [int(v) for v in (p.reshape(-1).tolist() if isinstance(p, torch.Tensor) else p)]
        K = len(m.directions)
        if not idx or len(set(idx)) != len(idx) or not all(0 <= v < K for v in idx):
            raise ValueError(f"paths[{i}]: expected distinct direction indices in 0..{K - 1}, got {idx}")
        checked.append(tuple(sorted(idx)))
    for m, idx in zip(scans, checked):
        m.active = idx
    return model


def set_batched(model: nn.Module, batched: bool = True) -> nn.Module:
    """Switch every mixer between the one-call batched scan (default) and the per-direction loop."""
    for m in model.modules():
        if hasattr(m, "batched") and hasattr(m, "multi_scan"):
            m.batched = batched
    return model


def _alpha_rows(model_or_alphas, K: int) -> list[torch.Tensor]:
    if isinstance(model_or_alphas, nn.Module):
        alphas = arch_parameters(model_or_alphas)
    elif isinstance(model_or_alphas, torch.Tensor):
        alphas = list(model_or_alphas.reshape(-1, K)) if model_or_alphas.dim() > 0 else [model_or_alphas]
    else:
        alphas = list(model_or_alphas)
    rows = []
    for i, a in enumerate(alphas):
        a = torch.as_tensor(a).detach().float().reshape(-1)
        if a.numel() != K:
            raise ValueError(f"alphas[{i}]: expected {K} values (one per candidate), got {a.numel()}")
        rows.append(a.cpu())
    return rows


AUTO = "auto"  # k per layer from the alphas: the fewest directions whose probabilities sum to auto_mass
AUTO_MASS = 0.5  # auto's default share of a layer's probability: at a uniform 1/8 it keeps LocalMamba's 4


def _is_count(v, K: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= K


def fixed_counts(k, layers: int, K: int) -> list[int]:
    """k as an int (every layer) or one int per layer, checked against K candidates: one count per layer."""
    if isinstance(k, (list, tuple)):
        if len(k) != layers or not all(_is_count(v, K) for v in k):
            raise UserError(f"k: expected one int from 1 to {K} per layer ({layers} layers), got {list(k)!r}")
        return list(k)
    if not _is_count(k, K):
        raise UserError(f"k: expected an int from 1 to {K}, got {k!r}")
    return [k] * layers


def kept_counts(k, probs, K: int, auto_mass: float = AUTO_MASS) -> list[int]:
    """How many directions each layer keeps. probs: (layers, K) probabilities (one row per layer).

    k: an int (every layer), a list of ints (one per layer; ``fixed_counts``), or ``"auto"``: per layer the fewest of its most
    probable directions whose probabilities sum to at least ``auto_mass`` (FairDARTS-style: a layer whose
    alpha is decided keeps one, an undecided one keeps several; at uniform 1/8 and 0.5 that is LocalMamba's 4).
    """
    if k == AUTO:
        if isinstance(auto_mass, bool) or not isinstance(auto_mass, (int, float)) or not 0 < auto_mass <= 1:
            raise UserError(f"auto_mass: expected a number in (0, 1], got {auto_mass!r}")
        counts = []
        for row in probs:
            top = torch.as_tensor(row, dtype=torch.float64).sort(descending=True).values.cumsum(0)
            # a tolerance for the rounding of the cumulative sum (uniform 1/8 x 4 must reach 0.5)
            counts.append(min(K, int((top < auto_mass - 1e-12).sum()) + 1))
        return counts
    return fixed_counts(k, len(probs), K)


def describe_k(k, auto_mass: float = AUTO_MASS, distinct: bool = False) -> str:
    """What a k keeps, in words: "top-4", "top-k (k = 2, 3, 4 in layer order)", "fewest directions holding 50%
    of the probability"; read after "the" and before "of each layer"."""
    if k == AUTO:
        return f"fewest {'distinct scans' if distinct else 'directions'} holding {auto_mass:.0%} of the probability"
    if isinstance(k, (list, tuple)):
        counts = f"(k = {', '.join(map(str, k))} in layer order)"
        return f"k strongest distinct scans {counts}" if distinct else f"top-k {counts}"
    return f"{k} strongest distinct scans" if distinct else f"top-{k}"


def derive_directions(model_or_alphas, k=4, candidates=DIRECTIONS, auto_mass: float = AUTO_MASS) -> list[list[str]]:
    """Per layer, the k candidates with the largest softmax(alpha), written in candidate order.

    model_or_alphas: a search model (its own candidates), or a list of alpha tensors (one value per candidate)
    or a (layers, K) tensor whose columns are ``candidates``.
    k: an int, one int per layer, or "auto" (``kept_counts``).
    Ties are broken deterministically in favour of the lower candidate index.
    """
    if isinstance(model_or_alphas, nn.Module):
        candidates = search_candidates(model_or_alphas)
    if isinstance(k, int) and not _is_count(k, len(candidates)):  # before the alphas: the message names k alone
        raise UserError(f"k: expected an int from 1 to {len(candidates)}, got {k!r}")
    rows = _alpha_rows(model_or_alphas, len(candidates))
    counts = kept_counts(k, [r.double().softmax(0) for r in rows], len(candidates), auto_mass)
    derived = []
    for alpha, count in zip(rows, counts):
        # softmax is monotonic: ranking alpha itself avoids ties that rounding of the softmax would create
        order = torch.sort(alpha, descending=True, stable=True).indices[:count]
        derived.append([candidates[i] for i in sorted(order.tolist())])
    return derived
