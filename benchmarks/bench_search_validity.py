"""Does the search find the right directions? Tasks with a known answer (benchmarks/validity_tasks.py).

Per task: the expected set E (the task's candidate scans whose prefix before the class token holds the label
region) and its premise (E and its complement retrained alike: E should reach high accuracy, the complement
chance); every strategy searched over the task's candidates with several seeds (is E the |E| most probable
candidates? the probability mass on E); the equal-budget comparison: each strategy's derived top-4, a random
4-of-8 set of the candidates (one draw per seed) and the fixed set h, h_flip, v, v_flip, each retrained with one
recipe over the same seeds, mean +- std of val top-1.

The default tasks search LocalMamba's 8 (the record bench_search_validity_cpu.json); the planted task
(``--tasks token_2_2_of_5x5``, recorded in bench_search_validity_planted_cpu.json) searches 8 scans of which
only new orders carry its label.

Everything goes through the tool's own paths: the images are PNG files read by ``--data <folder>``, the
searches run ``nas.search.run.run_search`` on configs resolved as search.py resolves them (``nas.cli.search``),
the searched architectures are derived by ``nas.derive.export`` and every architecture is retrained by ``nas.derive.retrain``.

Prints a table and writes benchmarks/results/bench_search_validity_cpu.json (or --out).
"""
from __future__ import annotations

import argparse
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
from nas.engine.run_log import LOG_FILE, epoch_records  # noqa: E402
from nas.models import create_model  # noqa: E402
from nas.cli.search import parse_args, resolve_config  # noqa: E402
from nas.search.run import run_search  # noqa: E402
from nas.tune.baselines import FIXED, baseline_arch  # noqa: E402

from bench_common import environment  # noqa: E402
from validity_tasks import PLANTED, TASKS, expected_directions, register_models, write_task  # noqa: E402

STRATEGIES = ("joint", "bilevel", "sampled")
# no crop, no flip: the label sits at fixed tokens
DATA = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "crop_pct": 1.0}
TRAIN = {"batch_size": 64, "workers": 0, "lr": 1.0e-2, "min_lr": 1.0e-4, "warmup_epochs": 1, "weight_decay": 0.05,
         "label_smoothing": 0.0, "device": "cpu"}
# alpha's lr, the one setting that decides recovery here (measured, README "Proof that the search finds the
# right directions"): at 0.1 the first carrier to learn takes the mass and another carrier sinks with the
# non-carriers; at 0.01 the margins are a few thousandths when the loss saturates and alpha stops
STRATEGY_SETTINGS = {"joint": {"alpha_lr": 0.02}, "bilevel": {"alpha_lr": 0.03}, "sampled": {"alpha_lr": 0.03}}


def strategy_settings(path_dropout: float) -> dict:
    """STRATEGY_SETTINGS, with ``strategy.path_dropout`` for the strategies that train every path."""
    extra = {"path_dropout": path_dropout} if path_dropout else {}
    return {name: {**s, **(extra if name != "sampled" else {})} for name, s in STRATEGY_SETTINGS.items()}
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
           settings: dict) -> dict:
    overrides = [f"--strategy.{key}={value}" for key, value in settings[strategy].items()]
    args, rest = parse_args(["-c", str(space), "--data", str(data), "--out", str(out), f"--strategy.name={strategy}",
                             f"seed={seed}", *overrides])
    cfg, out_dir = resolve_config(args, rest)
    start = time.perf_counter()
    result = run_search(cfg, out_dir)
    seconds = time.perf_counter() - start
    arch = export.make_arch(export.read_run(out_dir), out_dir, 4)
    arch_path = Path(out_dir) / "arch.yaml"
    export.write_arch(arch, str(arch_path))
    probs = torch.softmax(result["alphas"][0].view(-1).double(), 0).tolist()
    ranked = sorted(range(len(scans)), key=lambda i: -probs[i])
    records = epoch_records(str(Path(out_dir) / LOG_FILE))
    return {"strategy": strategy, "seed": seed, "top4": arch["directions"][0], "probs": probs,
            "mass_on_expected": sum(p for d, p in zip(scans, probs) if d in expected),
            "recovered": {scans[i] for i in ranked[:len(expected)]} == set(expected),
            # how the order formed: the weakest expected direction's probability minus the strongest other's,
            # beside the training loss, per epoch (recovery needs the margin above 0 at the end)
            "margin_by_epoch": [margin(e["probs"][0], expected, scans)
                                for e in export.read_run(out_dir)["history"]["epochs"]],
            "train_loss_by_epoch": [records[e]["train_loss"] for e in sorted(records)],
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


def run_task(task, model: str, reach: int, work: Path, args) -> dict:
    folder = work / task.name
    data = Path(write_task(task, str(folder / "data"), args.train_per_class, args.val_per_class, seed=1234))
    space = search_space(task, model, args.search_epochs, args.retrain_epochs, folder)
    scans = task.candidates  # the search space's; "candidates" below are the retrained sets
    expected = expected_directions(task.cells, task.grid, reach, scans)
    complement = [d for d in scans if d not in expected]
    print(f"{task.name}: R = {list(task.cells)}, candidates {', '.join(scans)}, expected {', '.join(expected)}",
          flush=True)
    searches = []
    for strategy in args.strategies:
        for seed in args.search_seeds:
            s = search(space, data, strategy, seed, folder / f"search_{strategy}_seed{seed}", expected, scans,
                       strategy_settings(args.path_dropout))
            searches.append(s)
            print(f"  search {strategy:8s} seed {seed}: top-4 {', '.join(s['top4']):30s} mass on E "
                  f"{s['mass_on_expected']:.3f} {'recovered' if s['recovered'] else 'NOT recovered'} "
                  f"({s['seconds']:.0f} s)", flush=True)
    retrain = Retrainer(folder / "retrain", searches[0]["cfg"], scans)
    draw = random.Random(f"{task.name} random 4-of-8")
    sets = {"expected": [(expected, None, None)] * len(args.retrain_seeds),
            "complement": [(complement, None, None)] * len(args.retrain_seeds),
            "random": [(sorted(draw.sample(scans, 4), key=scans.index), None, None)
                       for _ in args.retrain_seeds],
            "fixed": [(list(FIXED), None, None)] * len(args.retrain_seeds)}
    for s in searches:  # each strategy's model: the one its first search seed derived
        if s["seed"] == args.search_seeds[0]:
            sets[f"searched ({s['strategy']})"] = [(s["top4"], s["arch"], s["arch_path"])] * len(args.retrain_seeds)
    candidates = []
    for name, entries in sets.items():
        runs = [dict(retrain(d, seed, arch, path), carriers=len(set(d) & set(expected)))
                for seed, (d, arch, path) in zip(args.retrain_seeds, entries)]
        m, sd = mean_std([r["val_top1"] for r in runs])
        candidates.append({"name": name, "mean": m, "std": sd, "runs": runs})
        print(f"  retrain {name:20s} val top-1 {m:6.2f} +- {sd:5.2f}  "
              f"({'; '.join(', '.join(r['directions']) for r in runs)})", flush=True)
    by_name = {c["name"]: c for c in candidates}
    random_bar = by_name["random"]["mean"] + 2 * by_name["random"]["std"]
    for s in searches:
        for key in ("cfg", "arch", "arch_path"):
            del s[key]
    return {"task": task.name, "grid": task.grid, "cells": [list(c) for c in task.cells],
            "search_candidates": list(scans), "expected": expected, "complement": complement,
            "chance_top1": 100.0 / 4,
            # a random 4-of-8 set holds no direction of E this often: the most the searched model can gain on it
            "p_random_set_without_carrier": math.comb(len(complement), 4) / math.comb(len(scans), 4),
            "searches": searches, "candidates": candidates,
            "searched_beats_random_by_2std": {c["name"]: c["mean"] > random_bar for c in candidates
                                              if c["name"].startswith("searched")}}


def summary(tasks: list[dict]) -> str:
    lines = ["", f"{'task':16s} {'strategy':8s} {'recovered':>9s} {'mass on E':>15s}"]
    for t in tasks:
        for strategy in dict.fromkeys(s["strategy"] for s in t["searches"]):
            runs = [s for s in t["searches"] if s["strategy"] == strategy]
            m, sd = mean_std([s["mass_on_expected"] for s in runs])
            lines.append(f"{t['task']:16s} {strategy:8s} {sum(s['recovered'] for s in runs):>5d} / {len(runs)} "
                         f"{m:8.3f} +- {sd:.3f}")
    lines.append("")
    lines.append(f"{'val top-1 (%)':22s} " + " ".join(f"{t['task']:>20s}" for t in tasks))
    for name in dict.fromkeys(c["name"] for t in tasks for c in t["candidates"]):
        cells = [next((f"{c['mean']:6.2f} +- {c['std']:5.2f}" for c in t["candidates"] if c["name"] == name), "-")
                 for t in tasks]
        lines.append(f"{name:22s} " + " ".join(f"{cell:>20s}" for cell in cells))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS], choices=[t.name for t in TASKS + PLANTED],
                   help="default: the tasks over LocalMamba's 8 (the planted one has its own record)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--search-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--retrain-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--search-epochs", type=int, default=12)
    p.add_argument("--path-dropout", type=float, default=0.5,
                   help="strategy.path_dropout of joint and bilevel (sampled already trains subsets of the paths); "
                        "0: every path in every step, with which a late carrier can stay below a non-carrier")
    p.add_argument("--retrain-epochs", type=int, default=8)
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
    tasks = [run_task(t, model, reach, work, args) for t in TASKS + PLANTED if t.name in args.tasks]
    print(summary(tasks))
    record = {"benchmark": "bench_search_validity", "environment": environment("cpu"),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.perf_counter() - start,
              "settings": {"model": model, "data": DATA, "train": TRAIN, "strategy_settings": strategy_settings(args.path_dropout),
                           "conv_reach": reach, **{k: v for k, v in vars(args).items() if k not in ("work", "out")}},
              "tasks": tasks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
