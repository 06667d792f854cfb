"""derive.py --retrain does what the command asks: per-layer k (derived or written by hand) retrains; a
retraining folder that holds another architecture or start is refused naming the difference and --out; the
search's own data settings are named when --data cannot satisfy them; --inherit blames the image size when
that is why the weights do not fit; a search still in its first epoch is not told to be resumed."""
import os
import shutil
import sys

import pytest
import yaml

from nas.cli.derive import main as derive_main
from nas.cli.search import main as search_main
from nas.engine import checkpoint
from nas.engine.lock import RunLock
from nas.engine.run_log import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "search_spaces", "demo.yaml")
SEARCH = ["-c", DEMO, "--data.images_per_class", "12", "--data.num_classes", "4", "--train.batch_size", "16",
          "--train.warmup_epochs", "0", "--model_args.depth", "2", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false",
          "--log.tensorboard", "false"]
RETRAIN = ["--retrain", "--epochs", "1", "--train.warmup_epochs", "0", "--train.batch_size", "16",
           "--log.progress", "false"]


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    """A 2-epoch search of the tiny supernet, stopped after epoch 1 (copied) and finished."""
    base = tmp_path_factory.mktemp("search")
    run = str(base / "run")
    assert search_main(SEARCH + ["--out", run, "--epochs", "2", "--train.stop_after_epochs", "1"]) == 0
    shutil.copytree(run, str(base / "epoch1"))
    assert search_main(SEARCH + ["--out", run, "--epochs", "2"]) == 0
    return {"epoch1": str(base / "epoch1"), "final": run}


def _copy(folder, tmp_path, name="run"):
    return shutil.copytree(folder, str(tmp_path / name))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("derive.py: error: "), err
    return err[0][len("derive.py: error: "):]


def _epochs_trained(out):
    return [r["epoch"] for r in read_log(os.path.join(out, "log.jsonl")) if "event" not in r]


def test_per_layer_k_retrains_and_a_retraining_folder_keeps_its_architecture(searches, tmp_path, capsys):
    run = _copy(searches["epoch1"], tmp_path)
    out = os.path.join(run, "retrain")
    assert derive_main([run, "-k", "2,3"]) == 0
    assert derive_main([run, "-k", "2,3"] + RETRAIN) == 0
    printed = capsys.readouterr().out
    kept = yaml.safe_load(open(os.path.join(run, "arch.yaml")))["directions"]
    assert [len(d) for d in kept] == [2, 3]
    assert f"  layer  0: {', '.join(kept[0])}\n  layer  1: {', '.join(kept[1])}\n" in printed
    assert "% after 1 epoch\n" in printed
    assert f"logs: tensorboard --logdir {run} (search in tb/, retraining in retrain/tb/)" in printed
    # the same command again reports the finished retraining
    assert derive_main([run, "-k", "2,3"] + RETRAIN) == 0 and _epochs_trained(out) == [1]
    capsys.readouterr()
    # another start, or another architecture, in the same folder: refused, naming the difference and --out
    assert derive_main([run, "-k", "2,3", "--inherit"] + RETRAIN) == 2
    assert _error(capsys) == (f"--out {out} holds a retraining of another architecture or start (from scratch there, "
                              f"from the supernet's weights (--inherit) now); retrain into another folder with --out "
                              f"DIR, or delete {out}")
    # an arch.yaml written by hand without scans_per_layer runs the scans its lists name
    arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
    del arch["model_args"]["scans_per_layer"], arch["k"]
    arch["directions"] = [["h", "v", "w2"], ["h_flip", "v_flip"]]
    yaml.safe_dump(arch, open(os.path.join(run, "arch.yaml"), "w"))
    capsys.readouterr()
    assert derive_main([run] + RETRAIN) == 2
    assert _error(capsys) == (f"--out {out} holds a retraining of another architecture or start (layer 0: "
                              f"{', '.join(kept[0])} there, h, v, w2 now; layer 1: {', '.join(kept[1])} there, "
                              f"h_flip, v_flip now); retrain into another folder with --out DIR, or delete {out}")
    assert _epochs_trained(out) == [1]
    other = os.path.join(run, "retrain_hand")
    assert derive_main([run, "--out", other] + RETRAIN) == 0
    assert "  layer  0: h, v, w2\n  layer  1: h_flip, v_flip\n" in capsys.readouterr().out
    assert yaml.safe_load(open(os.path.join(other, "config.yaml")))["directions"] == arch["directions"]
    # the search goes on: the retraining of epoch 1's architecture is not reported as current
    for name in ("last.pt", "best.pt", "alphas.json"):
        shutil.copy(os.path.join(searches["final"], name), os.path.join(run, name))
    capsys.readouterr()
    assert derive_main([run, "-k", "2,3"] + RETRAIN) == 2
    assert _error(capsys).endswith(f"the run's latest alphas are from epoch 2; derive it again (python derive.py {run} "
                                   f"-k 2,3) or delete it, then retrain with another --out ({out} holds a retraining "
                                   f"already)")
    assert derive_main([run, "-k", "2,3"]) == 0
    capsys.readouterr()
    assert derive_main([run, "-k", "2,3"] + RETRAIN) == 2
    assert "search epoch 1 there, 2 now" in _error(capsys)


def test_what_the_retraining_inherits_is_named(searches, tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    from data_testing import make_image_root
    run = _copy(searches["final"], tmp_path)
    images = make_image_root(str(tmp_path / "images"), train_per_class=10, val_per_class=2)
    assert derive_main([run, "--data", images, "--data.num_classes", "3"] + RETRAIN) == 2
    assert _error(capsys).endswith(
        f"has only 10 images (data.images_per_class 12: the search's setting, from {run}/config.yaml, which the "
        f"retraining keeps; override it on the command line, e.g. --data.images_per_class null)")
    assert derive_main([run, "--inherit", "--img_size", "56"] + RETRAIN) == 2
    assert _error(capsys) == (f"--inherit: the supernet's weights ({run}) do not fit a model with other sizes than "
                              f"the search's (img_size 16 in the search, 56 here); retrain with the search's "
                              f"settings, or from scratch without --inherit")
    assert not os.path.exists(os.path.join(run, "retrain"))


def test_a_search_in_its_first_epoch_is_not_told_to_resume(searches, tmp_path, capsys):
    run = str(tmp_path / "run")
    os.makedirs(run)
    shutil.copy(os.path.join(searches["final"], "config.yaml"), run)
    lock = RunLock(run).acquire()  # the search holds its folder while it runs
    try:
        assert derive_main([run]) == 2
        assert _error(capsys) == (f"run: {run!r} has no finished search epoch yet: the search running in it (pid "
                                  f"{os.getpid()}) writes last.pt and alphas.json when its first epoch ends; derive "
                                  f"then")
    finally:
        lock.release()
    assert derive_main([run]) == 2
    assert _error(capsys).endswith("resume the search with the same search.py command")


def test_an_empty_last_pt_is_read_past_alike_by_derive_and_search(searches, tmp_path, capsys):
    """derive.py reads the checkpoint search.py resumes from, and the search leaves a last.pt behind even when
    nothing is left to train."""
    run = _copy(searches["final"], tmp_path)
    last = os.path.join(run, "last.pt")
    open(last, "wb").close()
    capsys.readouterr()
    assert derive_main([run]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"derive.py: warning: {last} could not be read (the file is empty); "
                                               f"derived from "), err
    assert err[0].endswith(", the checkpoint search.py resumes from")
    assert search_main(SEARCH + ["--out", run, "--epochs", "2"]) == 0
    assert checkpoint.load(last)["loop"]["epoch"] == 2 and os.path.isfile(last + ".damaged")
    capsys.readouterr()
    assert derive_main([run]) == 0 and capsys.readouterr().err == ""


def test_the_scan_drawing_uses_the_models_token_grid(searches, tmp_path, monkeypatch):
    from nas.derive import export
    drawn = []

    def spy(*args, **kwargs):
        drawn.append(args)
        return scan_orders_figure(*args, **kwargs)

    scan_orders_figure = export.scan_orders_figure
    monkeypatch.setattr(export, "scan_orders_figure", spy)
    assert derive_main([_copy(searches["final"], tmp_path)]) == 0
    assert drawn == [(4, 4)]  # 16 x 16 images in 4 x 4 patches
    assert export.drawn_grid([(56, 56)] * 2 + [(28, 28)] * 2 + [(14, 14)] * 9 + [(7, 7)] * 2) == (14, 14)
