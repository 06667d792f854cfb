"""``search.py -c SPACE.yaml --compare --out RUN``: search, baselines and retraining at equal budget, one table.

Candidates (each its arch.yaml under ``RUN/compare/NAME/``):
- one supernet search per strategy in ``tune.compare.strategies`` (default joint = LocalMamba/DARTS-style, and
  sampled), run with the config as it is in ``RUN/compare/STRATEGY/search/`` and derived top-k;
- the baselines fixed, random, published (left out, with a note, where LocalMamba published no list for the
  model) and the TPE black-box search (``nas.tune.baselines``);
- ``tuned``: when ``RUN/best.yaml`` exists (a ``--tune`` study in the same folder), the architecture its best
  trial found. Its search cost is the whole study's, so it is not at equal budget; the table says so.

Equal budget:
- search phase: every search method gets the same number of training epochs over the same training images,
  ``train.epochs`` of the config: each supernet search trains the supernet for ``train.epochs`` epochs; the TPE
  search trains ``tpe_trials`` derived networks for ``tpe_epochs`` epochs each, ``tpe_trials * tpe_epochs ==
  train.epochs`` by default (it holds out the selection split of those images to score its trials; the
  supernet searches do not score anything and train on all of them). A supernet epoch costs more compute than a
  derived-network epoch (8 scans per layer, not k), so the table gives the measured seconds too. The fixed,
  random and published architectures cost no search.
- retraining: every candidate is retrained from scratch with one recipe: the search space's retraining
  config (``retrain:``, see ``nas.derive.retrain``) with ``tune.compare.retrain`` over it, on the config's
  training images, evaluated on its val images, once per seed in ``tune.compare.seeds`` (the seeds vary the
  initialization and the batch order; the data subset stays the one of the config's seed).

Writes ``RUN/compare.md`` (the table) and ``RUN/compare.json``. Every step resumes: run folders with a finished
``last.pt`` are read back, not trained again.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field

import torch
import yaml

from nas.atomic import atomic_write
from nas.engine.run_log import epoch_records
from nas.derive import export
from nas.derive.arch_file import load_arch
from nas.derive.retrain import retrain_config, run_retrain
from nas.models import count_parameters, create_model, flops
from nas.models.search_space import describe_k
from nas.search.run import run_search
from nas.tune.baselines import retrain_overrides, run_tpe, tpe_budget, write_baseline
from nas.tune.space import TuneError, resolve_tune
from nas.tune.study import check_run_folder

SHORT = {"h": "h", "h_flip": "h'", "v": "v", "v_flip": "v'", "w2": "w2", "w2_flip": "w2'", "w7": "w7",
         "w7_flip": "w7'"}


@dataclass
class Candidate:
    name: str
    how: str
    arch_path: str
    search_seconds: float = 0.0
    search_epochs: str = "0"
    note: str = ""
    results: list = field(default_factory=list)  # one retraining record per seed


def logged_cost(run_dirs) -> tuple[float, int]:
    """(seconds, epochs) the runs logged in log.jsonl (training + evaluation, from their epoch_time_s)."""
    seconds, epochs = 0.0, 0
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "log.jsonl")
        if not os.path.isfile(path):
            continue
        records = epoch_records(path)  # a resumed epoch counts once; event lines are not epochs
        seconds += sum(r.get("epoch_time_s", 0.0) for r in records.values())
        epochs += len(records)
    return seconds, epochs


def derive_to(run_dir: str, k: int, path: str) -> str:
    arch = export.make_arch(export.read_run(run_dir), run_dir, k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    export.write_arch(arch, path)
    return path


def supernet_candidates(cfg: dict, tune: dict, root: str) -> list[Candidate]:
    out = []
    for strategy in tune["compare"]["strategies"]:
        search_dir = os.path.join(root, strategy, "search")
        search_cfg = copy.deepcopy(cfg)
        search_cfg["strategy"]["name"] = strategy
        search_cfg["tune"] = {}
        run_search(search_cfg, search_dir)
        arch_path = derive_to(search_dir, cfg["strategy"]["k"], os.path.join(root, strategy, "arch.yaml"))
        seconds, epochs = logged_cost([search_dir])
        out.append(Candidate(strategy, f"supernet search ({strategy}), {describe_k(cfg['strategy']['k'], cfg['strategy']['auto_mass'])}", arch_path,
                             seconds, f"{epochs} supernet"))
    return out


def baseline_candidates(cfg: dict, tune: dict, out: str, notes: list) -> list[Candidate]:
    found = []
    for kind, how in (("fixed", "h, h_flip, v, v_flip everywhere"), ("random", "seeded random draw"),
                      ("published", "LocalMamba's published lists")):
        try:
            _, path = write_baseline(kind, cfg, out)
        except TuneError as exc:
            if kind != "published":
                raise
            notes.append(f"published: left out ({exc})")
            continue
        found.append(Candidate(kind, how, path))
    best, path = run_tpe(cfg, out)
    tpe_root = os.path.dirname(path)
    seconds, epochs = logged_cost(os.path.join(tpe_root, d) for d in sorted(os.listdir(tpe_root))
                                  if d.startswith("trial_"))
    trials = best["trials"]["complete"] + best["trials"]["pruned"]
    found.append(Candidate("tpe", f"black-box TPE, best of {trials} trials x {tune['baseline']['tpe_epochs']} epoch(s)",
                           path, seconds, f"{epochs} derived"))
    return found


def tuned_candidate(cfg: dict, out: str, root: str) -> Candidate | None:
    best_path = os.path.join(out, "best.yaml")
    if not os.path.isfile(best_path):
        return None
    with open(best_path) as f:
        best = yaml.safe_load(f)
    if best.get("best_trial") is None or not best.get("run_dir") or not os.path.isdir(best["run_dir"]):
        return None
    arch_path = derive_to(best["run_dir"], cfg["strategy"]["k"], os.path.join(root, "tuned", "arch.yaml"))
    seconds, epochs = logged_cost(os.path.join(out, d) for d in sorted(os.listdir(out)) if d.startswith("trial_"))
    return Candidate("tuned", f"best trial ({best['best_trial']}) of the --tune study", arch_path, seconds,
                     f"{epochs} supernet", note="not at equal budget: the cost of the whole study")


def retrain(candidate: Candidate, cfg: dict, tune: dict, root: str, seed: int) -> dict:
    arch = load_arch(candidate.arch_path)
    overrides = retrain_overrides(tune)
    overrides["seed"] = seed
    data_seed = cfg["data"]["seed"] if cfg["data"]["seed"] is not None else cfg["seed"]
    overrides.setdefault("data", {})["seed"] = data_seed
    rcfg = retrain_config(arch, candidate.arch_path, cfg, overrides, inherit=False)
    run_dir = os.path.join(root, candidate.name, f"retrain_s{seed}")
    record = run_retrain(rcfg, run_dir)
    return {"seed": seed, "run_dir": run_dir, "val_top1": record["val_top1"], "val_top5": record["val_top5"],
            "epochs": record["epoch"], "config": rcfg}


def measure(candidate: Candidate, rcfg: dict, num_classes: int) -> tuple[int, int]:
    arch = load_arch(candidate.arch_path)
    model = create_model(arch["model"], directions=candidate.arch_path, img_size=rcfg["img_size"],
                         num_classes=num_classes, **arch["model_args"])
    return count_parameters(model), flops(model, rcfg["img_size"])


def _num_classes(run_dir: str) -> int:
    with open(os.path.join(run_dir, "classes.txt")) as f:
        return sum(1 for line in f if line.strip())


def _arch_text(arch_path: str) -> str:
    with open(arch_path) as f:
        arch = yaml.safe_load(f)
    return " / ".join(" ".join(SHORT[d] for d in layer) for layer in arch["directions"])


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_report(cands: list[Candidate], rows: list[dict], cfg: dict, tune: dict, notes: list, out: str) -> str:
    recipe = rows[0]["recipe"]
    seeds = tune["compare"]["seeds"]
    lines = [f"# Comparison at equal budget: {cfg['name']} ({cfg['model']})", "",
             f"Retrained from scratch, same recipe for all: {recipe['train']['epochs']} epochs, "
             f"lr {recipe['train']['lr']}, "
             f"warm-up {recipe['train']['warmup_epochs']}, batch {recipe['train']['batch_size']}, "
             f"mixup {recipe['train']['mixup']}, cutmix {recipe['train']['cutmix']}, "
             f"drop-path {recipe['model_args'].get('drop_path_rate')}, seeds {seeds}; top-1/top-5 on the val split "
             f"after the last epoch{' (mean ± std over seeds)' if len(seeds) > 1 else ''}. Search budget: "
             f"{cfg['train']['epochs']} training epochs over the training images per search method "
             f"(supernet epochs for the supernet searches, derived-network epochs for TPE: {tpe_budget(cfg, tune)} "
             f"trials x {tune['baseline']['tpe_epochs']}). FLOPs: one {cfg['img_size']}x{cfg['img_size']} image, "
             f"nas.models.flops.", "",
             "| candidate | how it was found | directions per layer | top-1 (%) | top-5 (%) | params | FLOPs | "
             "search cost (epochs) | search cost (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c, row in zip(cands, rows):
        top1 = _mean([r["val_top1"] for r in c.results])
        top5 = _mean([r["val_top5"] for r in c.results])
        name = c.name + (" *" if c.note else "")
        lines.append(f"| {name} | {c.how} | {_arch_text(c.arch_path)} | {top1} | {top5} | {row['params']:,} | "
                     f"{row['flops'] / 1e6:.2f} M | {c.search_epochs} | {c.search_seconds:.0f} |")
    lines += ["", "Directions: x' is x_flip. Layers are separated by /. Search cost in seconds is the logged "
              "training + evaluation time of the search epochs on "
              f"{'a GPU' if torch.cuda.is_available() else 'the CPU'} ({platform.node()}), which others may share."]
    lines += [f"* {c.name}: {c.note}" for c in cands if c.note] + [f"- {n}" for n in notes]
    if len(seeds) > 1:
        lines += ["", "Per seed top-1: " + "; ".join(
            f"{c.name} " + ", ".join(f"{r['val_top1']:.2f}" for r in c.results) for c in cands)]
    lines += ["", "Architectures: " + ", ".join(f"{c.name} `{os.path.relpath(c.arch_path, out)}`" for c in cands)]
    path = os.path.join(out, "compare.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_compare(cfg: dict, out: str) -> str:
    """Find every candidate (searching where needed), retrain each, write RUN/compare.md; returns its path."""
    tune = resolve_tune(cfg, need_params=False)
    check_run_folder(out)
    root = os.path.join(out, "compare")
    notes: list[str] = []
    cands = supernet_candidates(cfg, tune, root) + baseline_candidates(cfg, tune, out, notes)
    tuned = tuned_candidate(cfg, out, root)
    if tuned is not None:
        cands.append(tuned)
    rows = []
    for c in cands:
        if c.name not in ("joint", "bilevel", "sampled", "tuned"):  # copy each baseline's arch beside its runs
            arch = load_arch(c.arch_path)
            c.arch_path = os.path.join(root, c.name, "arch.yaml")
            os.makedirs(os.path.dirname(c.arch_path), exist_ok=True)
            export.write_arch(arch, c.arch_path)
        c.results = [retrain(c, cfg, tune, root, seed) for seed in tune["compare"]["seeds"]]
        rcfg = c.results[0]["config"]
        params, flop = measure(c, rcfg, _num_classes(c.results[0]["run_dir"]))
        rows.append({"name": c.name, "params": params, "flops": flop, "recipe": rcfg})
    path = write_report(cands, rows, cfg, tune, notes, out)
    summary = [{**asdict(c), "params": row["params"], "flops": row["flops"],
                "results": [{k: v for k, v in r.items() if k != "config"} for r in c.results]}
               for c, row in zip(cands, rows)]
    with atomic_write(os.path.join(out, "compare.json")) as f:
        json.dump({"candidates": summary, "recipe": rows[0]["recipe"], "notes": notes}, f, indent=1)
    return path
