"""A search run: the search config (defaults, checks, the settled form a run records) and ``run_search``.

``run_search(cfg, out)`` builds the data, the supernet and the strategy, trains them in ``out`` (resuming
what it holds) and returns the directions found. The command line is ``nas.cli.search``.
"""
from __future__ import annotations

import copy
import os

import torch

from nas import config as cfglib
from nas.data import DATA_DEFAULTS, build_datasets, build_loader, resolve_data_config
from nas.engine.loop import TRAIN_DEFAULTS, fit
from nas.engine.session import check_out_folder, data_parallel, find_resume, open_run, resume_changes, \
    run_in_process_group
from nas.engine.settings import LOG_CHECKS, LOG_DEFAULTS, check_train
from nas.errors import UserError
from nas.models import (arch_parameters, check_candidates, create_model, derive_directions, is_search_model,
                        search_candidates)
from nas.models.registry import model_spec
from nas.models.search_space import AUTO, describe_k
from nas.models.settings import check_model_args
from nas.search.alphas import coincidence_note, write_tensorboard_layout
from nas.search.stopping import STOP_DEFAULTS, check_stop
from nas.search.strategies import STRATEGY_DEFAULTS, check_strategy, create_strategy, strategy_class
from nas.viz import stage_ends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPACES = os.path.join(ROOT, "search_spaces")
DEFAULT_CONFIG = os.path.join(SPACES, "demo.yaml")

SEARCH_DEFAULTS = {
    "name": "search",
    "model": "local_vim_demo_search",
    "model_args": {},            # create_model overrides: drop_path_rate, scattn, backend, ...
    "search": {"candidates": None,  # the scan orders each layer chooses from (nas.ops registry); null: LocalMamba's 8
               "stop": dict(STOP_DEFAULTS)},  # the stopping rule (nas.search.stopping); off unless patience is set
    "img_size": 224,
    "seed": 0,
    "data": dict(DATA_DEFAULTS),
    "strategy": dict(STRATEGY_DEFAULTS),
    "train": dict(TRAIN_DEFAULTS),
    "log": dict(LOG_DEFAULTS),
    "retrain": {},               # overrides of derive.py's retraining config (nas.derive.retrain), e.g. train.epochs
    "tune": {},                  # the Optuna search space of `search.py --tune` (nas.tune)
}
SEARCH_CHECKS = {
    "name": cfglib.TEXT, "model": cfglib.TEXT, "model_args": cfglib.MAPPING, "img_size": cfglib.integer(1),
    "seed": cfglib.integer(0), "retrain": cfglib.MAPPING, "tune": cfglib.MAPPING, "search": cfglib.MAPPING,
    **LOG_CHECKS,
}
# besides nas.engine.session.SAFE_ON_RESUME: read by later commands, or (search.stop) where the run ends, not what
# its epochs compute
RESUME_SAFE = ("name", "retrain", "tune", "search.stop")


def check_config(cfg: dict) -> None:
    """Every setting of a search, type and range, before anything is built or written (one-line UserError)."""
    cfglib.validate(cfg, SEARCH_CHECKS)
    check_train(cfg["train"])
    check_strategy(cfg["strategy"])
    check_stop(cfg["search"].get("stop"))
    if cfg["data"]["path"] is None:
        raise UserError("data.path: this search space names no data; pass --data /path/to/imagenet (or --data demo)")
    resolve_data_config(cfg["data"])
    if cfg["data"]["num_classes"] == 1:  # the loss is 0 from the first step: nothing to learn
        raise UserError("data.num_classes: expected an int >= 2 (a search learns from telling classes apart), got 1")
    candidates = check_candidates(cfg["search"]["candidates"])
    k = cfg["strategy"]["k"]
    counts = [] if k == AUTO else k if isinstance(k, list) else [k]  # their number is checked with the model
    if max(counts, default=0) > len(candidates):
        raise UserError(f"strategy.k: expected an int from 1 to {len(candidates)} (the number of candidates), "
                        f"got {k}")
    if not is_search_model(cfg["model"]):
        raise UserError(f"model: {cfg['model']!r} is a derived model; a search needs a search model "
                        f"(a name ending in _search)")
    args, strategy = cfg["model_args"], cfg["strategy"]
    # the fewest directions a layer runs in a step: every candidate, unless the strategy runs fewer
    fewest = 1 if strategy["path_dropout"] else min(counts, default=1) \
        if strategy_class(strategy["name"]).samples_k_paths else None
    check_model_args(model_spec(cfg["model"]), args, "model_args.", given={
        "img_size": cfg["img_size"], "candidates": cfg["search"]["candidates"]}, set_elsewhere={
        "img_size": f"a search's image size is img_size; pass --img_size {args.get('img_size')}",
        "num_classes": f"a search's head has one output per class of its data; choose --data.num_classes "
                       f"{args.get('num_classes')} (or data.classes)",
        "candidates": "name a search space's candidates under search.candidates"},
        batch=cfg["train"]["batch_size"], directions=fewest, device=cfg["train"]["device"])


def supernet_args(cfg: dict) -> dict:
    """The create_model options of a search config's supernet: its model_args and the search space's
    candidates (a config saved before search.candidates existed searches LocalMamba's 8)."""
    candidates = (cfg.get("search") or {}).get("candidates")
    return {**(cfg.get("model_args") or {}), **({"candidates": candidates} if candidates is not None else {})}


def settle(cfg: dict) -> dict:
    """The config with the defaults that depend on other keys filled in (as the run records it)."""
    if strategy_class(cfg["strategy"]["name"]).needs_heldout and not cfg["data"]["heldout_fraction"] \
            and not cfg["data"]["heldout_path"]:
        cfg = copy.deepcopy(cfg)
        cfg["data"]["heldout_fraction"] = 0.5  # DARTS: half of the training images train alpha
    return cfg


def run_search(cfg: dict, out: str, on_epoch=None) -> dict:
    """Run (or resume) a search; returns {"record": last epoch's log line, "directions": the top-k lists,
    "alphas": (layers, 8, 1, 1, 1) tensor}."""
    check_config(cfg)
    check_out_folder(out)
    return run_in_process_group(cfg["train"]["device"], _run, cfg, out, on_epoch)


def _run(env, cfg: dict, out: str, on_epoch=None) -> dict:
    cfg = settle(cfg)
    resume_changes(find_resume(out) if os.path.isdir(out) else None, cfg, out, also_safe=RESUME_SAFE)
    torch.manual_seed(cfg["seed"])
    train = cfg["train"]
    needs_heldout = strategy_class(cfg["strategy"]["name"]).needs_heldout
    # mistakes in the data or the model settings surface here, before anything is written
    data = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"])
    model = create_model(cfg["model"], img_size=cfg["img_size"], num_classes=data.num_classes, **supernet_args(cfg))
    k, layers = cfg["strategy"]["k"], len(arch_parameters(model))
    if isinstance(k, list) and len(k) != layers:
        raise UserError(f"strategy.k: expected one int per searched layer ({layers} layers), got {k}")
    if needs_heldout and data.heldout is None:
        raise UserError(f"strategy.name: {cfg['strategy']['name']} needs a held-out split; set data.heldout_fraction")
    train_loader = build_loader(data.train, train["batch_size"], True, train["workers"], cfg["seed"])
    val_loader = build_loader(data.val, train["batch_size"], False, train["workers"], cfg["seed"])
    heldout_loader = None  # alpha's data (bilevel); val stays val, for the report and the choice of best.pt
    if needs_heldout:
        heldout_loader = build_loader(data.heldout, train["batch_size"], True, train["workers"], cfg["seed"] + 1)
    with open_run(out, env, cfg, data, also_safe=RESUME_SAFE) as run:
        strategy = create_strategy(cfg["strategy"], model, train, cfg["seed"], run.logger, out,
                                   stage_ends(model.config.get("depths")), cfg["search"].get("stop"))
        if heldout_loader is not None:
            strategy.set_heldout(heldout_loader)
        train_model = data_parallel(model, env, find_unused_parameters=strategy.find_unused_parameters,
                                    compile=cfg["train"].get("compile", False))
        optimizer = strategy.build_optimizer()
        run.logger.info(f"search {cfg['model']} ({strategy.name}) on {data.summary()}; writing to {out}")
        note = coincidence_note(model)
        if note:
            run.logger.info(note)
        if run.logger.tensorboard:
            run.logger.write_tensorboard(lambda w: write_tensorboard_layout(w, len(arch_parameters(model)),
                                                                                search_candidates(model)))
        record = fit(strategy, model, train_model, optimizer, train_loader, val_loader, train, env, run.logger, out,
                     run.resume, on_epoch=on_epoch, extra={"config": cfg, "model_name": cfg["model"]}, stop=run.stop)
        directions = derive_directions(model, k, auto_mass=cfg["strategy"]["auto_mass"])
        run.logger.info(f"kept directions per layer ({describe_k(k, cfg['strategy']['auto_mass'])}):")
        for i, names in enumerate(directions):
            run.logger.info(f"  layer {i:2d}: {', '.join(names)}")
    return {"record": record, "directions": directions,
            "alphas": torch.stack([a.detach().cpu() for a in arch_parameters(model)])}
