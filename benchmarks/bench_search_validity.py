"""Does the search find the right directions? Tasks with a known answer (benchmarks/validity_tasks.py).

Per task: the expected set E (the task's candidate scans whose prefix before the class token holds the label
region) and its premise (E and its complement retrained alike: E should reach high accuracy, the complement
chance); every strategy searched over the task's candidates with several seeds (is E the |E| most probable
candidates? the probability mass on E); the equal-budget comparison: each strategy's derived top-4, a random
4-of-8 set of the candidates (one draw per seed) and the fixed set h, h_flip, v, v_flip, each retrained with one
recipe over the same seeds, mean +- std of val top-1.

The default tasks search LocalMamba's 8 (the record bench_search_validity_cpu.json); the planted task
(``--tasks token_2_2_of_5x5``, recorded in bench_search_validity_planted_cpu.json) searches 8 scans of which
only new orders carry its label; the pair tasks (``PAIRS``) need two directions together, so a random draw
mostly fails (their premise: every 2-of-8 set retrained once).

Each search keeps k = |E| directions, ends by the stopping rule (``search.stop``, ``STOP``; ``--no-stop``: all
``--search-epochs``) and records its compute per epoch (path-steps: training images x layers x paths run) and the
epoch from which its derived set was E and stayed E; ``--schedule`` adds LocalMamba's schedule (joint, every path
in every step, all epochs, no stopping rule) for the compute it takes to the answer. ``--no-retrain``: searches only.

Everything goes through the tool's own paths: the images are PNG files read by ``--data <folder>``, the
searches run ``nas.search.run.run_search`` on configs resolved as search.py resolves them (``nas.cli.search``),
the searched architectures are derived by ``nas.derive.export`` and every architecture is retrained by ``nas.derive.retrain``.

Prints a table and writes benchmarks/results/bench_search_validity_cpu.json (or --out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nas.atomic import atomic_write  # noqa: E402
from nas.derive import export  # noqa: E402
from nas.derive.retrain import retrain_config, run_retrain  # noqa: E402
from nas.engine.run_log import LOG_FILE, epoch_records, read_log  # noqa: E402
from nas.models import create_model  # noqa: E402
from nas.cli.search import parse_args, resolve_config  # noqa: E402
from nas.search.run import run_search  # noqa: E402
from nas.tune.baselines import FIXED, baseline_arch  # noqa: E402

from bench_common import environment  # noqa: E402
from nas.search.stopping import kept_sets  # noqa: E402
from validity_tasks import PAIRS, PLANTED, TASKS, register_models, task_answer, write_task  # noqa: E402

STRATEGIES = ("joint", "bilevel", "sampled")
# no crop, no flip: the label sits at fixed tokens
DATA = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "crop_pct": 1.0}
TRAIN = {"batch_size": 64, "workers": 0, "lr": 1.0e-2, "min_lr": 1.0e-4, "warmup_epochs": 1, "weight_decay": 0.05,
         "label_smoothing": 0.0, "device": "cpu"}
# alpha's lr, the one setting that decides recovery here (measured, README "Proof that the search finds the
# right directions"): at 0.1 the first carrier to learn takes the mass and another carrier sinks with the
# non-carriers; at 0.01 the margins are a few thousandths when the loss saturates and alpha stops
STRATEGY_SETTINGS = {"joint": {"alpha_lr": 0.02}, "bilevel": {"alpha_lr": 0.03}, "sampled": {"alpha_lr": 0.03}}


# the stopping rule of every search but the schedule's (chosen from the margins the 12-epoch searches of the
# earlier records went through, README "Proof that the search finds the right directions")
STOP = {"patience": 2, "min_margin": 0.02, "min_epochs": 3}
SCHEDULE = "localmamba"  # LocalMamba's schedule: joint, every path in every step, every epoch (no stopping rule)


def strategy_settings(path_dropout: float) -> dict:
    """STRATEGY_SETTINGS, with ``strategy.path_dropout`` for the strategies that train every path, and the
    schedule's (joint's alpha lr, no path dropout)."""
    extra = {"path_dropout": path_dropout} if path_dropout else {}
    out = {name: {**s, **(extra if name != "sampled" else {})} for name, s in STRATEGY_SETTINGS.items()}
    return {**out, SCHEDULE: {**STRATEGY_SETTINGS["joint"], "name": "joint"}}
LOG = {"tensorboard": False, "progress": False}


def mean_std(values) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def margin(probs, expected, scans) -> float:
    """min over E of p minus max over the other scans of p."""
    p = dict(zip(scans, probs))
    return min(p[d] for d in expected) - max(p[d] for d in scans if d not in expected)


def search_space(task, model: str, search_epochs: int, retrain_epochs: int, folder: Path) -> Path:
    """The task's search space YAML; its retrain section is the one recipe every candidate is retrained with."""
    space = {"name": task.name, "model": model, "img_size": task.img_size, "data": DATA,
             "search": {"candidates": list(task.candidates)}, "train": {**TRAIN, "epochs": search_epochs}, "log": LOG,
             "retrain": {"train": {**TRAIN, "epochs": retrain_epochs, "mixup": 0.0, "cutmix": 0.0}, "log": LOG}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "space.yaml"
    with atomic_write(str(path)) as f:
        yaml.safe_dump(space, f, sort_keys=False)
    return path


def search(space: Path, data: Path, strategy: str, seed: int, out: Path, expected: list[str], scans,
           settings: dict, stop: dict | None) -> dict:
    """One search keeping k = |E| (stopped by ``stop``, None: every epoch); its answer and compute."""
    options = dict(settings[strategy])
    overrides = [f"--strategy.name={options.pop('name', strategy)}", f"--strategy.k={len(expected)}"]
    overrides += [f"--strategy.{key}={value}" for key, value in options.items()]
    overrides += [f"--search.stop.{key}={value}" for key, value in (stop or {}).items()]
    args, rest = parse_args(["-c", str(space), "--data", str(data), "--out", str(out), f"seed={seed}", *overrides])
    cfg, out_dir = resolve_config(args, rest)
    start = time.perf_counter()
    result = run_search(cfg, out_dir)
    seconds = time.perf_counter() - start
    arch = export.make_arch(export.read_run(out_dir), out_dir, len(expected))
    arch_path = Path(out_dir) / "arch.yaml"
    export.write_arch(arch, str(arch_path))
    probs = torch.softmax(result["alphas"][0].view(-1).double(), 0).tolist()
    ranked = sorted(range(len(scans)), key=lambda i: -probs[i])
    log = str(Path(out_dir) / LOG_FILE)
    records = epoch_records(log)
    history = export.read_run(out_dir)["history"]["epochs"]
    # the derived set (derive.py's top-k) after each epoch: right when it is E
    right = [[scans[i] for i in kept_sets(e["probs"], len(expected), scans, 0.5)[0]] == expected for e in history]
    settled = next((e for e in range(len(right)) if all(right[e:])), None)  # from this epoch on, E to the end
    stopped = [r for r in read_log(log) if r.get("event") == "stopped"]
    path_steps = [records[e]["path_steps"] for e in sorted(records)]
    return {"strategy": strategy, "seed": seed, "kept": arch["directions"][0], "probs": probs,
            "mass_on_expected": sum(p for d, p in zip(scans, probs) if d in expected),
            "recovered": {scans[i] for i in ranked[:len(expected)]} == set(expected),
            # how the order formed: the weakest expected direction's probability minus the strongest other's,
            # beside the training loss, per epoch (recovery needs the margin above 0 at the end)
            "margin_by_epoch": [margin(e["probs"][0], expected, scans) for e in history],
            "train_loss_by_epoch": [records[e]["train_loss"] for e in sorted(records)],
            "right_by_epoch": right, "path_steps_by_epoch": path_steps,
            "wall_s_by_epoch": [records[e]["wall_s"] for e in sorted(records)],
            "epochs": len(records), "stopped_after": stopped[-1]["epochs_done"] if stopped else None,
            "right_from_epoch": None if settled is None else settled + 1,
            "path_steps_to_answer": None if settled is None else path_steps[settled],
            "path_steps": path_steps[-1],
            "supernet_val_top1": result["record"]["val_top1"], "seconds": seconds, "cfg": cfg,
            "arch": arch, "arch_path": str(arch_path)}


class Retrainer:
    """Retrains a direction set once per (set, seed); candidates that share a set share its runs."""

    def __init__(self, folder: Path, search_cfg: dict, scans):
        self.folder, self.search_cfg, self.scans = folder, search_cfg, scans
        self.done: dict[tuple[tuple[str, ...], int], dict] = {}

    def __call__(self, directions, seed: int, arch: dict | None = None, arch_path: str | None = None) -> dict:
        key = (tuple(d for d in self.scans if d in directions), seed)
        if key not in self.done:
            out = self.folder / f"{'-'.join(key[0])}_seed{seed}"
            if arch is None:  # an architecture no search derived: written as the baselines are
                out.mkdir(parents=True, exist_ok=True)
                cfg = dict(self.search_cfg, strategy={**self.search_cfg["strategy"], "k": len(key[0])})
                arch, arch_path = baseline_arch(cfg, [list(key[0])], str(out), "validity"), str(out / "arch.yaml")
                export.write_arch(arch, arch_path)
            cfg = retrain_config(arch, arch_path, self.search_cfg, {"seed": seed}, inherit=False)
            start = time.perf_counter()
            record = run_retrain(cfg, str(out / "retrain"))
            self.done[key] = {"directions": list(key[0]), "seed": seed, "val_top1": record["val_top1"],
                              "seconds": time.perf_counter() - start}
        return self.done[key]


def retrain_sets(task, expected: list[str], scans, searches: list[dict], args) -> dict[str, list]:
    """The direction sets retrained, by name: per set one (directions, arch, arch path) per retraining seed.

    The premise: E and its complement (a task whose every token of R shows the label), or every k-of-8 set once,
    on the first seed (a task of bits, where k = |E| = 2); then random k-of-8 draws (a new one per seed), the
    fixed h, h_flip, v, v_flip, and each strategy's first-seed search."""
    k, seeds = len(expected), args.retrain_seeds

    def plain(directions):  # a set no search derived
        return list(directions), None, None

    if task.bits:
        sets = {"expected": [plain(expected)] * len(seeds)}
        sets.update({f"premise {'+'.join(c)}": [plain(c)] for c in itertools.combinations(scans, k)
                     if list(c) != expected})
    else:
        sets = {"expected": [plain(expected)] * len(seeds),
                "complement": [plain(d for d in scans if d not in expected)] * len(seeds)}
    draw = random.Random(f"{task.name} random {k}-of-{len(scans)}")
    sets["random"] = [plain(sorted(draw.sample(scans, k), key=scans.index)) for _ in seeds]
    sets["fixed"] = [plain(FIXED)] * len(seeds)
    for s in searches:  # each strategy's model: the one its first search seed derived
        if s["seed"] == args.search_seeds[0]:
            sets[f"searched ({s['strategy']})"] = [(s["kept"], s["arch"], s["arch_path"])] * len(seeds)
    return sets


def run_task(task, model: str, reach: int, work: Path, args) -> dict:
    folder = work / task.name
    data = Path(write_task(task, str(folder / "data"), args.train_per_class, args.val_per_class, seed=1234))
    space = search_space(task, model, args.search_epochs, args.retrain_epochs, folder)
    scans = task.candidates  # the search space's; "candidates" below are the retrained sets
    expected = task_answer(task, reach)
    k = len(expected)
    print(f"{task.name}: R = {list(task.cells)}, candidates {', '.join(scans)}, expected {', '.join(expected)}",
          flush=True)
    searches = []
    for strategy in args.strategies + ([SCHEDULE] if args.schedule else []):
        stop = STOP if args.stop and strategy != SCHEDULE else None
        for seed in args.search_seeds:
            s = search(space, data, strategy, seed, folder / f"search_{strategy}_seed{seed}", expected, scans,
                       strategy_settings(args.path_dropout), stop)
            searches.append(s)
            print(f"  search {strategy:10s} seed {seed}: kept {', '.join(s['kept']):30s} mass on E "
                  f"{s['mass_on_expected']:.3f} {'recovered' if s['recovered'] else 'NOT recovered'} after "
                  f"{s['epochs']} epochs, E from epoch {s['right_from_epoch']} ({s['seconds']:.0f} s)", flush=True)
    out = {"task": task.name, "grid": task.grid, "cells": [list(c) for c in task.cells], "bits": task.bits,
           "search_candidates": list(scans), "expected": expected, "k": k, "chance_top1": 100.0 / 4,
           # how often a random k-of-8 set holds E, and how often it holds no direction of E
           "p_random_set_holds_answer": 1 / math.comb(len(scans), k),
           "p_random_set_without_carrier": math.comb(len(scans) - k, k) / math.comb(len(scans), k),
           "searches": searches}
    if args.retrain:
        retrain = Retrainer(folder / "retrain", searches[0]["cfg"], scans)
        candidates = []
        for name, entries in retrain_sets(task, expected, scans, searches, args).items():
            runs = [dict(retrain(d, seed, arch, path), carriers=len(set(d) & set(expected)))
                    for seed, (d, arch, path) in zip(args.retrain_seeds, entries)]
            m, sd = mean_std([r["val_top1"] for r in runs])
            candidates.append({"name": name, "mean": m, "std": sd, "runs": runs})
            print(f"  retrain {name:24s} val top-1 {m:6.2f} +- {sd:5.2f}  "
                  f"({'; '.join(', '.join(r['directions']) for r in runs)})", flush=True)
        by_name = {c["name"]: c for c in candidates}
        random_bar = by_name["random"]["mean"] + 2 * by_name["random"]["std"]
        out.update(candidates=candidates, searched_beats_random_by_2std={
            c["name"]: c["mean"] > random_bar for c in candidates if c["name"].startswith("searched")},
            searched_beats_fixed={c["name"]: c["mean"] > by_name["fixed"]["mean"] for c in candidates
                                  if c["name"].startswith("searched")})
    for s in searches:
        for key in ("cfg", "arch", "arch_path"):
            del s[key]
    return out


def compute_table(tasks: list[dict], search_epochs: int) -> list[dict]:
    """Per strategy over every task and seed: searches recovered, right when they ended, and the mean compute
    (path-steps) at the end and from where the answer stayed right, as fractions of the strategy's own
    ``search_epochs`` budget (its mean path-steps per epoch x search_epochs) and of the schedule's."""
    rows = []
    schedule = [s["path_steps"] for t in tasks for s in t["searches"] if s["strategy"] == SCHEDULE]
    for strategy in dict.fromkeys(s["strategy"] for t in tasks for s in t["searches"]):
        runs = [s for t in tasks for s in t["searches"] if s["strategy"] == strategy]
        budget = [s["path_steps"] / s["epochs"] * search_epochs for s in runs]
        to_answer = [s["path_steps_to_answer"] for s in runs if s["path_steps_to_answer"] is not None]
        row = {"strategy": strategy, "searches": len(runs), "recovered": sum(s["recovered"] for s in runs),
               "stopped": sum(s["stopped_after"] is not None for s in runs),
               "stopped_on_a_wrong_answer": sum(s["stopped_after"] is not None and not s["right_by_epoch"][-1]
                                                for s in runs),
               "epochs_mean": statistics.fmean(s["epochs"] for s in runs),
               "path_steps_mean": statistics.fmean(s["path_steps"] for s in runs),
               "of_own_budget": statistics.fmean(s["path_steps"] / b for s, b in zip(runs, budget)),
               "to_answer_mean": statistics.fmean(to_answer) if to_answer else None,
               "to_answer_of_own_budget": statistics.fmean(s["path_steps_to_answer"] / b for s, b in zip(runs, budget)
                                                           if s["path_steps_to_answer"] is not None)
               if to_answer else None,
               "wall_s_mean": statistics.fmean(s["wall_s_by_epoch"][-1] for s in runs)}
        if schedule:
            row["of_schedule"] = row["path_steps_mean"] / statistics.fmean(schedule)
        rows.append(row)
    return rows


def summary(tasks: list[dict], compute: list[dict]) -> str:
    lines = ["", f"{'task':24s} {'strategy':10s} {'recovered':>9s} {'mass on E':>15s} {'epochs':>6s}"]
    for t in tasks:
        for strategy in dict.fromkeys(s["strategy"] for s in t["searches"]):
            runs = [s for s in t["searches"] if s["strategy"] == strategy]
            m, sd = mean_std([s["mass_on_expected"] for s in runs])
            lines.append(f"{t['task']:24s} {strategy:10s} {sum(s['recovered'] for s in runs):>5d} / {len(runs)} "
                         f"{m:8.3f} +- {sd:.3f} {'/'.join(str(s['epochs']) for s in runs):>8s}")
    lines += ["", f"{'strategy':10s} {'recovered':>9s} {'stopped':>7s} {'wrong':>5s} {'epochs':>6s} "
                  f"{'path-steps':>11s} {'of budget':>9s} {'to answer':>9s} {'of schedule':>11s}"]
    for r in compute:
        to_answer = "-" if r["to_answer_of_own_budget"] is None else f"{r['to_answer_of_own_budget']:.3f}"
        lines.append(f"{r['strategy']:10s} {r['recovered']:>4d} / {r['searches']:<2d} {r['stopped']:>7d} "
                     f"{r['stopped_on_a_wrong_answer']:>5d} {r['epochs_mean']:6.2f} {r['path_steps_mean']:11.4g} "
                     f"{r['of_own_budget']:9.3f} {to_answer:>9s} {r.get('of_schedule', float('nan')):11.3f}")
    retrained = [t for t in tasks if "candidates" in t]
    if retrained:
        lines.append("")
        lines.append(f"{'val top-1 (%)':26s} " + " ".join(f"{t['task']:>24s}" for t in retrained))
        names = [c["name"] for t in retrained for c in t["candidates"] if not c["name"].startswith("premise")]
        for name in dict.fromkeys(names):
            cells = [next((f"{c['mean']:6.2f} +- {c['std']:5.2f}" for c in t["candidates"] if c["name"] == name),
                          "-") for t in retrained]
            lines.append(f"{name:26s} " + " ".join(f"{cell:>24s}" for cell in cells))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS],
                   choices=[t.name for t in TASKS + PLANTED + PAIRS],
                   help="default: the tasks over LocalMamba's 8 (the planted one and the pairs have their own records)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--search-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--retrain-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--search-epochs", type=int, default=12)
    p.add_argument("--path-dropout", type=float, default=0.5,
                   help="strategy.path_dropout of joint and bilevel (sampled already trains subsets of the paths); "
                        "0: every path in every step, with which a late carrier can stay below a non-carrier")
    p.add_argument("--retrain-epochs", type=int, default=8)
    p.add_argument("--stop", action=argparse.BooleanOptionalAction, default=True,
                   help=f"end each search by the stopping rule search.stop = {STOP} (--no-stop: every epoch)")
    p.add_argument("--schedule", action="store_true",
                   help="also search with LocalMamba's schedule (joint, every path, every epoch, no stopping rule)")
    p.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain the premise, the baselines and the searched sets (--no-retrain: searches only)")
    p.add_argument("--train-per-class", type=int, default=128)
    p.add_argument("--val-per-class", type=int, default=64)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_search_validity"), help="runs and images go here")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_search_validity_cpu.json"))
    args = p.parse_args()
    # one intra-op thread unless the user says otherwise: these models are too small to gain from more, and
    # on a machine shared with other jobs extra threads only wait for each other (nas.engine.threads reads it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):  # its runs would be resumed, not measured
        p.error(f"--work {work} is not empty; remove it or name another folder")
    model, _ = register_models()
    probe = create_model(model, img_size=TASKS[0].img_size, num_classes=4)
    reach = probe.layers[0].mixer.d_conv - 1  # the causal conv hands a token the reach tokens before it
    start = time.perf_counter()
    tasks = [run_task(t, model, reach, work, args) for t in TASKS + PLANTED + PAIRS if t.name in args.tasks]
    compute = compute_table(tasks, args.search_epochs)
    print(summary(tasks, compute))
    record = {"benchmark": "bench_search_validity", "environment": environment("cpu"),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.perf_counter() - start,
              "settings": {"model": model, "data": DATA, "train": TRAIN, "strategy_settings": strategy_settings(args.path_dropout),
                           "stop": STOP if args.stop else None,
                           "conv_reach": reach, **{k: v for k, v in vars(args).items() if k not in ("work", "out")}},
              "compute": compute, "tasks": tasks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
