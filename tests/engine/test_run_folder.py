"""The run folder: its lock (real processes, kill -9), --out checks, cleanup of failed commands, stale temps,
the fallback from a damaged last.pt and the comparison of a resume's settings with the checkpoint's."""
import os
import signal
import subprocess
import sys

import pytest

from nas.engine import checkpoint
from nas.engine.distributed import DistEnv
from nas.engine.lock import RunLock, RunLocked, probe_lock
from nas.engine.run_log import RunLogger, read_log
from nas.engine.session import (ResumeMismatch, check_out_folder, find_resume, resume_changes, run_folder,
                                use_resume)
from nas.errors import UserError

HOLD = ("import sys, time\n"
        "from nas.engine.lock import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_until_the_holder_dies(tmp_path):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    holder = _holder(folder)
    try:
        with pytest.raises(RunLocked) as info:
            RunLock(folder).acquire()
        assert str(info.value) == (f"--out {folder}: another process (pid {holder.pid}) is running in this folder; "
                                   f"wait for it to end or choose another --out")
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            probe_lock(folder)
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            check_out_folder(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(folder).acquire()  # the kernel dropped the dead holder's lock: nothing to clean by hand
    assert open(os.path.join(folder, ".lock")).read().strip() == str(os.getpid())
    lock.release()
    probe_lock(folder)


def test_bad_out_folders_are_refused_before_anything_is_written(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=f"--out {a_file}: this is a file, not a folder"):
        check_out_folder(str(a_file))
    with pytest.raises(UserError, match=f"--out {a_file}/run: {a_file} is a file, so no folder can be made under it"):
        check_out_folder(str(a_file / "run"))
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    if not os.access(read_only, os.W_OK):  # root may write anywhere
        with pytest.raises(UserError, match=f"{read_only} is not writable"):
            check_out_folder(str(read_only / "run"))
    # where the checks cannot tell (root and /proc), creating the folder is the first write, and it fails cleanly
    with pytest.raises(UserError, match="--out /proc/nas_run/x: cannot create the run folder"):
        with run_folder("/proc/nas_run/x", DistEnv()):
            pass
    assert sorted(os.listdir(tmp_path)) == ["file", "ro"]
    check_out_folder(str(tmp_path / "new" / "run"))
    assert not os.path.exists(tmp_path / "new")


def test_a_failed_command_removes_the_folder_it_created_but_keeps_one_with_a_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with run_folder(out, DistEnv()):
            open(os.path.join(out, "config.yaml"), "w").write("x: 1\n")
            raise RuntimeError("failed before any checkpoint")
    assert not os.path.exists(out)
    with pytest.raises(RuntimeError):
        with run_folder(out, DistEnv()):
            checkpoint.save({"x": 1}, os.path.join(out, "last.pt"))
            raise RuntimeError("failed after one")
    assert sorted(os.listdir(out)) == [".lock", "last.pt"]
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with run_folder(str(existing), DistEnv()):
            raise RuntimeError("a folder the user made stays")
    assert existing.is_dir()


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    stale = [out / ".last.pt.tmp-123-abc", out / ".prev.pt.tmp-123", out / "figures" / ".alphas.png.tmp-9-x"]
    for path in stale:
        path.write_bytes(b"half")
    (out / "notes.txt").write_text("the user's")
    with run_folder(str(out), DistEnv()):
        assert not any(p.exists() for p in stale) and (out / "notes.txt").exists()


def _run_checkpoint(epoch, step, batch=0, **config):
    return {"model": {}, "optimizer": {}, "task": {}, "rng": {}, "record": {},
            "loop": {"epoch": epoch, "step": step, "batch": batch}, "config": config}


@pytest.mark.parametrize("damage", [b"", b"\x00\x17garbage" * 50, "truncate"])
def test_a_damaged_last_pt_falls_back_to_the_newest_readable_checkpoint(tmp_path, damage, capsys):
    out = str(tmp_path)
    checkpoint.save(_run_checkpoint(1, 5), os.path.join(out, "best.pt"))
    checkpoint.save(_run_checkpoint(2, 10), os.path.join(out, "last.pt"))
    checkpoint.save(_run_checkpoint(3, 15), os.path.join(out, "last.pt"), keep_previous=True)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:300] if damage == "truncate" else damage)
    point = find_resume(out)
    assert point.name == "prev.pt" and point.state["loop"]["epoch"] == 2
    logger = RunLogger(out, tensorboard=False)
    assert use_resume(point, out, DistEnv(), logger)["loop"]["step"] == 10
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: {last} could not be read (") and err.endswith(
        "; resuming from prev.pt (epoch 2, step 10): the training after it is lost and will be done again")
    event = read_log(os.path.join(out, "log.jsonl"))[0]
    assert event["event"] == "checkpoint_fallback" and event["used"] == "prev.pt" and event["epochs_done"] == 2
    assert (tmp_path / "last.pt.damaged").exists()  # kept, and not linked as prev.pt later
    assert checkpoint.load(str(last))["loop"]["step"] == 10  # last.pt is the checkpoint resumed from again


def test_best_pt_is_used_when_it_is_newer_and_all_damaged_is_an_error(tmp_path):
    out = str(tmp_path)
    checkpoint.save(_run_checkpoint(2, 10), os.path.join(out, "prev.pt"))
    checkpoint.save(_run_checkpoint(3, 15), os.path.join(out, "best.pt"))
    (tmp_path / "last.pt").write_bytes(b"")
    assert find_resume(out).name == "best.pt"
    for name in ("prev.pt", "best.pt"):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(checkpoint.CheckpointError, match=f"{out}: no checkpoint can be read .*move the folder away"):
        find_resume(out)
    assert find_resume(str(tmp_path / "empty")) is None


def test_resume_allows_safe_changes_and_names_both_values_of_the_others(tmp_path):
    saved = {"model": "a_search", "data": {"path": "demo", "num_classes": 10},
             "train": {"epochs": 5, "lr": 1e-3, "workers": 4}, "log": {"progress": True}, "name": "x"}
    checkpoint.save(_run_checkpoint(2, 10, **saved), str(tmp_path / "last.pt"))
    point = find_resume(str(tmp_path))
    safe = {**saved, "train": {"epochs": 8, "lr": 1e-3, "workers": 0}, "log": {"progress": False}, "name": "y",
            "new_key": 1}
    assert resume_changes(point, safe, "R", also_safe=("name",)) == {
        "train.epochs": [5, 8], "train.workers": [4, 0], "log.progress": [True, False], "name": ["x", "y"]}
    unsafe = {**saved, "model": "b_search", "data": {"path": "demo", "num_classes": 5},
              "train": {"epochs": 3, "lr": 1e-3, "workers": 4}}
    with pytest.raises(ResumeMismatch) as info:
        resume_changes(point, unsafe, "R")
    assert str(info.value) == ("--out R holds a run with other settings (model 'a_search' there, 'b_search' now; "
                               "data.num_classes 10 there, 5 now; train.epochs 5 there, 3 now); a resumed run keeps "
                               "its model, data, strategy and optimizer settings (train.epochs may only grow): start "
                               "a new run with another --out")
    assert resume_changes(None, unsafe, "R") == {}
