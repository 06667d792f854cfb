"""derive.py: arch.yaml from a search run, figures, retraining (scratch and inherited), bad input."""
import json
import os
import shutil

import pytest
import torch
import yaml

from nas.derive.cli import main as derive_main
from nas.derive.cli import parse_args, prepare_retrain
from nas.derive.retrain import build_model
from nas.engine import checkpoint
from nas.models import create_model
from nas.ops import DIRECTIONS
from nas.search.run import main as search_main

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "search_spaces", "demo.yaml")
TINY = ["--model_args.depth", "2", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false"]


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("search") / "run")
    assert search_main(["-c", DEMO, "--out", out, "--epochs", "2", "--data.images_per_class", "12",
                        "--train.batch_size", "24", "--train.warmup_epochs", "0", "--strategy.alpha_lr", "0.1"] + TINY) == 0
    return out


def copy_run(search_run, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(search_run, dst)
    return dst


def test_derive_writes_top_k_of_the_stored_probabilities(search_run, tmp_path, capsys):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run]) == 0
    arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
    alphas = [v.view(-1) for k, v in checkpoint.load(os.path.join(run, "last.pt"))["model"].items()
              if k.endswith("multi_scan.weights")]
    probs = torch.stack(alphas).softmax(1)
    assert arch["model"] == "local_vim_demo" and arch["k"] == 4 and len(arch["directions"]) == 2
    for layer, p in zip(arch["directions"], probs):
        want = sorted(p.topk(4).indices.tolist())
        assert layer == [DIRECTIONS[i] for i in want]  # the top 4, in DIRECTIONS order
    torch.testing.assert_close(torch.tensor(arch["probs"], dtype=torch.float64), probs.double(), atol=1e-6, rtol=0)
    printed = capsys.readouterr().out
    assert "directions = [" in printed and "(* = kept" in printed
    for name in ("alphas.png", "alpha_history.png", "scan_orders.png"):
        assert os.path.getsize(os.path.join(run, "figures", name)) > 1000
    first = open(os.path.join(run, "arch.yaml")).read()
    assert derive_main([run]) == 0 and open(os.path.join(run, "arch.yaml")).read() == first  # deterministic


def test_derive_from_alphas_json_alone_and_other_k(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    for name in ("last.pt", "best.pt"):
        os.remove(os.path.join(run, name))
    assert derive_main([run, "-k", "3"]) == 0
    arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
    last = json.load(open(os.path.join(run, "alphas.json")))["epochs"][-1]["probs"]
    for layer, p in zip(arch["directions"], torch.tensor(last)):
        assert layer == [DIRECTIONS[i] for i in sorted(p.topk(3).indices.tolist())]


def test_arch_yaml_round_trips_into_create_model(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run]) == 0
    path = os.path.join(run, "arch.yaml")
    arch = yaml.safe_load(open(path))
    model = create_model(arch["model"], directions=path, **arch["model_args"])
    assert [list(d) for d in model.directions] == arch["directions"]


def test_retrain_improves_held_out_accuracy(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run, "--retrain", "--epochs", "2", "--data.images_per_class", "40", "--train.lr", "3e-3",
                        "--train.batch_size", "32", "--train.warmup_epochs", "0", "--train.mixup", "0",
                        "--train.cutmix", "0", "--model_args.drop_path_rate", "0", "--log.progress", "false"]) == 0
    lines = [json.loads(line) for line in open(os.path.join(run, "retrain", "log.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[1]["val_top1"] > lines[0]["val_top1"] and "val_top5" in lines[1]
    assert os.path.isfile(os.path.join(run, "retrain", "last.pt"))


def test_inherit_copies_the_kept_directions(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run]) == 0
    cfg, _ = prepare_retrain(*parse_args([run, "--retrain", "--inherit"]))
    model = build_model(cfg, num_classes=10)
    supernet = checkpoint.load(os.path.join(run, "last.pt"))["model"]
    arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
    for layer, kept in enumerate(arch["directions"]):
        for position, name in enumerate(kept):
            canonical = DIRECTIONS.index(name)
            got = model.state_dict()[f"layers.{layer}.mixer.x_proj_{position}.weight"]
            torch.testing.assert_close(got, supernet[f"layers.{layer}.mixer.x_proj_{canonical}.weight"], rtol=0, atol=0)


def _edit_arch(run, **changes):
    path = os.path.join(run, "arch.yaml")
    arch = yaml.safe_load(open(path))
    arch.update(changes)
    yaml.safe_dump(arch, open(path, "w"))


@pytest.mark.parametrize("case,message", [
    ("empty_folder", "holds no config.yaml, last.pt or alphas.json"),
    ("k0", "-k: expected an int from 1 to 8"),
    ("k9", "-k: expected an int from 1 to 8"),
    ("layers", "expected 2 per-layer lists"),
    ("unknown_direction", "diagonal"),
    ("unknown_model", "unknown model name 'local_vim_nope'"),
])
def test_bad_input_is_one_line_exit_2(search_run, tmp_path, capsys, case, message):
    run = copy_run(search_run, tmp_path)
    argv = [run]
    if case == "empty_folder":
        argv = [str(tmp_path)]
    elif case in ("k0", "k9"):
        argv = [run, "-k", case[1:]]
    else:
        assert derive_main([run]) == 0
        capsys.readouterr()
        arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
        if case == "layers":
            _edit_arch(run, directions=arch["directions"][:1])
        elif case == "unknown_direction":
            _edit_arch(run, directions=[["h", "v", "w2", "diagonal"]] + arch["directions"][1:])
        else:
            _edit_arch(run, model="local_vim_nope")
        argv = [run, "--retrain", "--epochs", "1"]
    assert derive_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("derive.py: error: ") and message in err[0], err
