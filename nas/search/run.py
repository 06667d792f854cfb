"""``search.py``: search the scan directions of a supernet on an image data set.

    python search.py                                          # search_spaces/demo.yaml on the demo digits
    python search.py -c search_spaces/localvim_t.yaml --data /imagenet --epochs 100 --out runs/vim_t
    torchrun --nproc_per_node 4 search.py -c search_spaces/localvim_t.yaml --data /imagenet

Everything lands in ``runs/NAME/`` (see the README). A run whose folder already holds ``last.pt``
continues from it (``--resume`` says so explicitly and fails when there is nothing to resume).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from nas import config as cfglib
from nas.data import DATA_DEFAULTS, DataError, build_datasets, build_loader
from nas.engine.session import data_parallel, last_checkpoint, make_run_dir, run_in_process_group
from nas.engine.loop import TRAIN_DEFAULTS, NonFiniteLoss, fit
from nas.engine.run_log import RunLogger
from nas.models import arch_parameters, create_model, derive_directions, is_search_model
from nas.viz import stage_ends
from nas.errors import UserError
from nas.search.strategies import STRATEGY_DEFAULTS, check_strategy, create_strategy, strategy_class

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "search_spaces", "demo.yaml")

SEARCH_DEFAULTS = {
    "name": "search",
    "model": "local_vim_demo_search",
    "model_args": {},            # create_model overrides: drop_path_rate, scattn, backend, ...
    "img_size": 224,
    "seed": 0,
    "data": dict(DATA_DEFAULTS),
    "strategy": dict(STRATEGY_DEFAULTS),
    "train": dict(TRAIN_DEFAULTS),
    "log": {"tensorboard": True, "progress": True},
    "retrain": {},               # overrides of derive.py's retraining config (nas.derive.retrain), e.g. train.epochs
    "tune": {},                  # the Optuna search space of `search.py --tune` (nas.tune)
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="search.py", description="Search the scan directions of a vision Mamba supernet.",
                                epilog="Any config key can be overridden: --train.lr 3e-4, --strategy.name bilevel, "
                                       "data.num_classes=100.")
    p.add_argument("-c", "--config", default=None, help=f"search space YAML (default: {os.path.relpath(DEFAULT_CONFIG)})")
    p.add_argument("--data", default=None, help="'demo', an ImageFolder root or a file list (overrides data.path)")
    p.add_argument("--epochs", type=int, default=None, help="overrides train.epochs")
    p.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    tune = p.add_argument_group("tuning and baselines (nas.tune; settings in the config's tune: section)")
    mode = tune.add_mutually_exclusive_group()
    mode.add_argument("--tune", type=int, default=None, metavar="N",
                      help="run an Optuna study of N searches (trials in --out/trial_NNNN, summary in --out/best.yaml)")
    mode.add_argument("--baseline", choices=("fixed", "random", "published", "tpe"), default=None,
                      help="write a baseline architecture to --out/baselines/KIND/arch.yaml (tpe: a black-box study)")
    mode.add_argument("--compare", action="store_true",
                      help="search, run the baselines, retrain every candidate alike, write --out/compare.md")
    tune.add_argument("--storage", default=None, metavar="URL",
                      help="study storage: a database URL or a journal file (default: --out/study.journal)")
    tune.add_argument("--study", default=None, metavar="NAME", help="study name (default: the --out folder's name)")
    args, rest = p.parse_known_args(argv)
    if (args.storage or args.study) and args.tune is None and args.baseline != "tpe":
        p.error("--storage and --study go with --tune or --baseline tpe")
    if args.resume and (args.tune is not None or args.baseline or args.compare):
        p.error("--resume applies to a single search; a study, baseline or comparison resumes by itself")
    return args, rest


def resolve_config(args, rest) -> tuple[dict, str]:
    overrides = cfglib.parse_overrides(rest)
    if args.data is not None:
        overrides.setdefault("data", {})["path"] = args.data
    if args.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = args.epochs
    path = args.config or DEFAULT_CONFIG
    cfg = cfglib.resolve(SEARCH_DEFAULTS, path, overrides)
    out = args.out or os.path.join("runs", cfg["name"])
    saved = os.path.join(out, "config.yaml")
    if os.path.isfile(os.path.join(out, "last.pt")) and os.path.isfile(saved):
        # a resumed run keeps its own config; only what this command line says changes it
        cfg = cfglib.resolve(SEARCH_DEFAULTS, saved, overrides)
    elif args.resume:
        raise UserError(f"--resume: {out!r} holds no last.pt to resume from")
    epochs = cfg["train"]["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"train.epochs: expected an int >= 1, got {epochs!r}")
    if cfg["data"]["path"] is None:
        raise UserError("data.path: this search space names no data; pass --data /path/to/imagenet (or --data demo)")
    try:
        check_strategy(cfg["strategy"])
        search = is_search_model(cfg["model"])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not search:
        raise UserError(f"model: {cfg['model']!r} is a derived model; a search needs a search model "
                        f"(a name ending in _search)")
    return cfg, out


def run_search(cfg: dict, out: str, on_epoch=None) -> dict:
    """Run (or resume) a search; returns {"record": last epoch's log line, "directions": the top-k lists,
    "alphas": (layers, 8, 1, 1, 1) tensor}."""
    return run_in_process_group(cfg["train"]["device"], _run, cfg, out, on_epoch)


def _run(env, cfg: dict, out: str, on_epoch=None) -> dict:
    torch.manual_seed(cfg["seed"])
    train = cfg["train"]
    needs_heldout = strategy_class(cfg["strategy"]["name"]).needs_heldout
    if needs_heldout and not cfg["data"]["heldout_fraction"] and not cfg["data"]["heldout_path"]:
        cfg = copy.deepcopy(cfg)
        cfg["data"]["heldout_fraction"] = 0.5  # DARTS: half of the training images train alpha
    make_run_dir(out, env)
    try:  # mistakes in the data or the model settings surface here, before any training
        data = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"], out if env.is_main else None)
        model = create_model(cfg["model"], img_size=cfg["img_size"], num_classes=data.num_classes, **cfg["model_args"])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if needs_heldout and data.heldout is None:
        raise UserError(f"strategy.name: {cfg['strategy']['name']} needs a held-out split; set data.heldout_fraction")
    train_loader = build_loader(data.train, train["batch_size"], True, train["workers"], cfg["seed"])
    val_loader = build_loader(data.val, train["batch_size"], False, train["workers"], cfg["seed"])
    heldout_loader = None  # alpha's data (bilevel); val stays val, for the report and the choice of best.pt
    if needs_heldout:
        heldout_loader = build_loader(data.heldout, train["batch_size"], True, train["workers"], cfg["seed"] + 1)
    logger = RunLogger(out, env.is_main, cfg["log"]["tensorboard"], cfg["log"]["progress"])
    strategy = create_strategy(cfg["strategy"], model, train, cfg["seed"], logger, out,
                               stage_ends(model.config.get("depths")))
    if heldout_loader is not None:
        strategy.set_heldout(heldout_loader)
    train_model = data_parallel(model, env, find_unused_parameters=strategy.find_unused_parameters)
    optimizer = strategy.build_optimizer()
    if env.is_main:
        cfglib.save(cfg, os.path.join(out, "config.yaml"))
        logger.info(f"search {cfg['model']} ({strategy.name}) on {data.summary()}; writing to {out}")
    try:
        record = fit(strategy, model, train_model, optimizer, train_loader, val_loader, train, env, logger, out,
                     last_checkpoint(out), on_epoch=on_epoch, extra={"config": cfg, "model_name": cfg["model"]})
    finally:
        logger.close()
    directions = derive_directions(model, cfg["strategy"]["k"])
    logger.info(f"kept directions per layer (top-{cfg['strategy']['k']}):")
    for i, names in enumerate(directions):
        logger.info(f"  layer {i:2d}: {', '.join(names)}")
    return {"record": record, "directions": directions,
            "alphas": torch.stack([a.detach().cpu() for a in arch_parameters(model)])}


def main(argv=None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, out = resolve_config(args, rest)
        if args.tune is not None or args.baseline or args.compare:
            from nas.tune.cli import dispatch  # optuna is imported only when asked for
            dispatch(args, cfg, out)
        else:
            run_search(cfg, out)
    except (UserError, cfglib.ConfigError, DataError, NonFiniteLoss) as exc:
        print(f"search.py: error: {exc}", file=sys.stderr)
        return 2
    return 0
