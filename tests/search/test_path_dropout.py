"""strategy.path_dropout (joint, bilevel): each weight step drops each layer's paths with probability p, one
always staying; the draw is a function of (seed, step), so every rank and a resumed run draw the same; bilevel's
alpha step runs the weight step's paths; every evaluation runs all paths; 0 (the default) leaves every path on."""
import os

import pytest
import torch

from nas.cli.search import main as search_main
from nas.models import create_model, search_scans
from nas.search.strategies import STRATEGY_DEFAULTS, create_strategy

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "search_spaces", "demo.yaml")
TINY = ["-c", DEMO, "--model_args.depth", "2", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress",
        "false", "--data.images_per_class", "12", "--train.batch_size", "24", "--train.warmup_epochs", "0",
        "--epochs", "1"]
TRAIN = {"lr": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.0, "amp": "none"}


def active(model):
    return [m.active for m in search_scans(model)]


def strategy(p, seed=0, depth=3):
    torch.manual_seed(0)
    model = create_model("local_vim_demo_search", depth=depth, embed_dim=16, img_size=16)
    return model, create_strategy({**STRATEGY_DEFAULTS, "name": "joint", "path_dropout": p}, model, TRAIN, seed,
                                  None, "")


def test_each_step_drops_paths_at_the_rate_asked_and_keeps_one():
    model, joint = strategy(0.75, depth=4)
    kept = []
    for step in range(200):
        joint.before_step(step, 0)
        layers = active(model)
        assert all(len(paths) >= 1 and len(set(paths)) == len(paths) for paths in layers)
        kept += [len(paths) for paths in layers]
    # E[kept] = 8 * 0.25 plus the forced one when none is kept (0.75^8 = 0.1)
    assert abs(sum(kept) / len(kept) - (2 + 0.75 ** 8)) < 0.15
    assert joint.find_unused_parameters
    joint.eval_model(model)
    assert active(model) == [None] * 4


def test_the_draw_is_a_function_of_seed_and_step():
    first, a = strategy(0.5)
    second, b = strategy(0.5)
    other, c = strategy(0.5, seed=1)
    draws = []
    for s in (a, b, c):
        s.before_step(17, 0)
        draws.append(active(s.model))
    assert draws[0] == draws[1] != draws[2]  # the same on every rank and after a resume; another seed, another draw


def test_without_path_dropout_every_path_stays_on():
    model, joint = strategy(0.0)
    joint.before_step(3, 0)
    assert active(model) == [None] * 3 and not joint.find_unused_parameters


@pytest.mark.parametrize("name", ["joint", "bilevel"])
def test_a_search_with_path_dropout_runs_and_sampled_refuses_it(name, tmp_path, capsys):
    assert search_main(TINY + ["--out", str(tmp_path / name), "--strategy.name", name,
                               "--strategy.path_dropout", "0.5"]) == 0
    capsys.readouterr()
    assert search_main(TINY + ["--out", str(tmp_path / "s"), "--strategy.name", "sampled",
                               "--strategy.path_dropout", "0.5"]) == 2
    assert "strategy.path_dropout: sampled already runs k sampled paths" in capsys.readouterr().err


def test_bilevels_alpha_step_runs_the_paths_of_its_weight_step():
    torch.manual_seed(0)
    model = create_model("local_vim_demo_search", depth=2, embed_dim=16, img_size=16)
    bilevel = create_strategy({**STRATEGY_DEFAULTS, "name": "bilevel", "path_dropout": 0.5}, model, TRAIN, 0, None, "")
    seen = []
    bilevel.alpha_step = lambda epoch: seen.append(active(model))  # what the held-out pass would run
    bilevel.before_step(5, 0)
    assert seen == [active(model)] and all(paths is not None for paths in seen[0])
