"""Run folders that nothing can break, tried the way a user and a hostile tester would: resuming with other
settings, bad settings and --out, a second process on the same folder, Ctrl-C / SIGTERM (real signals to real
subprocesses) with an exact mid-epoch resume, a write that fails, a damaged last.pt, unreadable images."""
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from nas.engine import checkpoint
from nas.engine.run_log import epoch_records, read_log
from nas.cli.search import main
from test_search import DEMO, TINY, model_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEARCH = os.path.join(ROOT, "search.py")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("search.py: error: "), err
    return err[0][len("search.py: error: "):]


def _snapshot(folder) -> dict:
    """Every file of a folder with its bytes: a refused command must not change one of them."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_resuming_with_other_settings_is_refused_before_anything_is_written(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TINY + ["--out", out, "--epochs", "1"]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    other = tmp_path / "other.yaml"
    other.write_text(open(DEMO).read().replace("lr: 2.0e-3", "lr: 5.0e-3"))
    for argv, named in [
        (["--model", "local_vim_tiny_search"], "model 'local_vim_demo_search' there, 'local_vim_tiny_search' now"),
        (["--data.num_classes", "5"], "data.num_classes None there, 5 now"),
        (["--img_size", "24"], "img_size 16 there, 24 now"),
        (["--train.lr", "0.01"], "train.lr 0.002 there, 0.01 now"),
        (["--strategy.name", "sampled"], "strategy.name 'joint' there, 'sampled' now"),
        (["-c", str(other)], "train.lr 0.002 there, 0.005 now"),
    ]:
        assert main(TINY + ["--out", out, "--epochs", "2"] + argv) == 2
        message = _error_line(capsys)
        assert message.startswith(f"--out {out} holds a run with other settings (") and named in message, message
        assert message.endswith("start a new run with another --out")
        assert _snapshot(out) == before, argv  # config.yaml, file lists, checkpoints: all as they were
    assert main(TINY + ["--out", out, "--epochs", "2", "--train.workers", "1", "--log.step_interval", "2"]) == 0
    resumed = [r for r in read_log(os.path.join(out, "log.jsonl")) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["changed"] == {
        "train.epochs": [1, 2], "train.workers": [0, 1], "log.step_interval": [50, 2]}
    assert sorted(epoch_records(os.path.join(out, "log.jsonl"))) == [1, 2]
    capsys.readouterr()
    assert main(TINY + ["--out", out, "--epochs", "1"]) == 2
    assert "train.epochs 2 there, 1 now" in _error_line(capsys)
    # the original command finds the run finished and says so
    assert main(TINY + ["--out", out, "--epochs", "2"]) == 0
    assert "all 2 epochs are done" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--train.epochs", "abc"], "train.epochs: expected an int >= 1, got 'abc'"),
    (["--train.epochs", "2.5"], "train.epochs: expected an int >= 1, got 2.5"),
    (["--train.lr", "-1"], "train.lr: expected a number > 0, got -1"),
    (["--train.lr", "abc"], "train.lr: expected a number > 0, got 'abc'"),
    (["--train.workers", "-1"], "train.workers: expected an int >= 0, got -1"),
    (["--seed", "abc"], "seed: expected an int >= 0, got 'abc'"),
    (["--train.label_smoothing", "abc"], "train.label_smoothing: expected a number >= 0 and < 1, got 'abc'"),
    (["--train.amp", "fp16"], "train.amp: expected one of auto, bf16, none, got 'fp16'"),
    (["--train.device", "gpu"], "train.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--strategy.alpha_lr", "0"], "strategy.alpha_lr: expected a number > 0 or null"),
    (["--log.progress", "maybe"], "log.progress: expected true or false, got 'maybe'"),
    (["--train.batch_size", "5000"], "train.batch_size=5000 is larger than the 120 training images"),
    (["--train.lrr", "1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["-c", "localvim_t"], "data.path: this search space names no data"),  # found by name, then checked
    (["-c", "localvim_x"], "-c: 'localvim_x' is neither a config file nor a search space (search spaces: demo, "),
])
def test_bad_settings_are_one_line_errors_that_leave_nothing_behind(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main(TINY + ["--out", str(out), "--train.epochs", "1"] + argv) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_yaml_mistakes_and_bad_out_folders_are_named(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntrain:\n  lr: 1e-3\n   epochs: 3\n")
    assert main(["-c", str(broken), "--out", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == f"config: {broken} line 4, column 10: not valid YAML (mapping values are not allowed here)"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in [(a_file, f"--out {a_file}: this is a file, not a folder"),
                         (a_file / "run", f"--out {a_file}/run: {a_file} is a file, so no folder can be made"),
                         ("/proc/nas_run", "--out /proc/nas_run: cannot create the run folder")]:
        assert main(TINY + ["--out", str(out), "--epochs", "1"]) == 2
        assert _error_line(capsys).startswith(message)
    assert not os.path.exists("/proc/nas_run") and sorted(os.listdir(tmp_path)) == ["a_file", "broken.yaml"]


def test_help_lists_the_search_spaces_and_show_config_prints_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Search spaces (-c NAME): demo, demo_extended, localvim_t, localvmamba_s, localvmamba_t" in text
    assert "--show-config prints every key" in text
    assert main(["-c", "localvim_t", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "model: local_vim_tiny_search\n" in shown and "  label_smoothing: 0.1\n" in shown


def test_a_failed_run_leaves_no_folder_and_no_event_file(tmp_path, capsys):
    out = tmp_path / "nan"
    # a huge lr: the first step sends the weights to inf, the next loss is NaN, the run stops
    assert main(TINY + ["--out", str(out), "--epochs", "1", "--train.lr", "1e30", "--train.max_bad_steps", "1",
                        "--train.clip_grad", "null"]) == 2
    assert "the loss was not finite" in capsys.readouterr().err
    assert not out.exists()


# -- real processes ---------------------------------------------------------------------------------------

def _start(argv, **kwargs):
    return subprocess.Popen([sys.executable, SEARCH] + argv, cwd=ROOT, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(proc, text: str, timeout: float = 300) -> str:
    """Read the process's stderr until a line holds ``text``; returns what was read."""
    seen, deadline = [], time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=1):
                continue
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if text in line:
                return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {text!r} in: {''.join(seen)}")


def _finish(proc, timeout: float = 300) -> tuple[int, str]:
    rest = proc.stderr.read()
    return proc.wait(timeout=timeout), rest


@pytest.mark.parametrize("strategy,sig,workers", [("joint", signal.SIGINT, 1), ("bilevel", signal.SIGTERM, 0),
                                                  ("sampled", signal.SIGTERM, 0)])
def test_a_signal_mid_epoch_checkpoints_the_step_and_the_resume_is_exact(tmp_path, strategy, sig, workers):
    # the first of two epochs: the stop, the rest of the epoch and its evaluation (epoch ends are tested in
    # test_search.py's resume tests)
    # batches of 4: 30 steps an epoch, so that the signal 0.5 s in lands mid-epoch (with the compiled CPU
    # kernels TINY's 5 steps of 24 can all be done by then)
    argv = TINY + ["--epochs", "2", "--train.stop_after_epochs", "1", "--strategy.name", strategy,
                   "--strategy.alpha_lr", "0.05", "--train.batch_size", "4"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    assert main(argv + ["--out", straight]) == 0
    # Ctrl-C reaches the whole process group, DataLoader workers included; a scheduler's SIGTERM the process
    proc = _start(argv + ["--out", stopped, "--train.workers", str(workers)], start_new_session=True)
    _wait_for(proc, "writing to")
    time.sleep(0.5)
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    code, err = _finish(proc)
    last = err.strip().splitlines()[-1]
    assert code == 128 + sig and "Traceback" not in err, err
    assert last.startswith(f"search.py: stopped by {signal.Signals(sig).name} ") and last.endswith(
        f"saved {stopped}/last.pt; the same command continues from there (python search.py --out {stopped} "
        f"--resume)"), last
    loop = checkpoint.load(os.path.join(stopped, "last.pt"))["loop"]
    assert loop["batch"] > 0 or loop["partial"]["trained"] is not None, loop  # inside an epoch, not at its end
    assert main(argv + ["--out", stopped]) == 0  # workers back to 0: a safe change, and still exact
    a, b = model_state(stopped), model_state(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert [r["epoch"] for r in read_log(os.path.join(stopped, "log.jsonl")) if "event" not in r] == [1]
    records = epoch_records(os.path.join(stopped, "log.jsonl"))
    reference = epoch_records(os.path.join(straight, "log.jsonl"))
    for key in ("train_loss", "train_top1", "val_loss"):  # the interrupted epoch's record covers all of it
        assert records[1][key] == pytest.approx(reference[1][key], abs=1e-6), key


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    argv = TINY + ["--out", out, "--epochs", "3"]
    assert main(argv + ["--train.stop_after_epochs", "1"]) == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    proc = _start(argv)
    _wait_for(proc, "resumed from")
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "SIGTERM received")  # a second signal sent before the first is handled would merge with it
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert "Traceback" not in err, err
    if code == 143:  # only when the process was held off the CPU for a whole step: the first stop completed
        assert checkpoint.load(os.path.join(out, "last.pt"))["loop"]["batch"] > 0
    else:
        assert code == 130 and err.strip().splitlines()[-1] == f"search.py: interrupted; {out} keeps its last checkpoint"
        assert open(os.path.join(out, "last.pt"), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_a_second_process_on_the_same_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = str(tmp_path / "run")
    proc = _start(TINY + ["--out", out, "--epochs", "3"])
    try:
        _wait_for(proc, "writing to")
        assert main(TINY + ["--out", out, "--epochs", "3"]) == 2
        assert _error_line(capsys) == (f"--out {out}: another process (pid {proc.pid}) is running in this folder; "
                                       f"wait for it to end or choose another --out")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert main(TINY + ["--out", out, "--epochs", "3", "--train.stop_after_epochs", "1"]) == 0  # kill -9 freed it


LIMITED = ("import resource, signal, sys, runpy\n"
           "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead\n"
           "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))\n"
           "sys.argv = sys.argv[2:]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_a_failing_checkpoint_write_is_one_line_and_the_rerun_logs_each_epoch_once(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TINY + ["--out", out, "--epochs", "1"]) == 0
    size = os.path.getsize(os.path.join(out, "last.pt"))
    # every other file of the run stays far below the limit; the next checkpoint does not fit under it
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(size // 2), SEARCH] + TINY +
                          ["--out", out, "--epochs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last == f"search.py: error: {out}/last.pt: could not be written (File too large)"
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    assert checkpoint.load(os.path.join(out, "last.pt"))["loop"]["epoch"] == 1  # the committed epoch is intact
    assert sorted(epoch_records(os.path.join(out, "log.jsonl"))) == [1, 2]  # epoch 2 logged, not committed
    assert main(TINY + ["--out", out, "--epochs", "2"]) == 0
    epochs = [r["epoch"] for r in read_log(os.path.join(out, "log.jsonl")) if "event" not in r]
    assert epochs == [1, 2]  # epoch 2 redone and logged once
    assert [e["epoch"] for e in json.load(open(os.path.join(out, "alphas.json")))["epochs"]] == [1, 2]


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user namespaces) to mount a small tmpfs")
def test_a_full_small_filesystem_is_one_line_naming_the_file_and_leaves_no_temp(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    # 1 MB: room for the run's small files and one checkpoint, not for best.pt beside it
    script = (f"mount -t tmpfs -o size=1m tmpfs {mount} && {sys.executable} {SEARCH} " + " ".join(TINY) +
              f" --out {mount}/run --epochs 1; code=$?; ls -a {mount}/run; exit $code")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"search.py: error: {mount}/run/") and lines[-1].endswith(
        "could not be written (no space left on the device)"), lines[-1]
    assert ".tmp-" not in proc.stdout and "last.pt" in proc.stdout.split()  # the committed checkpoint stays


def test_a_damaged_last_pt_resumes_from_the_previous_one_and_says_what_was_lost(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = TINY + ["--epochs", "2", "--log.step_interval", "2", "--out", out]
    assert main(argv) == 0
    finished = model_state(out)  # what an uninterrupted run ends with
    last, best = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    for path in (last, best):  # best.pt may hold epoch 2 as well: damage it too, so prev.pt is what is left
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (f"warning: {last} could not be read (damaged, truncated or not a checkpoint: " in err and
            f"; {best} could not be read (" in err and
            "resuming from prev.pt (epoch 1, step 5): the training after it is lost and will be done again" in err)
    lines = read_log(os.path.join(out, "log.jsonl"))
    assert [r.get("event", r.get("epoch")) for r in lines] == [1, "checkpoint_fallback", "resumed", 2]
    assert os.path.isfile(last + ".damaged")
    redone = model_state(out)
    for key in redone:
        torch.testing.assert_close(redone[key], finished[key], rtol=0, atol=1e-6, msg=key)
    # per-step TensorBoard values every 2 steps: loss, the weights' lr and alpha's (the redone steps replace
    # the lost ones: TensorBoard purges the values logged after the step the run resumed from)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(out, "tb")).Reload()
    assert [e.step for e in events.Scalars("step/loss")] == [2, 4, 6, 8, 10]
    assert {"step/lr", "step/alpha_lr"} <= set(events.Tags()["scalars"])


def _image_folder(root, per_class=6, val_per_class=2):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, c, f"{i}.JPEG"))
    bad = [os.path.join(root, "train", "a", "broken.JPEG"), os.path.join(root, "val", "b", "broken.JPEG")]
    for path in bad:
        with open(os.path.join(os.path.dirname(path), "0.JPEG"), "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 4])  # a truncated JPEG
    return bad


def test_unreadable_images_are_named_once_and_counted_per_epoch(tmp_path, capsys):
    bad = _image_folder(tmp_path / "images")
    out = str(tmp_path / "run")
    argv = ["-c", DEMO, "--data", str(tmp_path / "images"), "--train.batch_size", "13", "--model_args.depth", "1",
            "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false",
            "--train.warmup_epochs", "0", "--out", out, "--epochs", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning: ")]
    assert sorted(w.split(" (")[0] for w in warnings) == sorted(f"warning: skipping unreadable image {p}" for p in bad)
    assert not [line for line in err if "warnings.warn" in line or "Warning:" in line]
    records = epoch_records(os.path.join(out, "log.jsonl"))
    assert [records[e]["skipped_images"] for e in (1, 2)] == [2, 2]  # one train and one val image, each epoch
    assert sum("skipped 2 unreadable images" in line for line in err) == 2
