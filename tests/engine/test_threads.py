"""The thread count a run gives PyTorch: its CPU affinity divided among the local processes and the
data-loader workers, unless OMP_NUM_THREADS says otherwise; a real search.py under a one-core affinity
says what it chose in its first log line."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from nas.engine.threads import choose_threads, set_threads

ROOT = Path(__file__).resolve().parents[2]
CORES = len(os.sched_getaffinity(0))


def test_affinity_divided_by_local_processes_and_workers():
    assert choose_threads(0, {}).threads == CORES
    assert choose_threads(1, {}).threads == max(1, CORES // 2)
    assert choose_threads(0, {"LOCAL_WORLD_SIZE": "2"}).threads == max(1, CORES // 2)
    assert choose_threads(3, {"LOCAL_WORLD_SIZE": "4"}).threads == max(1, CORES // 16)
    c = choose_threads(1, {"LOCAL_WORLD_SIZE": "2"})
    assert (c.cores, c.local_processes, c.workers, c.user_set) == (CORES, 2, 1, False)
    assert c.message.endswith("/ 2 local processes / (1 + 1 data-loader worker))")


def test_user_setting_wins_but_torchruns_default_does_not():
    c = choose_threads(4, {"OMP_NUM_THREADS": "3"})
    assert (c.threads, c.user_set, c.message) == (3, True, "threads: 3 (OMP_NUM_THREADS)")
    assert choose_threads(0, {"OMP_NUM_THREADS": "1"}).threads == 1  # one process: the user's 1
    # torchrun sets OMP_NUM_THREADS=1 for several local processes only when the user did not
    c = choose_threads(0, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"})
    assert not c.user_set and c.threads == max(1, CORES // 2)
    assert choose_threads(0, {"OMP_NUM_THREADS": "many"}).threads == CORES


def test_set_threads_applies_the_choice():
    before = torch.get_num_threads()
    try:
        assert set_threads(0, {"OMP_NUM_THREADS": "1"}).threads == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _one_core():
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def test_subprocess_with_one_core_affinity_chooses_one_thread():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    code = ("import torch; from nas.engine.threads import set_threads; c = set_threads(0); "
            "print(c.cores, c.threads, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, preexec_fn=_one_core, capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"]


def test_search_run_says_its_threads_in_its_first_log_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    argv = [sys.executable, str(ROOT / "search.py"), "-c", "demo", "--data.images_per_class", "6",
            "--train.batch_size", "20", "--model_args.depth", "1", "--model_args.embed_dim", "8", "--img_size", "16",
            "--log.progress", "false", "--log.tensorboard", "false", "--train.warmup_epochs", "0", "--epochs", "1",
            "--out", str(tmp_path / "run")]
    out = subprocess.run(argv, env=env, preexec_fn=_one_core, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.splitlines()[0] == ("threads: 1 (1 core in this process's CPU affinity / 1 local process / "
                                          "(1 + 0 data-loader workers))")
