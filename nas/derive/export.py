"""From a search run to an architecture: the top-k directions per layer, ``arch.yaml``, the printed table
and the Python-literal form, and the figures.

``arch.yaml`` (contract): ``{model: <derived model name>, source: <run folder>, epoch: <search epoch of the
alphas>, k: k, [candidates: [K names],] directions: [[k names] per layer], probs: [[K floats] per layer],
coinciding: [[[names of one scan]...] per layer], model_args: {...}}``, lists in candidate order. ``candidates``
is written only for a search space that names its own (``search.candidates``); without it the K = 8 columns
are LocalMamba's ``DIRECTIONS``.
``model_args`` carries the search's architecture overrides (depth, widths, ...) so that
``create_model(model, directions="runs/NAME/arch.yaml", **model_args)`` builds the searched network.
``coinciding`` lists, per layer, the candidates that are the same scan on that layer's token grid;
``distinct`` says whether the k kept ones had to be k different scans. Files written before ``epoch``,
``distinct`` and ``coinciding`` existed still load. Baselines (``nas.tune.baselines``) write the same format
through the same builder (``build_arch``), with a ``baseline`` key in place of ``epoch``, ``distinct`` and
``coinciding``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import yaml

from nas import config as cfglib
from nas.atomic import atomic_write
from nas.engine import checkpoint
from nas.engine.lock import lock_holder
from nas.engine.session import find_resume
from nas.errors import UserError
from nas.models import alpha_state_keys, check_candidates, create_model, derive_directions
from nas.models.registry import model_spec
from nas.models.search_space import AUTO, describe_k, kept_counts
from nas.ops import DIRECTIONS
from nas.search.alphas import coinciding_per_layer, layer_grids
from nas.search.run import supernet_args
from nas.search.strategies import STRATEGY_DEFAULTS
from nas.viz import (alpha_heatmap, alpha_history_figure, decimals_to_tell_apart, group_letters, save_figure,
                     scan_orders_figure, stage_ends)

# create_model options of a search run that describe the architecture (not training-only settings)
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "dims", "depths", "d_state", "expand", "ssm_ratio", "scattn",
             "mid_cls_token", "rope")


class DeriveError(UserError):
    """A run folder or arch file that cannot be derived from: one line, exit code 2."""


def derived_model_name(search_name: str) -> str:
    """The derived model of a search model: ``local_vim_tiny_search`` -> ``local_vim_tiny``."""
    name = search_name[: -len("_search")] if search_name.endswith("_search") else search_name
    try:
        spec = model_spec(name)
    except UserError:
        raise DeriveError(f"model: the search model {search_name!r} has no derived model {name!r}") from None
    if spec.search:
        raise DeriveError(f"model: {name!r} is a search model, not a derived one")
    return spec.name


def candidates_of(arch: dict) -> tuple[str, ...]:
    """The candidates an arch file's ``probs`` columns name (files of LocalMamba's 8 carry no ``candidates``)."""
    return tuple(arch.get("candidates") or DIRECTIONS)


def _read_history(path: str, candidates: tuple[str, ...]) -> dict | None:
    """alphas.json, checked against the run's candidates; None when it holds no epoch yet."""
    try:
        with open(path, "rb") as f:
            history = json.loads(f.read())
    except json.JSONDecodeError as exc:
        raise DeriveError(f"run: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise DeriveError(f"run: {path} is not valid JSON (it is not UTF-8 text)") from None
    written_by_search = isinstance(history, dict) and history.get("directions") == list(candidates) \
        and isinstance(history.get("epochs"), list)
    if written_by_search and history["epochs"]:
        try:
            probs = np.asarray([e["probs"] for e in history["epochs"]], dtype=float)
            written_by_search = probs.ndim == 3 and probs.shape[2] == len(candidates) and all(
                isinstance(e["epoch"], int) for e in history["epochs"])
        except (KeyError, TypeError, ValueError):
            written_by_search = False
    if not written_by_search:
        raise DeriveError(f"run: {path} is not an alphas.json written by search.py (expected directions "
                          f"{list(candidates)} and a list of epochs, each with an int epoch and one row of "
                          f"{len(candidates)} probabilities per layer)")
    return history if history["epochs"] else None


def read_run(run_dir: str) -> dict:
    """The search run's config, latest probabilities (and the epoch they are from), per-epoch history, and
    each layer's token grid and coinciding directions.

    Reads ``last.pt`` (its alphas) when present (when it is damaged, the checkpoint search.py resumes from, and
    ``warning`` says so), else the last epoch of ``alphas.json``; a run stopped inside an epoch is derived from
    the last finished epoch (``alphas.json``)."""
    if not os.path.isdir(run_dir):
        raise DeriveError(f"run: {run_dir!r} is not a folder")
    cfg_path, last, history_path = (os.path.join(run_dir, n) for n in ("config.yaml", "last.pt", "alphas.json"))
    if not os.path.isfile(cfg_path):
        what = "holds no config.yaml, last.pt or alphas.json" if not os.path.exists(last) and not \
            os.path.exists(history_path) else "has no config.yaml (without it the model and data are unknown)"
        raise DeriveError(f"run: {run_dir!r} {what}; is it a search run folder?")
    cfg = cfglib.load_yaml(cfg_path, "run")
    if not isinstance(cfg.get("model"), str):
        raise DeriveError(f"run: {cfg_path} is not a search config (expected a mapping with a 'model' name)")
    try:
        candidates = check_candidates((cfg.get("search") or {}).get("candidates"))
    except UserError as exc:
        raise DeriveError(f"run: {cfg_path}: {exc}") from None
    history = _read_history(history_path, candidates) if os.path.isfile(history_path) else None
    model_name, epoch, scores, warning = cfg["model"], None, None, None
    if os.path.isfile(last):
        try:
            state = checkpoint.load(last)
        except checkpoint.CheckpointError:  # the checkpoint search.py resumes from instead (prev.pt or best.pt)
            try:
                point = find_resume(run_dir)
            except UserError:  # every checkpoint damaged, truncated or foreign
                fallback = f"; move them away to derive from {history_path}" if history is not None else ""
                raise DeriveError(f"run: {last} could not be read as a checkpoint (damaged, truncated or not "
                                  f"written by search.py), nor prev.pt or best.pt{fallback}") from None
            state = point.state
            warning = (f"warning: {'; '.join(point.damaged)}; derived from {point.name} ({point.where}), the "
                       f"checkpoint search.py resumes from")
        model_name = state.get("model_name", model_name)
        loop = state.get("loop") or {}
        epoch = loop.get("epoch")
        if not loop.get("batch"):  # a checkpoint of a run stopped inside an epoch holds no epoch's alphas
            alphas = [state["model"][k].double().view(-1) for k in alpha_state_keys(state["model"])]
            if not alphas:
                raise DeriveError(f"run: {last!r} holds no alpha parameters; is it a search checkpoint?")
            scores = torch.stack(alphas)
    if scores is None and history is not None and epoch != 0:
        entries = [e for e in history["epochs"] if epoch is None or e["epoch"] == epoch]
        if entries:
            epoch = entries[-1]["epoch"]
            scores = torch.tensor(entries[-1]["probs"], dtype=torch.float64).clamp_min(1e-300).log()
    if scores is None or epoch == 0:
        if epoch:
            raise DeriveError(f"run: {history_path} holds no record of epoch {epoch}, the last one {last} finished")
        holder = lock_holder(run_dir)
        if holder is not None:
            raise DeriveError(f"run: {run_dir!r} has no finished search epoch yet: the search running in it (pid "
                              f"{holder}) writes last.pt and alphas.json when its first epoch ends; derive then")
        raise DeriveError(f"run: {run_dir!r} has no finished search epoch yet (last.pt and alphas.json are written "
                          f"when the first epoch ends); resume the search with the same search.py command")
    # alpha up to a constant, centred so that float32 ranking (derive_directions) keeps its small differences
    scores = scores - scores.mean(1, keepdim=True)
    try:
        model = create_model(model_name, **({"img_size": cfg["img_size"]} if "img_size" in cfg else {}),
                             **supernet_args(cfg))
    except UserError as exc:
        raise DeriveError(f"run: {cfg_path}: cannot build the searched model {model_name!r} ({exc})") from None
    grids = layer_grids(model)
    if len(grids) != scores.shape[0]:
        raise DeriveError(f"run: {run_dir!r} holds alphas of {scores.shape[0]} layers, but its model {model_name!r} "
                          f"has {len(grids)} searchable layers")
    if scores.shape[1] != len(candidates):
        raise DeriveError(f"run: {run_dir!r} holds alphas over {scores.shape[1]} candidates, but its config "
                          f"{cfg_path} names {len(candidates)} ({', '.join(candidates)})")
    return {"config": cfg, "model": model_name, "epoch": epoch, "candidates": candidates, "scores": scores,
            "probs": scores.softmax(1), "warning": warning,
            "history": history, "grids": grids, "coinciding": coinciding_per_layer(model)}


def _one_per_scan(scores: torch.Tensor, groups, k: int, grid, layer: int, candidates) -> torch.Tensor:
    """One layer's scores with every coinciding direction but its group's strongest made ineligible."""
    distinct = len(candidates) - sum(len(g) - 1 for g in groups)
    if k > distinct:
        raise DeriveError(f"--distinct: layer {layer} scans a {grid[0]} x {grid[1]} token grid, on which the "
                          f"{len(candidates)} candidates are {distinct} different scan{'s' if distinct > 1 else ''}; "
                          f"-k {k} asks for more")
    scores = scores.clone()
    for group in groups:
        members = [candidates.index(d) for d in group]
        strongest = max(members, key=lambda j: (scores[j].item(), -j))  # ties go to the lower index, as in top-k
        for j in members:
            if j != strongest:
                scores[j] = -torch.inf
    return scores


def searched_k(run: dict):
    """The k the run's search used (strategy.k): derive.py's default."""
    return (run["config"].get("strategy") or {}).get("k", STRATEGY_DEFAULTS["k"])


def make_arch(run: dict, run_dir: str, k, distinct: bool = False) -> dict:
    """The top-k directions per layer; with ``distinct``, the top-k among one direction per distinct scan.
    k: an int, one int per layer, or "auto" (the fewest directions holding the search's strategy.auto_mass)."""
    candidates, scores = run["candidates"], run["scores"]
    auto_mass = (run["config"].get("strategy") or {}).get("auto_mass", STRATEGY_DEFAULTS["auto_mass"])
    try:
        counts = kept_counts(k, run["probs"], len(candidates), auto_mass)
    except UserError as exc:
        raise DeriveError(f"-{exc}") from None  # "-k: expected ..."
    if distinct:
        scores = torch.stack([_one_per_scan(row, groups, 1 if k == AUTO else n, grid, i, candidates)
                              for i, (row, groups, grid, n)
                              in enumerate(zip(scores, run["coinciding"], run["grids"], counts))])
        if k == AUTO:  # the mass of the scans that stay candidates
            counts = kept_counts(k, scores.softmax(1), len(candidates), auto_mass)
    auto = {"auto_mass": auto_mass} if k == AUTO else {}
    return build_arch(run["config"], run["model"], k, derive_directions(scores, k=counts, candidates=candidates),
                      [[round(float(p), 9) for p in row] for row in run["probs"]], run_dir, epoch=run["epoch"],
                      distinct=distinct, **auto,
                      coinciding=[[list(g) for g in groups] for groups in run["coinciding"]])


def arch_model_args(search_cfg: dict, k) -> dict:
    """The derived model's create_model options: the search's architecture overrides and the scans per layer
    (one count, or one per layer)."""
    model_args = {key: v for key, v in (search_cfg.get("model_args") or {}).items() if key in ARCH_KEYS}
    model_args["scans_per_layer"] = k
    return model_args


def build_arch(search_cfg: dict, search_model: str, k, directions: list, probs: list, source: str,
               **fields) -> dict:
    """The one arch.yaml builder (derive.py's searched architectures and search.py --baseline's alike): the
    derived model of ``search_model`` running ``directions`` (k per layer) with the search config's
    architecture; ``fields`` adds the kind's own keys (epoch, distinct, coinciding / baseline, seed).
    k: the rule as asked (an int, one int per layer, or "auto"); the model's scans_per_layer counts the lists."""
    candidates = check_candidates((search_cfg.get("search") or {}).get("candidates"))
    named = {} if candidates == DIRECTIONS else {"candidates": list(candidates)}  # LocalMamba's 8 go unnamed
    return {"model": derived_model_name(search_model), "source": os.path.abspath(source), "k": k, **named,
            "directions": directions, "probs": probs,
            "model_args": arch_model_args(search_cfg, k if isinstance(k, int) else [len(d) for d in directions]),
            **fields}


def write_arch(arch: dict, path: str) -> None:
    with atomic_write(path) as f:
        yaml.safe_dump(arch, f, sort_keys=False, default_flow_style=None)


def _boundary(probs, kept, groups, distinct: bool, candidates) -> tuple[float, float] | None:
    """(weakest kept, strongest dropped) probability of one layer; with ``distinct`` a dropped direction that
    is the same scan as a kept one was never a candidate, so it does not count."""
    twins = {d for g in groups if set(g) & set(kept) for d in g} if distinct else set()
    dropped = [p for d, p in zip(candidates, probs) if d not in kept and d not in twins]
    if not dropped:
        return None
    return min(p for d, p in zip(candidates, probs) if d in kept), max(dropped)


def kept_rule(arch: dict) -> str:
    """How the kept directions were chosen, e.g. "top-4" (an arch file written by hand may lack k)."""
    k = arch.get("k", len(arch["directions"][0]) if arch.get("directions") else "?")
    return describe_k(k, arch.get("auto_mass", STRATEGY_DEFAULTS["auto_mass"]), bool(arch.get("distinct")))


def format_table(arch: dict) -> str:
    """One row per layer: each direction's probability, with as many decimals as it takes for every layer's
    weakest kept and strongest dropped value to differ; the kept ones starred, coinciding ones lettered."""
    probs, kept = arch["probs"], arch["directions"]
    coinciding = arch.get("coinciding") or [[] for _ in probs]
    distinct, candidates = bool(arch.get("distinct")), candidates_of(arch)
    pairs = [b for b in (_boundary(*layer, distinct, candidates) for layer in zip(probs, kept, coinciding))
             if b is not None]
    decimals = decimals_to_tell_apart(pairs)
    width = decimals + 4  # "0." + decimals + the kept star + the group letter
    header = ("layer " + " ".join(f"{d:>{width - 2}s}  " for d in candidates)).rstrip()
    rows = [header, "-" * len(header)]
    for i, (row, names, groups) in enumerate(zip(probs, kept, coinciding)):
        letters = group_letters(groups)
        cells = [f"{p:.{decimals}f}{'*' if d in names else ' '}{letters.get(d, ' ')}" for d, p in zip(candidates, row)]
        rows.append(f"{i:5d} " + " ".join(cells).rstrip())
    rows.append(f"(* = kept: the {kept_rule(arch)} of each layer)")
    if any(coinciding):
        rows.append("(a, b, ...: directions with the same letter are the same scan on that layer's token grid; "
                    "derive.py --distinct keeps only the strongest of them)" if not distinct else
                    "(a, b, ...: directions with the same letter are the same scan on that layer's token grid)")
    return "\n".join(rows)


def python_literal(arch: dict) -> str:
    """The lists in the form LocalMamba's model files take (``directions=[[...], ...]``)."""
    lines = ",\n".join("    [" + ", ".join(f"'{d}'" for d in layer) + "]" for layer in arch["directions"])
    return f"directions = [\n{lines},\n]"


def drawn_grid(grids: list[tuple[int, int]]) -> tuple[int, int]:
    """The token grid the scan drawings use: the largest one of the model's layers that a drawing can show
    (at most 16 tokens a side), else its smallest."""
    fitting = [g for g in grids if max(g) <= 16]
    return max(fitting, key=lambda g: g[0] * g[1]) if fitting else min(grids, key=lambda g: g[0] * g[1])


def draw_figures(arch: dict, history: dict | None, run_dir: str, grids: list[tuple[int, int]]) -> list[str]:
    """alphas.png, alpha_history.png (when the run kept a history) and scan_orders.png (on the token grid of the
    model's layers, ``drawn_grid``) under figures/, also added to the run's TensorBoard log. Returns the PNG
    paths."""
    from torch.utils.tensorboard import SummaryWriter

    folder = os.path.join(run_dir, "figures")
    os.makedirs(folder, exist_ok=True)
    figures = {"alphas": alpha_heatmap(arch["probs"], arch["directions"],
                                       f"softmax(alpha): {arch['model']}, kept {kept_rule(arch)} boxed",
                                       stage_ends(arch["model_args"].get("depths")
                                                  or model_spec(arch["model"]).defaults.get("depths")),
                                       coinciding=arch.get("coinciding"), candidates=candidates_of(arch)),
               "scan_orders": scan_orders_figure(*drawn_grid(grids), candidates=candidates_of(arch))}
    if history is not None:
        figures["alpha_history"] = alpha_history_figure(history["epochs"], arch["directions"],
                                                        candidates=candidates_of(arch))
    paths = []
    with SummaryWriter(os.path.join(run_dir, "tb")) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"derive/{name}", fig, close=False)
            path = os.path.join(folder, f"{name}.png")
            save_figure(fig, path)
            paths.append(path)
    return paths
