"""search.py --tune under a scheduler's SIGTERM (a real signal to a real worker process): no traceback, the
command that continues printed, the trial queued again and continued from its folder by the next --tune; and the
mistakes that must fail before anything is written: a --storage file that is no study database, a tuned value
the search would refuse."""
import os
import signal

import pytest
from optuna.trial import TrialState

from nas.cli.search import main
from nas.tune import load_study
from nas.engine.run_log import read_log
from tune_testing import TINY, worker


def test_sigterm_during_a_trial_loses_nothing_and_the_same_command_continues_it(tmp_path, capsys):
    out = str(tmp_path / "study")
    argv = TINY + ["--tune", "1", "--out", out]
    proc = worker(argv)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1:"):  # inside the trial's second (last) epoch
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143, "".join(lines)
    printed = "".join(lines)
    assert "Traceback" not in printed and "Trial 0 failed" not in printed, printed
    assert lines[-1].startswith("search.py: stopped by SIGTERM in epoch 2 ") and lines[-1].endswith(
        f"; the same command continues from there (python search.py {' '.join(argv)})\n"), lines[-1]
    stopped, queued = load_study(out).get_trials()
    assert stopped.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.params == stopped.params
    assert os.path.isfile(os.path.join(out, "trial_0000", "last.pt"))

    assert main(argv) == 0  # the same command: the stopped trial goes on from its checkpoint
    assert "0 failed (1 stopped by a signal and queued again)" in capsys.readouterr().out
    trials = load_study(out).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["run_dir"] == os.path.join(out, "trial_0000")
    assert sorted(n for n in os.listdir(out) if n.startswith("trial_")) == ["trial_0000"]
    log = read_log(os.path.join(out, "trial_0000", "log.jsonl"))
    assert [r.get("event") or r["epoch"] for r in log] == [1, "resumed", 2]


@pytest.mark.parametrize("argv,message", [
    (["--storage", "BEST_YAML"], "--storage: BEST_YAML is neither a SQLite database nor an Optuna journal file"),
    (["--tune.params.strategy.k", "{type: categorical, choices: [9]}"],
     "tune.params.strategy.k = 9: strategy.k: expected an int from 1 to 8 (the number of candidates), got 9"),
    (["--tune.params.strategy.k", "{type: int, low: 1, high: 9}"],
     "tune.params.strategy.k = 9: strategy.k: expected an int from 1 to 8"),
])
def test_a_study_that_cannot_start_is_one_line_and_leaves_no_folder(tmp_path, capsys, argv, message):
    best = tmp_path / "best.yaml"
    best.write_text("study_name: other\nstorage: sqlite:///nowhere.db\n")
    out = str(tmp_path / "study")
    argv = [str(best) if a == "BEST_YAML" else a for a in argv]
    assert main(TINY + ["--tune", "1", "--out", out] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("search.py: error: " + message.replace("BEST_YAML", str(best))), err
    assert not os.path.exists(out)


def test_a_storage_that_fails_to_open_removes_the_folder_it_made(tmp_path, capsys):
    out = str(tmp_path / "study")
    assert main(TINY + ["--tune", "1", "--out", out, "--storage", "nosuchdriver://host/db"]) == 2
    assert "cannot open the study storage" in capsys.readouterr().err
    assert not os.path.exists(out)
