"""strategy.k (and derive.py -k) as one int per layer or auto (per layer, the fewest directions holding
strategy.auto_mass of its probability): the counts, the sampled strategy's paths, derive, the derived model,
its retraining and the baselines."""
import os

import pytest
import torch
import yaml

from nas.cli.derive import main as derive_main
from nas.cli.search import main as search_main
from nas.cli.search import parse_args, resolve_config
from nas.errors import UserError
from nas.models import arch_parameters, create_model, derive_directions
from nas.models.search_space import describe_k, kept_counts
from nas.search.strategies import STRATEGY_DEFAULTS, create_strategy
from nas.tune.baselines import search_layout

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "search_spaces", "demo.yaml")
TINY = ["-c", DEMO, "--model_args.depth", "3", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress",
        "false", "--data.images_per_class", "12", "--train.batch_size", "24", "--train.warmup_epochs", "0",
        "--epochs", "1", "--strategy.alpha_lr", "0.5"]


def test_kept_counts_by_int_list_and_auto():
    uniform, peaked = [1 / 8] * 8, [0.65, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    two = [0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]
    assert kept_counts(4, [uniform, peaked], 8) == [4, 4]
    assert kept_counts([2, 5], [uniform, peaked], 8) == [2, 5]
    assert kept_counts("auto", [uniform, peaked, two], 8, 0.5) == [4, 1, 2]  # 4 x 1/8 reaches 0.5 exactly
    assert kept_counts("auto", [two], 8, 0.75) == [4]  # 0.3 + 0.3 + 0.1 + 0.1 = 0.8 >= 0.75 > 0.7
    assert kept_counts("auto", [uniform], 8, 1.0) == [8]
    for bad, message in ((9, r"k: expected an int from 1 to 8, got 9"), ([2], r"one int from 1 to 8 per layer"),
                         ([2, 9], r"one int from 1 to 8 per layer \(2 layers\), got \[2, 9\]")):
        with pytest.raises(UserError, match=message):
            kept_counts(bad, [uniform, peaked], 8)
    with pytest.raises(UserError, match=r"auto_mass: expected a number in \(0, 1\], got 0"):
        kept_counts("auto", [uniform], 8, 0)
    assert describe_k([2, 3]) == "top-k (k = 2, 3 in layer order)" and describe_k(4) == "top-4"
    assert describe_k("auto", 0.5) == "fewest directions holding 50% of the probability"


def test_derive_directions_keeps_each_layers_count():
    alphas = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1], [0, 0, 0, 9, 0, 0, 0, 0]])
    assert derive_directions(alphas, [1, 3]) == [["h"], ["h", "h_flip", "v_flip"]]
    assert derive_directions(alphas, "auto") == [["h"], ["v_flip"]]  # e^8 / (e^8 + e^7 + ... + e^1) = 0.63
    split = torch.tensor([[2.0, 2, 0, 0, 0, 0, 0, 0]])  # 0.356 each: the two together hold 0.71
    assert derive_directions(split, "auto") == [["h", "h_flip"]]
    # 0.356 + 0.356 + 4 x 0.048 = 0.90: six reach 0.9
    assert derive_directions(split, "auto", auto_mass=0.9) == [["h", "h_flip", "v", "v_flip", "w2", "w2_flip"]]


def test_sampled_runs_each_layers_k_paths():
    torch.manual_seed(0)
    model = create_model("local_vim_demo_search", depth=3, embed_dim=16, img_size=16)
    train = {"lr": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.0, "amp": "none"}
    strategy = create_strategy({**STRATEGY_DEFAULTS, "name": "sampled", "k": [1, 2, 5]}, model, train, 0, None, "")
    for step in range(3):
        strategy.before_step(step, 0)
        assert [len(m.active) for m in model.modules() if getattr(m, "search", False)] == [1, 2, 5]
    assert len(arch_parameters(model)) == 3


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("search.py: error: "), err
    return err[0]


@pytest.mark.parametrize("override, message", [
    (["--strategy.name", "sampled", "--strategy.k", "auto"], "strategy.k: sampled runs k paths per layer"),
    (["--strategy.k", "[2, 3]"], "strategy.k: expected one int per searched layer (3 layers), got [2, 3]"),
    (["--strategy.k", "[2, 3, 9]"], "strategy.k: expected an int from 1 to 8 (the number of candidates)"),
    (["--strategy.k", "several"], "strategy.k: expected an int >= 1, a list of them (one per layer) or auto"),
    (["--strategy.auto_mass", "1.5"], "strategy.auto_mass: expected a number > 0 and <= 1, got 1.5"),
])
def test_bad_k_settings_are_one_line_before_anything_is_written(override, message, tmp_path, capsys):
    out = tmp_path / "bad"
    assert search_main(TINY + ["--out", str(out)] + override) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_a_per_layer_search_derives_and_retrains_per_layer(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert search_main(TINY + ["--out", run, "--strategy.k", "[2, 3, 4]"]) == 0
    assert derive_main([run]) == 0  # the default: the search's strategy.k
    with open(os.path.join(run, "arch.yaml")) as f:
        arch = yaml.safe_load(f)
    assert arch["k"] == [2, 3, 4] and [len(layer) for layer in arch["directions"]] == [2, 3, 4]
    assert arch["model_args"]["scans_per_layer"] == [2, 3, 4]
    model = create_model(arch["model"], directions=os.path.join(run, "arch.yaml"), **arch["model_args"])
    assert [len(d) for d in model.directions] == [2, 3, 4]

    assert derive_main([run, "-k", "auto"]) == 0
    with open(os.path.join(run, "arch.yaml")) as f:
        auto = yaml.safe_load(f)
    probs = torch.tensor(auto["probs"], dtype=torch.float64)
    assert auto["k"] == "auto" and auto["auto_mass"] == 0.5
    for row, kept in zip(probs, auto["directions"]):  # the fewest of the strongest that reach half the mass
        top = row.sort(descending=True).values
        assert top[:len(kept)].sum() >= 0.5 - 1e-9 and (len(kept) == 1 or top[:len(kept) - 1].sum() < 0.5)
    capsys.readouterr()
    assert derive_main([run, "--retrain", "-k", "1,1,1"]) == 2  # arch.yaml holds auto's choice
    assert "derive it again (python derive.py" in capsys.readouterr().err
    assert derive_main([run, "--retrain", "--epochs", "1", "--train.workers", "0"]) == 0
    assert "retrained local_vim_demo" in capsys.readouterr().out


def test_baselines_follow_a_per_layer_k(tmp_path):
    out = str(tmp_path / "b")
    assert search_main(TINY + ["--out", out, "--strategy.k", "[1, 2, 3]", "--baseline", "random"]) == 0
    with open(os.path.join(out, "baselines", "random", "arch.yaml")) as f:
        arch = yaml.safe_load(f)
    assert [len(layer) for layer in arch["directions"]] == [1, 2, 3]
    assert [sum(p > 0 for p in row) for row in arch["probs"]] == [1, 2, 3]
    cfg, _ = resolve_config(*parse_args(TINY + ["--out", out, "--strategy.k", "auto"]))
    with pytest.raises(UserError, match="strategy.k: auto takes its counts from a search's alphas"):
        search_layout(cfg)  # what every baseline starts from
