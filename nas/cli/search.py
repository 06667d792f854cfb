"""``search.py``: search the scan directions of a supernet on an image data set.

    python search.py                                          # search_spaces/demo.yaml on the demo digits
    python search.py -c search_spaces/localvim_t.yaml --data /imagenet --epochs 100 --out runs/vim_t
    torchrun --nproc_per_node 4 search.py -c search_spaces/localvim_t.yaml --data /imagenet
    python search.py --tune 20 | --baseline KIND | --compare   # nas.tune: a study, a baseline, a comparison

Everything lands in ``runs/NAME/`` (see the README). A run whose folder already holds ``last.pt``
continues from it (``--resume`` says so explicitly and fails when there is nothing to resume).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import yaml

from nas import config as cfglib
from nas.cli.command import launcher, run_command
from nas.engine.session import check_out_folder, find_resume, resume_changes, saved_config
from nas.errors import UserError
from nas.search.run import DEFAULT_CONFIG, RESUME_SAFE, SEARCH_DEFAULTS, SPACES, check_config, run_search, settle


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


def run_tune_command(args, cfg: dict, out: str) -> None:
    """--tune N, --baseline KIND or --compare (optuna is imported only when one is asked for)."""
    from nas.tune.baselines import run_baseline
    from nas.tune.compare import run_compare
    from nas.tune.study import run_study

    if args.tune is not None:
        best = run_study(cfg, out, args.tune, args.storage, args.study)
        value = "none completed" if best["value"] is None else f"{best['value']:.2f}"
        stopped = f" ({best['trials']['stopped']} stopped by a signal and queued again)" \
            if best["trials"].get("stopped") else ""
        print(f"study {best['study_name']!r}: {best['trials']['complete']} complete, {best['trials']['pruned']} "
              f"pruned, {best['trials']['fail']} failed{stopped}; best trial {best['best_trial']} ({value}) "
              f"{best['params']}\nwrote {out}/best.yaml")
    elif args.baseline is not None:
        print(f"wrote {run_baseline(args.baseline, cfg, out, args.storage, args.study)}")
    else:
        print(f"wrote {run_compare(cfg, out)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parse_args(argv)
    folder = {"out": None}  # known once the config is resolved; the stop messages name it

    def body():
        cfg, folder["out"] = resolve_config(args, rest)
        if args.show_config:
            print(yaml.safe_dump(cfg, sort_keys=False), end="")
        elif args.tune is not None or args.baseline or args.compare:
            run_tune_command(args, cfg, folder["out"])
        else:
            run_search(cfg, folder["out"])

    def kept():
        out = folder["out"]
        return f"; {out} keeps its last checkpoint" if out and os.path.isfile(os.path.join(out, "last.pt")) else ""

    def resume_hint():
        if args.tune is not None or args.baseline or args.compare:  # they continue their stopped trial themselves
            return f" (python search.py {shlex.join(argv)})"
        return f" ({launcher()} search.py --out {folder['out']} --resume)"

    return run_command("search.py", body, resume_hint=resume_hint, interrupted_note=kept)
