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
import yaml

from nas import config as cfglib
from nas.data import DATA_DEFAULTS, build_datasets, build_loader, resolve_data_config
from nas.engine.loop import TRAIN_DEFAULTS, NonFiniteLoss, fit
from nas.engine.preempt import Preempted
from nas.engine.session import (check_out_folder, data_parallel, find_resume, open_run, resume_changes,
                                run_in_process_group, saved_config)
from nas.engine.settings import LOG_CHECKS, LOG_DEFAULTS, check_train
from nas.models import arch_parameters, create_model, derive_directions, is_search_model
from nas.viz import stage_ends
from nas.errors import UserError
from nas.search.alphas import coincidence_note, write_tensorboard_layout
from nas.search.strategies import STRATEGY_DEFAULTS, check_strategy, create_strategy, strategy_class

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPACES = os.path.join(ROOT, "search_spaces")
DEFAULT_CONFIG = os.path.join(SPACES, "demo.yaml")

SEARCH_DEFAULTS = {
    "name": "search",
    "model": "local_vim_demo_search",
    "model_args": {},            # create_model overrides: drop_path_rate, scattn, backend, ...
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
    "seed": cfglib.integer(0), "retrain": cfglib.MAPPING, "tune": cfglib.MAPPING, **LOG_CHECKS,
}
RESUME_SAFE = ("name", "retrain", "tune")  # besides nas.engine.session.SAFE_ON_RESUME: read by later commands


def check_config(cfg: dict) -> None:
    """Every setting of a search, type and range, before anything is built or written (one-line UserError)."""
    cfglib.validate(cfg, SEARCH_CHECKS)
    check_train(cfg["train"])
    check_strategy(cfg["strategy"])
    if cfg["data"]["path"] is None:
        raise UserError("data.path: this search space names no data; pass --data /path/to/imagenet (or --data demo)")
    resolve_data_config(cfg["data"])
    try:
        search = is_search_model(cfg["model"])
    except ValueError as exc:  # an unknown model name
        raise UserError(str(exc)) from None
    if not search:
        raise UserError(f"model: {cfg['model']!r} is a derived model; a search needs a search model "
                        f"(a name ending in _search)")


def settle(cfg: dict) -> dict:
    """The config with the defaults that depend on other keys filled in (as the run records it)."""
    if strategy_class(cfg["strategy"]["name"]).needs_heldout and not cfg["data"]["heldout_fraction"] \
            and not cfg["data"]["heldout_path"]:
        cfg = copy.deepcopy(cfg)
        cfg["data"]["heldout_fraction"] = 0.5  # DARTS: half of the training images train alpha
    return cfg


def parse_args(argv):
    spaces = ", ".join(cfglib.list_spaces(SPACES))
    p = argparse.ArgumentParser(prog="search.py", description="Search the scan directions of a vision Mamba supernet.",
                                epilog=f"Search spaces (-c NAME): {spaces}. Any config key can be overridden: "
                                       "--train.lr 3e-4, --strategy.name bilevel, data.num_classes=100; "
                                       "--show-config prints every key with its value.")
    p.add_argument("-c", "--config", default=None,
                   help=f"a search space name or YAML file (default: {os.path.relpath(DEFAULT_CONFIG)})")
    p.add_argument("--show-config", action="store_true", help="print the resolved config (every key) and exit")
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
                      help="study storage: a database URL (default: sqlite:///OUT/study.db, a SQLite file in --out; a "
                           "server such as postgresql://user@host/db for workers on several machines), or an "
                           "existing SQLite or journal file")
    tune.add_argument("--study", default=None, metavar="NAME", help="study name (default: the --out folder's name)")
    args, rest = p.parse_known_args(argv)
    if (args.storage or args.study) and args.tune is None and args.baseline != "tpe":
        p.error("--storage and --study go with --tune or --baseline tpe")
    if args.resume and (args.tune is not None or args.baseline or args.compare):
        p.error("--resume applies to a single search; a study, baseline or comparison resumes by itself")
    return args, rest


def resolve_config(args, rest) -> tuple[dict, str]:
    """The config this command asks for, checked; for a run folder holding a checkpoint, the checkpoint's
    config with this command's changes, refused if they are not safe for a resume. Writes nothing."""
    overrides = cfglib.parse_overrides(rest)
    if args.data is not None:
        overrides.setdefault("data", {})["path"] = args.data
    if args.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = args.epochs
    path = cfglib.find_config(args.config, SPACES) if args.config else DEFAULT_CONFIG
    cfg = cfglib.resolve(SEARCH_DEFAULTS, path, overrides)
    out = args.out or os.path.join("runs", cfg["name"])
    if args.show_config:
        return cfg, out
    check_out_folder(out)
    point = find_resume(out) if os.path.isdir(out) else None
    if point is not None and not args.config:
        # a resumed run keeps its own config; only what this command line says changes it
        cfg = cfglib.merge(cfglib.merge(SEARCH_DEFAULTS, saved_config(point, out), "the run's config"), overrides,
                           "command line", schema=SEARCH_DEFAULTS)
    elif point is None and args.resume:
        raise UserError(f"--resume: {out!r} holds no last.pt to resume from")
    check_config(cfg)
    resume_changes(point, settle(cfg), out, also_safe=RESUME_SAFE)
    return cfg, out


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
    try:  # mistakes in the data or the model settings surface here, before anything is written
        data = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"])
        model = create_model(cfg["model"], img_size=cfg["img_size"], num_classes=data.num_classes, **cfg["model_args"])
    except ValueError as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc)) from None
    if needs_heldout and data.heldout is None:
        raise UserError(f"strategy.name: {cfg['strategy']['name']} needs a held-out split; set data.heldout_fraction")
    train_loader = build_loader(data.train, train["batch_size"], True, train["workers"], cfg["seed"])
    val_loader = build_loader(data.val, train["batch_size"], False, train["workers"], cfg["seed"])
    heldout_loader = None  # alpha's data (bilevel); val stays val, for the report and the choice of best.pt
    if needs_heldout:
        heldout_loader = build_loader(data.heldout, train["batch_size"], True, train["workers"], cfg["seed"] + 1)
    with open_run(out, env, cfg, data, also_safe=RESUME_SAFE) as run:
        strategy = create_strategy(cfg["strategy"], model, train, cfg["seed"], run.logger, out,
                                   stage_ends(model.config.get("depths")))
        if heldout_loader is not None:
            strategy.set_heldout(heldout_loader)
        train_model = data_parallel(model, env, find_unused_parameters=strategy.find_unused_parameters)
        optimizer = strategy.build_optimizer()
        run.logger.info(f"search {cfg['model']} ({strategy.name}) on {data.summary()}; writing to {out}")
        note = coincidence_note(model)
        if note:
            run.logger.info(note)
        if run.logger.tensorboard:
            run.logger.write_tensorboard(lambda w: write_tensorboard_layout(w, len(arch_parameters(model))))
        record = fit(strategy, model, train_model, optimizer, train_loader, val_loader, train, env, run.logger, out,
                     run.resume, on_epoch=on_epoch, extra={"config": cfg, "model_name": cfg["model"]}, stop=run.stop)
        directions = derive_directions(model, cfg["strategy"]["k"])
        run.logger.info(f"kept directions per layer (top-{cfg['strategy']['k']}):")
        for i, names in enumerate(directions):
            run.logger.info(f"  layer {i:2d}: {', '.join(names)}")
    return {"record": record, "directions": directions,
            "alphas": torch.stack([a.detach().cpu() for a in arch_parameters(model)])}


def main(argv=None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    out = None
    try:
        cfg, out = resolve_config(args, rest)
        if args.show_config:
            print(yaml.safe_dump(cfg, sort_keys=False), end="")
        elif args.tune is not None or args.baseline or args.compare:
            from nas.tune.cli import dispatch  # optuna is imported only when asked for
            dispatch(args, cfg, out)
        else:
            run_search(cfg, out)
    except Preempted as exc:  # before UserError, which it is
        print(f"search.py: {exc} (python search.py --out {out} --resume)", file=sys.stderr)
        return exc.exit_code
    except (UserError, NonFiniteLoss) as exc:
        print(f"search.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        kept = f"; {out} keeps its last checkpoint" if out and os.path.isfile(os.path.join(out, "last.pt")) else ""
        print(f"search.py: interrupted{kept}", file=sys.stderr)
        return 130
    return 0
