"""derive.py --retrain keeps its run folder as safe as search.py does: settings checked before anything is
written, a resume refusing other settings, the folder lock, and SIGTERM (a real signal to a real subprocess)
with an exact mid-epoch resume of the recipe's mixup and EMA."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nas.cli.derive import main as derive_main
from nas.engine import checkpoint
from nas.engine.run_log import read_log
from nas.cli.search import main as search_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "search_spaces", "demo.yaml")
SMALL = ["--model_args.depth", "2", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false"]
# the demo's recipe with mixup and an EMA, so both their states cross the resume
RETRAIN = ["--retrain", "--train.epochs", "2", "--train.warmup_epochs", "0", "--train.batch_size", "24",
           "--train.mixup", "0.4", "--train.ema_decay", "0.9", "--log.progress", "false"]


@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    """A 1-epoch search of the tiny supernet, derived (RUN/arch.yaml)."""
    run = str(tmp_path_factory.mktemp("search") / "run")
    assert search_main(["-c", DEMO, "--out", run, "--epochs", "1", "--data.images_per_class", "12",
                        "--train.batch_size", "24", "--train.warmup_epochs", "0"] + SMALL) == 0
    assert derive_main([run]) == 0
    return run


@pytest.fixture
def run(derived, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(derived, dst)
    return dst


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("derive.py: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1][len("derive.py: error: "):]


@pytest.mark.parametrize("argv,message", [
    (["--train.epochs", "abc"], "train.epochs: expected an int >= 1, got 'abc'"),
    (["--train.mixup", "-1"], "train.mixup: expected a number >= 0, got -1"),
    (["--train.ema_decay", "2"], "train.ema_decay: expected a number > 0 and < 1 or null (no EMA), got 2"),
    (["--train.device", "gpu"], "train.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--train.batch_size", "5000"], "train.batch_size=5000 is larger than the 120 training images per process"),
])
def test_bad_retrain_settings_are_one_line_and_write_nothing(run, capsys, argv, message):
    assert derive_main([run] + RETRAIN + argv) == 2
    assert message in _error(capsys)
    assert not os.path.exists(os.path.join(run, "retrain"))


def test_inherit_with_another_class_count_names_both_counts(run, capsys):
    assert derive_main([run] + RETRAIN + ["--inherit", "--data.num_classes", "5"]) == 2
    message = _error(capsys)
    assert message.startswith("--inherit: the supernet in ") and message.endswith(
        " was trained on 10 classes but the retraining data has 5; retrain from scratch (without --inherit) or on "
        "data with the search's classes")


def test_a_resumed_retraining_refuses_other_settings_and_records_safe_ones(run, capsys):
    assert derive_main([run] + RETRAIN + ["--train.stop_after_epochs", "1"]) == 0
    out = os.path.join(run, "retrain")
    capsys.readouterr()
    assert derive_main([run] + RETRAIN + ["--train.lr", "0.01"]) == 2
    assert "train.lr 0.002 there, 0.01 now" in _error(capsys)
    assert derive_main([run] + RETRAIN + ["--train.workers", "1"]) == 0  # a resume keeps the saved config
    events = [r for r in read_log(os.path.join(out, "log.jsonl")) if "event" in r]
    assert [e["event"] for e in events] == ["resumed"]
    assert events[0]["changed"] == {"train.workers": [0, 1]}


HOLD = ("import sys, time\n"
        "from nas.engine.lock import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


def test_a_retraining_folder_in_use_is_refused_naming_the_holder(run, capsys):
    out = os.path.join(run, "retrain")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert derive_main([run] + RETRAIN) == 2
        assert f"another process (pid {holder.pid}) is running in this folder" in _error(capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.listdir(out) == [".lock"]  # nothing of the refused retraining was written


def test_sigterm_mid_retraining_then_resume_equals_an_uninterrupted_retraining(run, tmp_path):
    # batches of 4 (60 steps): the signal 0.5 s in lands mid-run, however fast the steps
    retrain = RETRAIN + ["--train.batch_size", "4"]
    straight = str(tmp_path / "straight")
    assert derive_main([run] + retrain + ["--out", straight]) == 0
    stopped = str(tmp_path / "stopped")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "derive.py"), run] + retrain + ["--out", stopped],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if "writing to" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=600) != 0 and "Traceback" not in err, err
    assert f"stopped by SIGTERM " in err and f"saved {stopped}/last.pt; the same command continues" in err, err
    loop = checkpoint.load(os.path.join(stopped, "last.pt"))["loop"]
    assert loop["batch"] > 0 or loop["partial"]["trained"] is not None, loop
    assert derive_main([run] + retrain + ["--out", stopped]) == 0
    a, b = (checkpoint.load(os.path.join(d, "last.pt")) for d in (stopped, straight))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    for key in a["task"]["ema"]:  # the EMA of the weights resumed with them
        torch.testing.assert_close(a["task"]["ema"][key], b["task"]["ema"][key], rtol=0, atol=1e-6, msg=key)
