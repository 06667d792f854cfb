"""``derive.py``: the architecture a search run found, its figures, and its retraining.

    python derive.py runs/NAME [-k 4] [--distinct]   # arch.yaml, the per-layer table, the Python lists, figures/
    python derive.py runs/NAME --retrain [--epochs N] [--data PATH|demo] [--out DIR] [--inherit] [--resume]

User mistakes (a folder that is no search run, a damaged run file, a bad arch file, -k outside 1..8, an
unknown model, an arch.yaml older than the run's alphas) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from nas import config as cfglib
from nas.data import DataError
from nas.derive.export import (DeriveError, draw_figures, format_table, kept_rule, make_arch, python_literal, read_run,
                               write_arch)
from nas.derive.retrain import RETRAIN_DEFAULTS, check_retrain_config, retrain_config, run_retrain
from nas.engine.loop import NonFiniteLoss
from nas.engine.preempt import Preempted
from nas.errors import UserError
from nas.models import check_directions, create_model
from nas.models.arch import read_arch_file

DEFAULT_K = 4


def parse_args(argv):
    p = argparse.ArgumentParser(prog="derive.py", description="Derive the searched architecture, draw it, retrain it.",
                                epilog="With --retrain any retraining key can be overridden: --train.lr 5e-4, "
                                       "--model_args.drop_path_rate 0.2, train.ema_decay=0.9998.")
    p.add_argument("run", help="a search run folder (runs/NAME)")
    p.add_argument("-k", type=int, default=None,
                   help=f"directions kept per layer (1..8; default {DEFAULT_K}, with --retrain what arch.yaml holds)")
    p.add_argument("--distinct", action="store_true",
                   help="keep k different scans per layer: of directions that are the same scan on a layer's token "
                        "grid (w7 and h on 7 x 7 tokens) only the strongest counts (default: LocalMamba's top-k)")
    p.add_argument("--retrain", action="store_true", help="train the derived model and evaluate it")
    p.add_argument("--epochs", type=int, default=None, help="retraining epochs (overrides train.epochs)")
    p.add_argument("--data", default=None, help="retraining data: 'demo', an ImageFolder root or a file list")
    p.add_argument("--out", default=None, help="retraining folder (default RUN/retrain)")
    p.add_argument("--inherit", action="store_true", help="start from the supernet's weights of the kept directions")
    p.add_argument("--resume", action="store_true", help="continue the retraining in --out from its last.pt")
    return p.parse_known_args(argv)


def derive(run_dir: str, k: int = DEFAULT_K, distinct: bool = False, quiet: bool = False) -> tuple[dict, str]:
    """Write RUN/arch.yaml and the figures; print the table and the lists. Returns (arch, arch path)."""
    run = read_run(run_dir)
    arch = make_arch(run, run_dir, k, distinct)
    return publish(arch, run, run_dir, quiet), os.path.join(run_dir, "arch.yaml")


def publish(arch: dict, run: dict, run_dir: str, quiet: bool = False) -> dict:
    """Write arch.yaml and the figures of a derived architecture; print the table and the lists."""
    path = os.path.join(run_dir, "arch.yaml")
    write_arch(arch, path)
    figures = draw_figures(arch, run["history"], run_dir)
    if not quiet:
        print(f"derived {arch['model']} from {run['model']} at search epoch {arch['epoch']} "
              f"({len(arch['directions'])} layers, the {kept_rule(arch)} of each)\n")
        print(format_table(arch))
        print("\nas LocalMamba's Python lists:\n" + python_literal(arch))
        print(f"\nwrote {path}\nfigures: {', '.join(figures)}")
    return arch


def check_arch(arch: dict, directions, arch_path: str) -> None:
    """Build the derived model once so that a bad arch fails before any training."""
    try:
        probe = create_model(arch["model"], directions=directions, **arch["model_args"])
        check_directions(directions, len(probe.directions), len(directions[0]) if directions else 0, arch["model"])
    except ValueError as exc:
        raise DeriveError(f"arch: {arch_path}: {exc}") from None


def load_arch(arch_path: str) -> dict:
    """An arch file as the retraining reads it, checked against its model before any training."""
    arch = cfglib.load_yaml(arch_path, "arch")
    if "model" not in arch:
        raise DeriveError(f"arch: {arch_path!r} is not an arch file (expected keys model, directions, ...)")
    arch.setdefault("model_args", {})
    arch.setdefault("source", os.path.dirname(os.path.abspath(arch_path)))
    try:
        directions = read_arch_file(arch_path)
    except ValueError as exc:
        raise DeriveError(str(exc)) from None
    check_arch(arch, directions, arch_path)
    return arch


def stale_reason(arch: dict, run: dict, k: int | None, distinct: bool) -> str | None:
    """Why an existing arch.yaml is not the architecture asked for from the run's latest alphas, or None."""
    held = f"the {kept_rule(arch)}"
    if "epoch" in arch:
        held += f" of search epoch {arch['epoch']}"
        if arch["epoch"] != run["epoch"]:
            return f"holds {held}, but the run's latest alphas are from epoch {run['epoch']}"
    else:  # written before arch files recorded their epoch: compare its probabilities (6 decimals then)
        probs = torch.tensor(arch.get("probs") or [], dtype=torch.float64)
        if probs.shape != run["probs"].shape or (probs - run["probs"]).abs().max() > 1e-6:
            return (f"holds {held} of other probabilities than the run's latest alphas (epoch {run['epoch']}); "
                    f"it was derived before arch files recorded their epoch")
    if k is not None and k != arch.get("k"):
        return f"holds {held}, but -k {k} was asked"
    if distinct and not arch.get("distinct"):
        return f"holds {held}, but --distinct was asked"
    return None


def prepare_retrain(args, rest) -> tuple[dict, str]:
    """The retraining config. A new retraining trains RUN/arch.yaml (derived first when missing; one edited by
    hand is used as it is) and refuses one derived from older alphas or with another -k / --distinct."""
    overrides = cfglib.parse_overrides(rest)
    if args.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = args.epochs
    if args.data is not None:
        overrides.setdefault("data", {})["path"] = args.data
    out = args.out or os.path.join(args.run, "retrain")
    saved = os.path.join(out, "config.yaml")
    if os.path.isfile(os.path.join(out, "last.pt")) and os.path.isfile(saved):
        # a resumed retraining keeps its config and the architecture it started with
        return cfglib.merge(cfglib.load_yaml(saved, "--out"), overrides, "command line", RETRAIN_DEFAULTS), out
    if args.resume:
        raise DeriveError(f"--resume: {out!r} holds no last.pt to resume from")
    run = read_run(args.run)
    arch_path = os.path.join(args.run, "arch.yaml")
    fresh = not os.path.isfile(arch_path)
    if fresh:
        arch = make_arch(run, args.run, DEFAULT_K if args.k is None else args.k, args.distinct)
        check_arch(arch, arch["directions"], arch_path)
    else:
        arch = load_arch(arch_path)
        reason = stale_reason(arch, run, args.k, args.distinct)
        if reason:
            again = f"python derive.py {args.run} -k {arch.get('k', DEFAULT_K) if args.k is None else args.k}" + \
                    (" --distinct" if args.distinct or (arch.get("distinct") and args.k is None) else "")
            raise DeriveError(f"arch: {arch_path} {reason}; derive it again ({again}) or delete it, then retrain")
    cfg = retrain_config(arch, arch_path, run["config"], overrides, args.inherit)
    if fresh:
        check_retrain_config(cfg)  # bad retraining settings fail before arch.yaml and the figures are written
        publish(arch, run, args.run)
    return cfg, out


def main(argv=None) -> int:
    """Without --retrain: derive (always anew). With it: retrain RUN/arch.yaml (see ``prepare_retrain``)."""
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.retrain:
            if rest:
                raise DeriveError(f"arguments {' '.join(rest)}: overrides only apply with --retrain")
            derive(args.run, DEFAULT_K if args.k is None else args.k, args.distinct)
            return 0
        cfg, out = prepare_retrain(args, rest)
        record = run_retrain(cfg, out)
    except Preempted as exc:  # before UserError, which it is
        print(f"derive.py: {exc}", file=sys.stderr)
        return exc.exit_code
    except (UserError, cfglib.ConfigError, DataError, NonFiniteLoss) as exc:
        print(f"derive.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        print("derive.py: interrupted", file=sys.stderr)
        return 130
    print(summary(load_arch(cfg["arch"]), record, args.run, out))
    return 0


def summary(arch: dict, record: dict, run_dir: str, out: str) -> str:
    layers = "\n".join(f"  layer {i:2d}: {', '.join(names)}" for i, names in enumerate(arch["directions"]))
    figures = os.path.join(run_dir, "figures")
    return (f"\n=== summary ===\nsearched directions kept per layer ({arch['model']}):\n{layers}\n"
            f"retrained {arch['model']}: val top-1 {record['val_top1']:.2f}%, top-5 {record['val_top5']:.2f}% "
            f"after {record['epoch']} epochs\n"
            f"figures: {figures}/alphas.png, alpha_history.png, scan_orders.png\n"
            f"logs: tensorboard --logdir {run_dir} (search in tb/, retraining in {os.path.relpath(out, run_dir)}/tb/)")
