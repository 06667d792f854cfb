"""What a run reports: progress lines on a real terminal (pty) and in a pipe, log.jsonl as the record that
the checkpoint commits, failing appends, and no TensorBoard event file before the first value."""
import json
import os
import pty
import re
import subprocess
import sys
import time

import pytest

from nas.atomic import WriteError
from nas.engine.run_log import ProgressBar, RunLogger, epoch_records, format_duration, format_value, read_log


def test_numbers_stay_truthful_below_one_and_durations_read_as_clocks():
    assert [format_value(v) for v in (0.42, 0.0042, 3.14159, 12.345, 1234.5, 7)] == [
        "0.42", "0.0042", "3.14", "12.3", "1234", "7"]
    assert [format_duration(s) for s in (5, 65, 3725, float("nan"))] == ["0:05", "1:05", "1:02:05", "?"]


def _read_all(master: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode()


def test_a_terminal_gets_one_line_redrawn_in_place_with_elapsed_and_etas(monkeypatch):
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    monkeypatch.setattr(ProgressBar, "redraw_s", 0.0)
    bar = ProgressBar(4, "epoch 1/3", stream=stream, run_eta=lambda left: left + 100)
    for done in range(1, 5):
        time.sleep(0.01)
        bar.update(done, loss=12.3456, img_s=0.42 if done < 4 else 1.5)
    stream.close()
    out = _read_all(master).replace("\r\n", "\n")  # the terminal shows a newline as \r\n
    frames = out.split("\r")[1:]
    assert len(frames) == 4 and all(f.split("\x1b[K")[0].startswith("epoch 1/3 [") for f in frames)
    assert all("\x1b[K" in f for f in frames)  # each redraw clears what a longer line left behind
    assert "img_s 0.42" in frames[0] and ", eta 0:" in frames[0] and ", run eta 1:4" in frames[0]
    assert frames[-1].split("\x1b[K")[0].endswith("4/4 loss 12.3 img_s 1.5 | 0:00 elapsed")
    assert out.count("\n") == 1 and out.endswith("\n")  # the finished line ends once


def _lines_through_a_pipe(total: int) -> list[str]:
    """What a progress pass of ``total`` steps writes to a pipe (not a terminal)."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    bar = ProgressBar(total, "val 1/1", stream=stream)
    for done in range(1, total + 1):
        bar.update(done)
    stream.close()
    return os.fdopen(read_end).read().splitlines()


def test_a_pipe_gets_plain_lines_only_now_and_then(monkeypatch):
    lines = _lines_through_a_pipe(1000)
    assert lines == ["val 1/1 [####################] 1000/1000  | 0:00 elapsed"]  # a fast pass: its end only
    monkeypatch.setattr(ProgressBar, "line_s", 0.0)
    lines = _lines_through_a_pipe(100)
    assert [line.split("] ")[1].split(" ")[0] for line in lines] == ["1/100"] + [f"{d}/100" for d in range(10, 101, 10)]
    assert all("\r" not in line and "\x1b" not in line for line in lines)


def test_the_checkpoint_commits_epochs_so_a_redone_epoch_is_logged_once(tmp_path):
    logger = RunLogger(str(tmp_path), tensorboard=False)
    for epoch in (1, 2, 3):
        logger.epoch({"epoch": epoch, "val_top1": float(epoch)})
    logger.event("resumed", epochs_done=2)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 4, "val_to')  # a line cut short by a crash
    logger.commit(epoch=2, step=20)  # the checkpoint it resumes from holds epoch 2
    logger.epoch({"epoch": 3, "val_top1": 30.0})
    assert [r.get("event", r.get("epoch")) for r in read_log(str(tmp_path / "log.jsonl"))] == [1, 2, "resumed", 3]
    assert epoch_records(str(tmp_path / "log.jsonl"))[3]["val_top1"] == 30.0


APPEND = ("import resource, signal, sys\n"
          "from nas.engine.run_log import RunLogger\n"
          "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
          "logger = RunLogger(sys.argv[1], tensorboard=False)\n"
          "logger.epoch({'epoch': 1, 'pad': 'x' * 100})\n"
          "resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))\n"
          "try:\n"
          "    logger.epoch({'epoch': 2, 'pad': 'x' * 400})\n"
          "except Exception as exc:\n"
          "    print(type(exc).__name__, exc)\n")


def test_a_failing_append_names_the_file_and_leaves_no_half_line(tmp_path):
    out = subprocess.run([sys.executable, "-c", APPEND, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"WriteError {tmp_path}/log.jsonl: could not be written (File too large)", out.stderr
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "log.jsonl")] == [1]


def test_no_event_file_before_the_first_value(tmp_path):
    logger = RunLogger(str(tmp_path))
    logger.info("starting")
    logger.close()
    assert not os.path.exists(tmp_path / "tb")
    logger = RunLogger(str(tmp_path), interval=5)
    logger.step({"step/loss": 1.0}, 3)  # not a multiple of the interval: nothing written yet
    assert not os.path.exists(tmp_path / "tb")
    logger.step({"step/loss": 1.0}, 5)
    logger.close()
    assert [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.")]


def test_a_log_that_cannot_be_opened_is_a_write_error_naming_it(tmp_path):
    with pytest.raises(WriteError, match=re.escape(f"{tmp_path}/gone/log.jsonl: could not be written (No such file")):
        RunLogger(str(tmp_path / "gone"), tensorboard=False).epoch({"epoch": 1})
