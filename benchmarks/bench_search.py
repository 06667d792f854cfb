"""Benchmark a search epoch: images/s and peak memory of the joint strategy vs the sampled one (k of 8
directions active per layer and step).

CPU (default): the demo search space on the demo data, one epoch, each strategy in its own subprocess;
peak memory is the process's peak resident set minus its resident set just before the epoch (the data
set, the model and the optimizer are already built by then).
CUDA (--device cuda): search_spaces/localvim_t.yaml's supernet at batch 128 with bf16 autocast on random
images (``--steps`` steps); peak memory is torch.cuda.max_memory_allocated over those steps.
--device interpret: that path's code on CPU under TRITON_INTERPRET=1 (scan backend "auto": torch on CPU), a tiny
demo supernet at batch 2: a check of this script (tests run it); its numbers measure nothing.

Prints a table and writes a JSON record to benchmarks/results/bench_search_<device>.json as each strategy is
measured; a strategy that fails is recorded with its error, the other still runs (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nas import config as cfglib  # noqa: E402
from nas.data import build_datasets, build_loader  # noqa: E402
from nas.engine.distributed import DistEnv  # noqa: E402
from nas.engine.loop import new_loop_state, train_one_epoch  # noqa: E402
from nas.engine.run_log import ProgressBar, RunLogger  # noqa: E402
from nas.models import create_model  # noqa: E402
from nas.search.run import SEARCH_DEFAULTS  # noqa: E402
from nas.search.strategies import create_strategy  # noqa: E402

from bench_common import Record, check_interpret_env, current_rss_kb, environment  # noqa: E402


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n, img_size, num_classes):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, img_size, img_size, generator=g)
        self.labels = torch.randint(num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


# per device: the search space, config overrides, batch (None: the space's), random images (with their number
# of classes, and loader workers) or the space's data, and the scan backend
SETUPS = {
    "cpu": dict(space="demo.yaml", overrides={}, batch=None, random=None, backend="auto"),
    "cuda": dict(space="localvim_t.yaml", overrides={}, batch=128, random=(1000, 4), backend="auto"),
    "interpret": dict(space="demo.yaml", overrides={"img_size": 16, "model_args": {"depth": 1, "embed_dim": 8}},
                      batch=2, random=(10, 0), backend="auto"),
}


def measure(device: str, strategy: str, k: int, steps: int) -> dict:
    """One epoch (of `steps` steps on random images) of the search's own training loop under one strategy."""
    setup = SETUPS[device]
    space = setup["space"]
    cfg = cfglib.resolve(SEARCH_DEFAULTS, str(ROOT / "search_spaces" / space), setup["overrides"])
    train = dict(cfg["train"], epochs=1, warmup_epochs=0, amp="auto")
    if setup["batch"]:
        train["batch_size"] = setup["batch"]
    strategy_cfg = dict(cfg["strategy"], name=strategy, k=k)
    env = DistEnv(device=torch.device("cuda" if device == "cuda" else "cpu"))
    torch.manual_seed(0)
    if setup["random"]:
        num_classes, workers = setup["random"]
        data = RandomImages(train["batch_size"] * steps, cfg["img_size"], num_classes)
        loader = build_loader(data, train["batch_size"], True, workers, 0)
    else:
        bundle = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"])
        num_classes, loader = bundle.num_classes, build_loader(bundle.train, train["batch_size"], True, 0, 0)
    model = create_model(cfg["model"], img_size=cfg["img_size"], num_classes=num_classes, backend=setup["backend"],
                         **cfg["model_args"])
    model.to(env.device)
    task = create_strategy(strategy_cfg, model, train, 0, None, "")  # the per-epoch report is not run here
    optimizer = task.build_optimizer()
    state = new_loop_state()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_kb() * 1024
    start = time.perf_counter()
    metrics = train_one_epoch(model, loader, optimizer, task, train, env, state, 0, ProgressBar(len(loader), "", False),
                              RunLogger("", enabled=False, tensorboard=False, progress=False))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"space": space, "strategy": strategy, "k": k, "batch": train["batch_size"], "steps": state["step"],
            "images_per_s": metrics["images_per_s"], "peak_mib": peak / 2**20, "seconds": time.perf_counter() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=tuple(SETUPS), default="cpu",
                   help="interpret: the CUDA path's code at tiny sizes on CPU under TRITON_INTERPRET=1 (checks this "
                        "script; its numbers measure nothing)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="CUDA / interpret: training steps per strategy")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_search_<device>.json)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.device, args.child[0], int(args.child[1]), args.steps)))
        return 0
    check_interpret_env(args.device)
    record = Record(args.out or ROOT / "benchmarks" / "results" / f"bench_search_{args.device}.json", "bench_search",
                    args.device, environment("cuda" if args.device == "cuda" else "cpu"), rows=[],
                    plan=["joint", "sampled"])
    failed = 0
    for strategy in ("joint", "sampled"):
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
                              "--child", strategy, str(args.k)], capture_output=True, text=True)
        if out.returncode != 0:  # recorded, and the other strategy still measured
            failed += 1
            error = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
            record.add("rows", {"strategy": strategy, "k": args.k, "error": error}, strategy)
            print(f"{strategy:8s} failed: {error}", flush=True)
            continue
        r = record.add("rows", json.loads(out.stdout.strip().splitlines()[-1]), strategy)
        print(f"{r['space']:16s} {r['strategy']:8s} k={r['k']} batch {r['batch']:4d} {r['images_per_s']:9.1f} img/s "
              f"peak {r['peak_mib']:9.1f} MiB ({r['seconds']:.0f} s)", flush=True)
    ok = {r["strategy"]: r for r in record.data["rows"] if "error" not in r}
    if len(ok) == 2:
        ratio = ok["sampled"]["peak_mib"] / ok["joint"]["peak_mib"]
        speed = ok["sampled"]["images_per_s"] / ok["joint"]["images_per_s"]
        print(f"\nsampled / joint: peak memory {ratio:.2f}x, images/s {speed:.2f}x")
        record.update(sampled_over_joint_peak_memory=ratio, sampled_over_joint_images_per_s=speed)
    record.finish()
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
