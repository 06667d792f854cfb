"""From a search run to an architecture: the top-k directions per layer, ``arch.yaml``, the printed table
and the Python-literal form, and the figures.

``arch.yaml`` (contract): ``{model: <derived model name>, source: <run folder>, k: k, directions: [[k names]
per layer], probs: [[8 floats] per layer], model_args: {...}}``, lists in DIRECTIONS order. ``model_args``
carries the search's architecture overrides (depth, widths, ...) so that
``create_model(model, directions="runs/NAME/arch.yaml", **model_args)`` builds the searched network.
"""
from __future__ import annotations

import json
import os

import torch
import yaml

from nas.engine import checkpoint
from nas.models import derive_directions
from nas.models.registry import model_spec
from nas.ops import DIRECTIONS
from nas.viz import alpha_heatmap, alpha_history_figure, save_figure, scan_orders_figure, stage_ends

# create_model options of a search run that describe the architecture (not training-only settings)
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "dims", "depths", "d_state", "expand", "ssm_ratio", "scattn",
             "mid_cls_token", "rope")


class DeriveError(ValueError):
    """A run folder or arch file that cannot be derived from: one line, exit code 2."""


def derived_model_name(search_name: str) -> str:
    """The derived model of a search model: ``local_vim_tiny_search`` -> ``local_vim_tiny``."""
    name = search_name[: -len("_search")] if search_name.endswith("_search") else search_name
    try:
        spec = model_spec(name)
    except ValueError:
        raise DeriveError(f"model: the search model {search_name!r} has no derived model {name!r}") from None
    if spec.search:
        raise DeriveError(f"model: {name!r} is a search model, not a derived one")
    return spec.name


def read_run(run_dir: str) -> dict:
    """The search run's config, final probabilities and per-epoch history.

    Reads ``last.pt`` (its alphas) when present, else the last epoch of ``alphas.json``."""
    if not os.path.isdir(run_dir):
        raise DeriveError(f"run: {run_dir!r} is not a folder")
    cfg_path, last, history_path = (os.path.join(run_dir, n) for n in ("config.yaml", "last.pt", "alphas.json"))
    if not os.path.isfile(last) and not os.path.isfile(history_path):
        raise DeriveError(f"run: {run_dir!r} holds neither last.pt nor alphas.json; is it a search run folder?")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
    history = None
    if os.path.isfile(history_path):
        with open(history_path) as f:
            history = json.load(f)
        if history.get("directions") != list(DIRECTIONS) or not history.get("epochs"):
            raise DeriveError(f"run: {history_path!r} is not an alphas.json written by search.py")
    model_name = cfg.get("model")
    if os.path.isfile(last):
        state = checkpoint.load(last)
        model_name = state.get("model_name", model_name)
        alphas = [v.float().view(-1) for k, v in state["model"].items() if k.endswith("multi_scan.weights")]
        if not alphas:
            raise DeriveError(f"run: {last!r} holds no alpha parameters; is it a search checkpoint?")
        probs = torch.stack(alphas).softmax(1)
    else:
        probs = torch.tensor(history["epochs"][-1]["probs"], dtype=torch.float64)
    if model_name is None:
        raise DeriveError(f"run: {run_dir!r} names no model (config.yaml is missing)")
    return {"config": cfg, "model": model_name, "probs": probs, "history": history}


def make_arch(run: dict, run_dir: str, k: int) -> dict:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(DIRECTIONS):
        raise DeriveError(f"-k: expected an int from 1 to {len(DIRECTIONS)}, got {k!r}")
    probs = run["probs"].double()
    directions = derive_directions(probs.clamp_min(1e-30).log(), k=k)  # ranking by p is ranking by alpha
    model_args = {key: v for key, v in (run["config"].get("model_args") or {}).items() if key in ARCH_KEYS}
    model_args["scans_per_layer"] = k
    return {"model": derived_model_name(run["model"]), "source": os.path.abspath(run_dir), "k": k,
            "directions": directions, "probs": [[round(float(p), 6) for p in row] for row in probs],
            "model_args": model_args}


def write_arch(arch: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(arch, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def format_table(arch: dict) -> str:
    """One row per layer: each direction's probability, the kept ones starred."""
    header = "layer " + " ".join(f"{d:>8s}" for d in DIRECTIONS)
    rows = [header, "-" * len(header)]
    for i, (probs, kept) in enumerate(zip(arch["probs"], arch["directions"])):
        cells = [f"{p:7.3f}{'*' if d in kept else ' '}" for d, p in zip(DIRECTIONS, probs)]
        rows.append(f"{i:5d} " + " ".join(cells))
    rows.append(f"(* = kept: the top-{arch['k']} of each layer)")
    return "\n".join(rows)


def python_literal(arch: dict) -> str:
    """The lists in the form LocalMamba's model files take (``directions=[[...], ...]``)."""
    lines = ",\n".join("    [" + ", ".join(f"'{d}'" for d in layer) + "]" for layer in arch["directions"])
    return f"directions = [\n{lines},\n]"


def draw_figures(arch: dict, history: dict | None, run_dir: str) -> list[str]:
    """alphas.png, alpha_history.png (when the run kept a history) and scan_orders.png under figures/,
    also added to the run's TensorBoard log. Returns the PNG paths."""
    from torch.utils.tensorboard import SummaryWriter

    folder = os.path.join(run_dir, "figures")
    os.makedirs(folder, exist_ok=True)
    figures = {"alphas": alpha_heatmap(arch["probs"], arch["directions"],
                                       f"softmax(alpha): {arch['model']}, kept top-{arch['k']} boxed",
                                       stage_ends(arch["model_args"].get("depths")
                                                  or model_spec(arch["model"]).defaults.get("depths"))),
               "scan_orders": scan_orders_figure()}
    if history is not None:
        figures["alpha_history"] = alpha_history_figure(history["epochs"])
    paths = []
    with SummaryWriter(os.path.join(run_dir, "tb")) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"derive/{name}", fig, close=False)
            path = os.path.join(folder, f"{name}.png")
            save_figure(fig, path)
            paths.append(path)
    return paths
