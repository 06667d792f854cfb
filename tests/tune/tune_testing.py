"""Tiny settings for the tuning tests: a 2-layer demo supernet of width 16 on 16 x 16 digits."""
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "search_spaces", "demo.yaml")
LOCALVIM_T = os.path.join(ROOT, "search_spaces", "localvim_t.yaml")
TINY = ["-c", DEMO, "--data.images_per_class", "12", "--train.batch_size", "24", "--model_args.depth", "2",
        "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false", "--train.warmup_epochs", "0",
        "--log.tensorboard", "false", "--epochs", "2"]
TINY_RETRAIN = {"train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 24, "workers": 0, "mixup": 0.0, "cutmix": 0.0},
                "log": {"progress": False, "tensorboard": False}}


def demo_with(tmp_path, **tune) -> list[str]:
    """TINY with a copy of demo.yaml whose tune section has these entries replaced (keys new to a config's
    section cannot be added from the command line)."""
    with open(DEMO) as f:
        cfg = yaml.safe_load(f)
    cfg["tune"] = {**cfg["tune"], **tune}
    path = os.path.join(str(tmp_path), "demo_tune.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return ["-c", path] + TINY[2:]


def worker(argv, **kwargs) -> subprocess.Popen:
    """search.py in its own process (one torch thread), output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "search.py")] + argv, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
