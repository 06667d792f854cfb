"""``derive.py``: the architecture a search run found, its figures, and its retraining.

    python derive.py runs/NAME [-k 4] [--distinct]   # arch.yaml, the per-layer table, the Python lists, figures/
    python derive.py runs/NAME --retrain [--epochs N] [--data PATH|demo] [--out DIR] [--inherit] [--resume]
    python derive.py runs/NAME [--retrain ...] --export onnx   # model.onnx, checked in onnxruntime

User mistakes (a folder that is no search run, a damaged run file, a bad arch file, -k outside 1..8, an
unknown model, an arch.yaml older than the run's alphas) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

from nas import config as cfglib
from nas.cli.command import run_command
from nas.models.export_onnx import require_export_packages
from nas.derive.arch_file import baseline_config, check_arch, load_arch, stale_reason
from nas.derive.export import (DeriveError, draw_figures, format_table, kept_rule, make_arch, python_literal, read_run,
                               searched_k, write_arch)
from nas.derive.onnx_file import export_run
from nas.derive.retrain import (RETRAIN_DEFAULTS, check_retrain_config, retrain_config, retrained_directions,
                                run_retrain, search_data_named)



def k_argument(text: str):
    """-k: an int, one int per layer separated by commas (2,3,4,4), or auto."""
    if text == "auto":
        return text
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise argparse.ArgumentTypeError(f"expected an int, a comma-separated int per layer or auto, got {text!r}")
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def k_text(k) -> str:
    """A k as -k takes it."""
    return ",".join(map(str, k)) if isinstance(k, list) else str(k)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="derive.py", description="Derive the searched architecture, draw it, retrain it.",
                                epilog="With --retrain any retraining key can be overridden: --train.lr 5e-4, "
                                       "--model_args.drop_path_rate 0.2, train.ema_decay=0.9998.")
    p.add_argument("run", help="a search run folder (runs/NAME), or with --retrain a baseline's folder "
                               "(runs/NAME/baselines/KIND, written by search.py --baseline KIND)")
    p.add_argument("-k", type=k_argument, default=None,
                   help="directions kept per layer: an int (1 to the number of candidates), one per layer (2,3,4,4), or "
                        "auto (per layer the fewest holding strategy.auto_mass of its probability); default: the "
                        "search's strategy.k (4 in every shipped space), with --retrain what arch.yaml holds")
    p.add_argument("--distinct", action="store_true",
                   help="keep k different scans per layer: of directions that are the same scan on a layer's token "
                        "grid (w7 and h on 7 x 7 tokens) only the strongest counts (default: LocalMamba's top-k)")
    p.add_argument("--retrain", action="store_true", help="train the derived model and evaluate it")
    p.add_argument("--epochs", type=int, default=None, help="retraining epochs (overrides train.epochs)")
    p.add_argument("--data", default=None, help="retraining data: 'demo', an ImageFolder root or a file list")
    p.add_argument("--out", default=None, help="retraining folder (default RUN/retrain)")
    p.add_argument("--inherit", action="store_true", help="start from the supernet's weights of the kept directions")
    p.add_argument("--resume", action="store_true", help="continue the retraining in --out from its last.pt")
    p.add_argument("--export", choices=["onnx"], default=None,
                   help="also write the derived model as ONNX: the retrained weights to OUT/model.onnx when the "
                        "retraining folder OUT (--out, default RUN/retrain) holds them, else the freshly built model "
                        "to RUN/model.onnx")
    return p.parse_known_args(argv)


def read_run_warned(run_dir: str) -> dict:
    """``read_run``, saying on stderr when a damaged last.pt made it read the checkpoint before."""
    run = read_run(run_dir)
    if run["warning"]:
        print(f"derive.py: {run['warning']}", file=sys.stderr)
    return run


def derive(run_dir: str, k=None, distinct: bool = False) -> None:
    """Write RUN/arch.yaml and the figures; print the table and the lists."""
    if baseline_config(run_dir) is not None:
        raise DeriveError(f"run: {run_dir!r} is a baseline's folder: its arch.yaml was chosen without alphas, so there "
                          f"is nothing to derive; retrain it with python derive.py {run_dir} --retrain")
    run = read_run_warned(run_dir)
    publish(make_arch(run, run_dir, searched_k(run) if k is None else k, distinct), run, run_dir)


def publish(arch: dict, run: dict, run_dir: str) -> None:
    """Write arch.yaml and the figures of a derived architecture; print the table and the lists."""
    path = os.path.join(run_dir, "arch.yaml")
    write_arch(arch, path)
    figures = draw_figures(arch, run["history"], run_dir, run["grids"])
    print(f"derived {arch['model']} from {run['model']} at search epoch {arch['epoch']} "
          f"({len(arch['directions'])} layers, the {kept_rule(arch)} of each)\n")
    print(format_table(arch))
    print("\nas LocalMamba's Python lists:\n" + python_literal(arch))
    print(f"\nwrote {path}\nfigures: {', '.join(figures)}")


def prepare_retrain(args, rest) -> tuple[dict, str]:
    """The retraining config. A new retraining trains RUN/arch.yaml (derived first when missing; one edited by
    hand is used as it is) and refuses one derived from older alphas or with another -k / --distinct. A
    retraining folder that exists already continues (or reports) only the retraining asked for (--resume
    alone: the one it holds, whatever RUN/arch.yaml holds now)."""
    overrides = cfglib.parse_overrides(rest)
    if args.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = args.epochs
    if args.data is not None:
        overrides.setdefault("data", {})["path"] = args.data
    out = args.out or os.path.join(args.run, "retrain")
    saved = os.path.join(out, "config.yaml")
    begun = os.path.isfile(os.path.join(out, "last.pt")) and os.path.isfile(saved)
    if args.resume and not begun:
        raise DeriveError(f"--resume: {out!r} holds no last.pt to resume from")
    if begun:  # it continues with its own config; what the command asks must be what it trains
        if not (args.resume and args.k is None and not args.distinct and not args.inherit):
            same_retraining(cfglib.load_yaml(saved, "--out"), _asked_retraining(args, overrides, out)[0], out)
        return cfglib.merge(cfglib.load_yaml(saved, "--out"), overrides, "command line", RETRAIN_DEFAULTS), out
    cfg, publish_arch = _asked_retraining(args, overrides)
    if publish_arch is not None:
        check_retrain_config(cfg)  # bad retraining settings fail before arch.yaml and the figures are written
        publish_arch()
    return cfg, out


def _asked_retraining(args, overrides, begun: str | None = None) -> tuple[dict, Callable[[], None] | None]:
    """The config of the retraining the command asks for, and (when RUN/arch.yaml is to be derived first) the
    call that writes it and its figures. begun: the --out folder when it holds a retraining already."""
    arch_path = os.path.join(args.run, "arch.yaml")
    search_cfg = baseline_config(args.run)
    if search_cfg is not None:  # a baseline (search.py --baseline): its arch.yaml as it is, for its search config
        if args.k is not None or args.distinct:
            raise DeriveError(f"-k/--distinct: {arch_path} is a baseline's architecture; it keeps the directions it "
                              f"was chosen with")
        return retrain_config(load_arch(arch_path), arch_path, search_cfg, overrides, args.inherit), None
    run = read_run_warned(args.run)
    fresh = not os.path.isfile(arch_path)
    if fresh:
        arch = make_arch(run, args.run, searched_k(run) if args.k is None else args.k, args.distinct)
        check_arch(arch, arch["directions"], arch_path)
    else:
        arch = load_arch(arch_path)
        reason = stale_reason(arch, run, args.k, args.distinct)
        if reason:
            k = arch.get("k", searched_k(run)) if args.k is None else args.k
            again = f"python derive.py {args.run} -k {k_text(k)}" + \
                    (" --distinct" if args.distinct or (arch.get("distinct") and args.k is None) else "")
            then = "retrain" if begun is None else f"retrain with another --out ({begun} holds a retraining already)"
            raise DeriveError(f"arch: {arch_path} {reason}; derive it again ({again}) or delete it, then {then}")
    cfg = retrain_config(arch, arch_path, run["config"], overrides, args.inherit)
    return cfg, (lambda: publish(arch, run, args.run)) if fresh else None


def same_retraining(saved: dict, cfg: dict, out: str) -> None:
    """Refuse to continue (or report) the retraining in ``out`` when it trains another architecture, or starts
    from other weights, than the one asked for; the data and recipe are compared when it resumes."""
    differences = []
    if saved.get("search_epoch") != cfg["search_epoch"] and "search_epoch" in saved:
        differences.append(f"search epoch {saved['search_epoch']} there, {cfg['search_epoch']} now")
    if saved.get("directions") is not None and saved["directions"] != cfg["directions"]:
        layers = [f"layer {i}: {', '.join(a)} there, {', '.join(b)} now"
                  for i, (a, b) in enumerate(zip(saved["directions"], cfg["directions"])) if a != b]
        differences.append("; ".join(layers) or "another number of layers")
    if saved.get("inherit", False) != cfg["inherit"]:
        how = {False: "from scratch", True: "from the supernet's weights (--inherit)"}
        differences.append(f"{how[saved.get('inherit', False)]} there, {how[cfg['inherit']]} now")
    if differences:
        raise DeriveError(f"--out {out} holds a retraining of another architecture or start "
                          f"({'; '.join(differences)}); retrain into another folder with --out DIR, or delete {out}")


def main(argv=None) -> int:
    """Without --retrain: derive (always anew). With it: retrain RUN/arch.yaml (see ``prepare_retrain``)."""
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)

    def body():
        if args.export:
            require_export_packages()  # before any work
        if not args.retrain:
            if rest:
                raise DeriveError(f"arguments {' '.join(rest)}: overrides only apply with --retrain")
            derive(args.run, args.k, args.distinct)
        else:
            with search_data_named(args.run):
                cfg, out = prepare_retrain(args, rest)
                record = run_retrain(cfg, out)
            print(summary(cfg, record, args.run, out))
        if args.export:
            print(export_run(args.run, args.out or os.path.join(args.run, "retrain")))

    return run_command("derive.py", body)


def summary(cfg: dict, record: dict, run_dir: str, out: str) -> str:
    """What was retrained and how well, and where its figures and logs are (those that exist)."""
    directions = retrained_directions(cfg)
    layers = "\n".join(f"  layer {i:2d}: {', '.join(names)}" for i, names in enumerate(directions))
    kind = "searched directions kept" if baseline_config(run_dir) is None else "the baseline's directions"
    epochs = record["epoch"]
    lines = [f"\n=== summary ===\n{kind} per layer ({cfg['model']}):\n{layers}",
             f"retrained {cfg['model']}: val top-1 {record['val_top1']:.2f}%, top-5 {record['val_top5']:.2f}% "
             f"after {epochs} epoch{'' if epochs == 1 else 's'}"]
    folder = os.path.join(run_dir, "figures")
    figures = [n for n in ("alphas.png", "alpha_history.png", "scan_orders.png")
               if os.path.isfile(os.path.join(folder, n))]
    if figures:
        lines.append(f"figures: {os.path.join(folder, figures[0])}" + "".join(f", {n}" for n in figures[1:]))
    logs = [(what, path) for what, path in (("search", os.path.join(run_dir, "tb")),
                                            ("retraining", os.path.join(out, "tb"))) if os.path.isdir(path)]
    if len(logs) == 1:
        lines.append(f"logs: tensorboard --logdir {logs[0][1]} ({logs[0][0]})")
    elif logs:
        root = os.path.commonpath([os.path.abspath(p) for _, p in logs])
        root = run_dir if os.path.abspath(run_dir) == root else root
        lines.append(f"logs: tensorboard --logdir {root} (" + ", ".join(
            f"{what} in {os.path.relpath(path, root)}/" for what, path in logs) + ")")
    return "\n".join(lines)
