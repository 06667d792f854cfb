"""``derive.py``: the architecture a search run found, its figures, and its retraining.

    python derive.py runs/NAME [-k 4]          # arch.yaml, the per-layer table, the Python lists, figures/
    python derive.py runs/NAME --retrain [--epochs N] [--data PATH|demo] [--out DIR] [--inherit] [--resume]

User mistakes (a folder that is no search run, a bad arch file, -k outside 1..8, an unknown model) print one
line and exit with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from nas import config as cfglib
from nas.derive.export import DeriveError, draw_figures, format_table, make_arch, python_literal, read_run, write_arch
from nas.derive.retrain import RETRAIN_DEFAULTS, retrain_config, run_retrain
from nas.engine.loop import NonFiniteLoss
from nas.models import check_directions, create_model
from nas.models.arch import read_arch_file


def parse_args(argv):
    p = argparse.ArgumentParser(prog="derive.py", description="Derive the searched architecture, draw it, retrain it.",
                                epilog="With --retrain any retraining key can be overridden: --train.lr 5e-4, "
                                       "--model_args.drop_path_rate 0.2, train.ema_decay=0.9998.")
    p.add_argument("run", help="a search run folder (runs/NAME)")
    p.add_argument("-k", type=int, default=4, help="directions kept per layer (1..8, default 4)")
    p.add_argument("--retrain", action="store_true", help="train the derived model and evaluate it")
    p.add_argument("--epochs", type=int, default=None, help="retraining epochs (overrides train.epochs)")
    p.add_argument("--data", default=None, help="retraining data: 'demo', an ImageFolder root or a file list")
    p.add_argument("--out", default=None, help="retraining folder (default RUN/retrain)")
    p.add_argument("--inherit", action="store_true", help="start from the supernet's weights of the kept directions")
    p.add_argument("--resume", action="store_true", help="continue the retraining in --out from its last.pt")
    return p.parse_known_args(argv)


def derive(run_dir: str, k: int, quiet: bool = False) -> tuple[dict, str]:
    """Write RUN/arch.yaml and the figures; print the table and the lists. Returns (arch, arch path)."""
    run = read_run(run_dir)
    arch = make_arch(run, run_dir, k)
    path = os.path.join(run_dir, "arch.yaml")
    write_arch(arch, path)
    figures = draw_figures(arch, run["history"], run_dir)
    if not quiet:
        print(f"derived {arch['model']} from {run['model']} ({len(arch['directions'])} layers, top-{k})\n")
        print(format_table(arch))
        print("\nas LocalMamba's Python lists:\n" + python_literal(arch))
        print(f"\nwrote {path}\nfigures: {', '.join(figures)}")
    return arch, path


def load_arch(arch_path: str) -> dict:
    """An arch file as the retraining reads it, checked against its model before any training."""
    with open(arch_path) as f:
        arch = yaml.safe_load(f)
    if not isinstance(arch, dict) or "model" not in arch:
        raise DeriveError(f"arch: {arch_path!r} is not an arch file (expected keys model, directions, ...)")
    arch.setdefault("model_args", {})
    arch.setdefault("source", os.path.dirname(os.path.abspath(arch_path)))
    directions = read_arch_file(arch_path)
    probe = create_model(arch["model"], directions=directions, **arch["model_args"])
    check_directions(directions, len(probe.directions), len(directions[0]) if directions else 0, arch["model"])
    return arch


def prepare_retrain(args, rest) -> tuple[dict, str]:
    arch_path = os.path.join(args.run, "arch.yaml")
    if not os.path.isfile(arch_path):
        derive(args.run, args.k)
    arch = load_arch(arch_path)
    overrides = cfglib.parse_overrides(rest)
    if args.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = args.epochs
    if args.data is not None:
        overrides.setdefault("data", {})["path"] = args.data
    out = args.out or os.path.join(args.run, "retrain")
    saved = os.path.join(out, "config.yaml")
    if os.path.isfile(os.path.join(out, "last.pt")) and os.path.isfile(saved):
        # a resumed run keeps its config
        return cfglib.merge(cfglib.load_yaml(saved), overrides, "command line", RETRAIN_DEFAULTS), out
    if args.resume:
        raise DeriveError(f"--resume: {out!r} holds no last.pt to resume from")
    return retrain_config(arch, arch_path, read_run(args.run)["config"], overrides, args.inherit), out


def main(argv=None) -> int:
    """Without --retrain: derive (always anew). With it: retrain from RUN/arch.yaml (derived first if missing;
    an arch file edited by hand is used as it is)."""
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.retrain:
            if rest:
                raise DeriveError(f"arguments {' '.join(rest)}: overrides only apply with --retrain")
            derive(args.run, args.k)
            return 0
        cfg, out = prepare_retrain(args, rest)
    except (cfglib.ConfigError, ValueError) as exc:  # DeriveError and DataError are ValueErrors
        print(f"derive.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        record = run_retrain(cfg, out)
    except (DeriveError, NonFiniteLoss) as exc:
        print(f"derive.py: error: {exc}", file=sys.stderr)
        return 2
    print(summary(load_arch(os.path.join(args.run, "arch.yaml")), record, args.run, out))
    return 0


def summary(arch: dict, record: dict, run_dir: str, out: str) -> str:
    layers = "\n".join(f"  layer {i:2d}: {', '.join(names)}" for i, names in enumerate(arch["directions"]))
    figures = os.path.join(run_dir, "figures")
    return (f"\n=== summary ===\nsearched directions kept per layer ({arch['model']}):\n{layers}\n"
            f"retrained {arch['model']}: val top-1 {record['val_top1']:.2f}%, top-5 {record['val_top5']:.2f}% "
            f"after {record['epoch']} epochs\n"
            f"figures: {figures}/alphas.png, alpha_history.png, scan_orders.png\n"
            f"logs: tensorboard --logdir {run_dir} (search in tb/, retraining in {os.path.relpath(out, run_dir)}/tb/)")
