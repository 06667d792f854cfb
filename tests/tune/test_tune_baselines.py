"""search.py --baseline fixed|random|published|tpe and --compare, in tiny settings."""
import json
import os

import pytest
import yaml
from tune_testing import LOCALVIM_T, TINY, TINY_RETRAIN, demo_with

from nas.derive.arch_file import load_arch
from nas.models import check_directions, create_model, published_directions
from nas.ops import DIRECTIONS
from nas.cli.derive import main as derive_main
from nas.cli.search import main
from nas.tune import load_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def arch_of(out, kind):
    path = os.path.join(out, "baselines", kind, "arch.yaml")
    arch = load_arch(path)  # what the retraining reads, checked against its model
    check_directions(arch["directions"], len(arch["directions"]), arch["k"], arch["model"])
    for layer in arch["directions"]:
        assert layer == [d for d in DIRECTIONS if d in layer]  # canonical order
    return arch


def test_fixed_and_random_baselines(tmp_path):
    out = str(tmp_path / "b")
    assert main(TINY + ["--baseline", "fixed", "--out", out]) == 0
    fixed = arch_of(out, "fixed")
    assert fixed["model"] == "local_vim_demo" and fixed["k"] == 4
    assert fixed["directions"] == [["h", "h_flip", "v", "v_flip"]] * 2  # TINY has 2 layers
    assert fixed["probs"][0] == [0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0]
    model = create_model(fixed["model"], directions=os.path.join(out, "baselines", "fixed", "arch.yaml"),
                         **fixed["model_args"])
    assert [list(d) for d in model.directions] == fixed["directions"]

    draws = []
    for seed in (0, 0, 1):
        argv = demo_with(tmp_path, baseline={"seed": seed})
        assert main(argv + ["--baseline", "random", "--out", out, "--model_args.depth", "6"]) == 0
        draws.append(arch_of(out, "random")["directions"])
    assert draws[0] == draws[1] != draws[2] and len(draws[0]) == 6
    assert all(len(set(layer)) == 4 for layer in draws[0]) and len({tuple(x) for x in draws[0]}) > 1


def test_a_baselines_arch_yaml_retrains_with_derive_py_like_a_searched_one(tmp_path, capsys):
    """One builder for both kinds: the baseline's folder holds its search config, so derive.py retrains it with
    the search's data and retraining recipe; deriving it (it has no alphas) or another -k is a one-line error."""
    out = str(tmp_path / "b")
    assert main(TINY + ["--baseline", "fixed", "--out", out, "--retrain.train.epochs", "1",
                        "--retrain.log.progress", "false", "--retrain.log.tensorboard", "false"]) == 0
    folder = os.path.join(out, "baselines", "fixed")
    capsys.readouterr()
    assert derive_main([folder]) == 2
    assert "is a baseline's folder" in capsys.readouterr().err
    assert derive_main([folder, "--retrain", "-k", "3"]) == 2
    assert "keeps the directions it was chosen with" in capsys.readouterr().err
    assert derive_main([folder, "--retrain", "--train.batch_size", "24", "--train.workers", "0",
                        "--train.warmup_epochs", "0", "--train.mixup", "0", "--train.cutmix", "0"]) == 0
    with open(os.path.join(folder, "retrain", "config.yaml")) as f:
        retrained = yaml.safe_load(f)
    assert retrained["model"] == "local_vim_demo" and retrained["arch"] == os.path.join(folder, "arch.yaml")
    assert retrained["train"]["epochs"] == 1 and retrained["img_size"] == 16  # the search config's retrain: and size
    assert retrained["model_args"]["depth"] == 2 and retrained["data"]["images_per_class"] == 12
    printed = capsys.readouterr().out
    assert "the baseline's directions per layer (local_vim_demo):" in printed
    assert "retrained local_vim_demo: val top-1" in printed and "% after 1 epoch\n" in printed
    assert "figures:" not in printed and "logs:" not in printed  # a baseline has no figures, no TensorBoard here
    assert derive_main([folder, "--retrain", "-k", "3"]) == 2  # refused also once its retraining exists
    assert "keeps the directions it was chosen with" in capsys.readouterr().err


def test_published_baseline_is_localmamba_list_or_an_error(tmp_path, capsys):
    out = str(tmp_path / "p")
    assert main(["-c", LOCALVIM_T, "--data", "demo", "--baseline", "published", "--out", out]) == 0
    arch = arch_of(out, "published")
    assert arch["model"] == "local_vim_tiny" and arch["directions"] == published_directions("local_vim_tiny")
    assert main(TINY + ["--baseline", "published", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "published no directions for local_vim_demo" in err[0]
    assert main(TINY + ["--baseline", "fixed", "--strategy.k", "3", "--out", out]) == 2
    assert "strategy.k is 3" in capsys.readouterr().err


def test_tpe_baseline_and_compare_table(tmp_path):
    out = str(tmp_path / "c")
    compare = {"strategies": ["joint", "sampled"], "retrain": TINY_RETRAIN, "seeds": [0]}
    argv = demo_with(tmp_path, baseline={"tpe_epochs": 1, "tpe_trials": 2}, compare=compare) + ["--out", out]
    assert main(argv + ["--baseline", "tpe"]) == 0
    tpe = arch_of(out, "tpe")
    study = load_study(os.path.join(out, "baselines", "tpe"))
    assert len(study.trials) == 2 and study.best_value >= 0
    assert tpe["directions"] == [p.split(",") for _, p in sorted(study.best_params.items())]
    assert set(study.best_params) == {"layer00", "layer01"}
    assert main(argv + ["--compare"]) == 0  # reuses the TPE study, runs the two searches, retrains all
    table = open(os.path.join(out, "compare.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| candidate")]
    assert [r.split("|")[1].strip() for r in rows] == ["joint", "sampled", "fixed", "random", "tpe"]
    result = json.load(open(os.path.join(out, "compare.json")))
    for cand in result["candidates"]:
        assert cand["params"] > 0 and cand["flops"] > 0 and len(cand["results"]) == 1
        assert 0 <= cand["results"][0]["val_top1"] <= 100 and cand["results"][0]["epochs"] == 1
        cfg = yaml.safe_load(open(os.path.join(cand["results"][0]["run_dir"], "config.yaml")))
        assert cfg["train"]["epochs"] == 1 and cfg["data"]["path"] == "demo"  # the same recipe and data for all
    costs = {c["name"]: c["search_epochs"] for c in result["candidates"]}
    assert costs == {"joint": "2 supernet", "sampled": "2 supernet", "fixed": "0", "random": "0", "tpe": "2 derived"}
    assert "published: left out" in table


@pytest.mark.parametrize("tune,argv,message", [
    ({}, ["--baseline", "tpe", "--tune.baseline.tpe_epochs", "0"], "tune.baseline.tpe_epochs"),
    ({}, ["--compare", "--tune.compare.strategies", "[joint, darts]"], "unknown strategy 'darts'"),
    ({"compare": {"seeds": [0, 0]}}, ["--compare"], "tune.compare.seeds"),
])
def test_bad_baseline_settings_are_one_line(tmp_path, capsys, tune, argv, message):
    assert main(demo_with(tmp_path, **tune) + ["--out", str(tmp_path / "x")] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
