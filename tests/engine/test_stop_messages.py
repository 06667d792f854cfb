"""What a stop prints, with real signals to real processes: Ctrl-C while the commands are still importing, and a
scheduler's SIGTERM to torchrun (one message, from rank 0, naming the torchrun command that resumes)."""
import os
import signal
import subprocess
import sys

import pytest

from nas.engine import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--data.images_per_class", "12", "--data.num_classes", "4", "--train.batch_size", "8",
        "--model_args.depth", "2", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false",
        "--log.tensorboard", "false", "--train.warmup_epochs", "0"]


# Runs a command line script with an import hook that holds the import of torch until Ctrl-C comes: the signal
# lands while the script is still importing, however fast this machine imports (a race before).
HOLD_TORCH = """
import runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background job inherits SIG_IGN
class HoldTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", file=sys.stderr, flush=True)
            time.sleep(120)
        return None
sys.meta_path.insert(0, HoldTorch())
script = sys.argv[1]
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["search.py", "derive.py"])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(script):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_TORCH, os.path.join(ROOT, script)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line == "importing torch\n":
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert lines[0] == "importing torch\n" and lines[1:] == [f"{script}: interrupted\n"], lines[-3:]


def test_sigterm_to_torchrun_says_once_how_to_resume_with_torchrun(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "search.py",
                             "--out", out, "--epochs", "3"] + TINY, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 1  # torchrun's own exit code when it is signalled (the README says so)
    stops = [line for line in lines if line.startswith("search.py: stopped by SIGTERM")]
    assert len(stops) == 1, "".join(lines)
    assert stops[0].endswith(f"; saved {out}/last.pt; the same command continues from there (torchrun "
                             f"--nproc_per_node 2 search.py --out {out} --resume)\n"), stops[0]
    assert checkpoint.load(os.path.join(out, "last.pt"))["loop"]["batch"] > 0
