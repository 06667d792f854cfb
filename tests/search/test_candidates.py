"""Search spaces over other candidate scans (search.candidates): alpha has one entry per candidate, and the search
log, alphas.json, TensorBoard, derive.py (table, arch.yaml, figures, --distinct), the retraining (from scratch and
inherited), the FLOPs counter and the baselines all follow the list. The default stays LocalMamba's 8."""
import json
import math
import os

import pytest
import torch
import yaml
from PIL import Image

from nas.cli.derive import main as derive_main
from nas.cli.derive import parse_args, prepare_retrain
from nas.cli.search import main as search_main
from nas.cli.search import resolve_config
from nas.cli.search import parse_args as search_args
from nas.derive.retrain import build_model
from nas.engine import checkpoint
from nas.models import arch_parameters, create_model, derive_directions, flops, search_candidates, set_batched
from nas.ops import DIRECTIONS, registered_scans
from nas.search.alphas import coincidence_note, coinciding_per_layer
from nas.tune.baselines import DirectionObjective, search_layout
from nas.tune.space import resolve_tune
from nas.viz import alpha_heatmap, alpha_history_figure, scan_orders_figure

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
EXTENDED = os.path.join(ROOT, "search_spaces", "demo_extended.yaml")
TINY = ["--model_args.depth", "2", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false",
        "--data.images_per_class", "12", "--train.batch_size", "24", "--train.warmup_epochs", "0", "--epochs", "1"]
SIXTEEN = ["h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip",
           "snake_h", "snake_v", "diag", "antidiag", "spiral", "hilbert", "w4", "w2_col"]


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("extended") / "run")
    assert search_main(["-c", EXTENDED, "--out", out, "--strategy.alpha_lr", "0.1"] + TINY) == 0
    return out


def test_the_default_is_localmambas_eight_with_the_same_alpha_layout_and_draws():
    torch.manual_seed(0)
    default = create_model("local_vim_demo_search", depth=2, embed_dim=16, img_size=16)
    torch.manual_seed(0)
    named = create_model("local_vim_demo_search", depth=2, embed_dim=16, img_size=16, candidates=list(DIRECTIONS))
    assert search_candidates(default) == DIRECTIONS and default.config["candidates"] is None
    for a, b in zip(default.state_dict().values(), named.state_dict().values()):
        assert torch.equal(a, b)  # naming the 8 explicitly builds the same supernet, draw for draw
    assert [tuple(a.shape) for a in arch_parameters(default)] == [(8, 1, 1, 1)] * 2


@pytest.mark.parametrize("family, size", [("local_vim_demo_search", 16), ("local_vssm_demo_search", 32)])
def test_alpha_has_one_entry_per_candidate_and_flops_count_every_candidate(family, size):
    torch.manual_seed(0)
    model = create_model(family, img_size=size, candidates=SIXTEEN)
    assert search_candidates(model) == tuple(SIXTEEN)
    assert all(a.shape == (16, 1, 1, 1) for a in arch_parameters(model))
    out = model(torch.randn(2, 3, size, size))
    out.sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in arch_parameters(model))
    eight = create_model(family, img_size=size)
    assert flops(model, size) > flops(eight, size)  # the counter runs every candidate's scan and projections
    with torch.no_grad():  # derive in candidate order, from any of the 16
        for a in arch_parameters(model):
            a.copy_(torch.arange(16.0).view(16, 1, 1, 1))
    assert derive_directions(model, k=4) == [SIXTEEN[12:]] * len(arch_parameters(model))


def test_an_extended_search_is_recorded_over_its_candidates(extended_run):
    with open(os.path.join(extended_run, "alphas.json")) as f:
        history = json.load(f)
    assert history["directions"] == SIXTEEN and len(history["epochs"][0]["probs"][0]) == 16
    state = checkpoint.load(os.path.join(extended_run, "last.pt"))
    assert state["model"]["layers.0.mixer.multi_scan.weights"].shape == (16, 1, 1, 1)
    model = create_model("local_vim_demo_search", depth=2, embed_dim=16, img_size=16, candidates=SIXTEEN)
    assert "(4 x 4 tokens): h = w4." in coincidence_note(model)  # the run's log line: a 4 x 4 window is a raster row
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(extended_run, "tb")).Reload()
    assert {f"alpha/layer00/{d}" for d in SIXTEEN} <= set(events.Tags()["scalars"])


def test_derive_and_retrain_an_extended_search(extended_run, tmp_path, capsys):
    assert derive_main([extended_run]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[2].split() == ["layer", *SIXTEEN]  # the table's header: one column per candidate
    with open(os.path.join(extended_run, "arch.yaml")) as f:
        arch = yaml.safe_load(f)
    assert arch["candidates"] == SIXTEEN and all(len(row) == 16 for row in arch["probs"])
    with Image.open(os.path.join(extended_run, "figures", "scan_orders.png")) as drawing:
        assert drawing.size == (1560, 4 * 420)  # four rows of four panels (3.5 inches each at 120 dpi)
    model = create_model(arch["model"], directions=os.path.join(extended_run, "arch.yaml"), **arch["model_args"])
    assert model.directions == arch["directions"]

    cfg, _ = prepare_retrain(*parse_args([extended_run, "--retrain", "--inherit"]))
    inherited = build_model(cfg, num_classes=10)
    supernet = checkpoint.load(os.path.join(extended_run, "last.pt"))["model"]
    for layer, kept in enumerate(arch["directions"]):
        for position, name in enumerate(kept):
            got = inherited.state_dict()[f"layers.{layer}.mixer.x_proj_{position}.weight"]
            want = supernet[f"layers.{layer}.mixer.x_proj_{SIXTEEN.index(name)}.weight"]
            assert torch.equal(got, want)  # the slot of the name in the candidate list, not in DIRECTIONS
    assert derive_main([extended_run, "--retrain", "--epochs", "1", "--out", str(tmp_path / "retrain"),
                        "--train.workers", "0"]) == 0


def test_distinct_keeps_different_scans_among_the_candidates(extended_run, tmp_path, capsys):
    capsys.readouterr()
    assert derive_main([extended_run, "-k", "15", "--distinct"]) == 0  # 16 candidates, 15 distinct scans on 4 x 4
    with open(os.path.join(extended_run, "arch.yaml")) as f:
        arch = yaml.safe_load(f)
    assert all(not {"h", "w4"} <= set(layer) for layer in arch["directions"])
    assert derive_main([extended_run, "-k", "16", "--distinct"]) == 2
    assert "the 16 candidates are 15 different scans" in capsys.readouterr().err
    model = create_model("local_vim_demo_search", depth=2, embed_dim=16, img_size=16, candidates=SIXTEEN)
    assert coinciding_per_layer(model)[0] == (("h", "w4"),)


def test_baselines_draw_from_the_candidates(tmp_path):
    argv = search_args(["-c", EXTENDED, "--out", str(tmp_path / "b")] + TINY)
    cfg, out = resolve_config(*argv)
    layout = search_layout(cfg)
    assert layout.candidates == tuple(SIXTEEN) and layout.layers == 2
    assert search_main(["-c", EXTENDED, "--out", out, "--baseline", "random"] + TINY) == 0
    with open(os.path.join(out, "baselines", "random", "arch.yaml")) as f:
        arch = yaml.safe_load(f)
    assert arch["candidates"] == SIXTEEN and all(len(row) == 16 for row in arch["probs"])
    assert all(layer == [d for d in SIXTEEN if d in layer] for layer in arch["directions"])
    assert search_main(["-c", EXTENDED, "--out", out, "--baseline", "fixed"] + TINY) == 0
    tpe = DirectionObjective(cfg, resolve_tune(cfg, need_params=False), out, None, 0)
    assert [len(c) for c in tpe.choices] == [math.comb(16, 4)] * 2  # TPE picks each layer's 4 of the 16
    assert set(tpe.choices[0][-1].split(",")) <= set(SIXTEEN)


@pytest.mark.parametrize("override, message", [
    (["--search.candidates", "[h, zigzag]"], "search.candidates: unknown scan order 'zigzag'; registered: h, h_flip"),
    (["--search.candidates", "[h, v, h]"], "search.candidates: h listed more than once"),
    (["--search.candidates", "[h]"], "search.candidates: expected a list of at least 2 scan orders"),
    (["--search.candidates", "[h, v, diag]"], "strategy.k: expected an int from 1 to 3 (the number of candidates)"),
    (["--model_args.candidates", "[h, v]"], "model_args.candidates: name a search space's candidates under"),
])
def test_a_bad_candidate_list_is_one_line_before_anything_is_written(override, message, tmp_path, capsys):
    out = str(tmp_path / "bad")
    assert search_main(["-c", EXTENDED, "--out", out] + TINY + override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(out)


def test_the_figures_draw_every_candidate():
    probs = torch.softmax(torch.randn(2, 16), 1).tolist()
    kept = [SIXTEEN[:4], SIXTEEN[-4:]]
    drawing = scan_orders_figure(5, 7, candidates=SIXTEEN)  # a non-square grid
    assert [ax.get_title() for ax in drawing.axes if ax.get_title()] == SIXTEEN
    heatmap = alpha_heatmap(probs, kept, candidates=SIXTEEN)
    assert [t.get_text() for t in heatmap.axes[0].get_xticklabels()] == SIXTEEN
    history = alpha_history_figure([{"epoch": 1, "probs": probs}], kept, candidates=SIXTEEN)
    assert [t.get_text() for t in history.legends[0].get_texts()] == SIXTEEN


@pytest.mark.parametrize("family, size", [("local_vim_demo_search", (20, 28)), ("local_vssm_demo_search", (36, 20))])
def test_every_registered_order_runs_alike_batched_and_one_by_one(family, size):
    """The one-call multi-direction scan against the per-direction loop, for every registered order at once, on a
    non-square grid (5 x 7 tokens; 9 x 5 at LocalVMamba's first stage): outputs and alpha gradients."""
    torch.manual_seed(0)
    model = create_model(family, img_size=size, candidates=registered_scans(), drop_path_rate=0.0)
    images = torch.randn(2, 3, *size)
    results = []
    for batched in (True, False):
        set_batched(model, batched)
        model.zero_grad()
        out = model(images)
        out.square().sum().backward()
        results.append((out.detach(), [a.grad.clone() for a in arch_parameters(model)]))
    (out_b, grads_b), (out_l, grads_l) = results
    torch.testing.assert_close(out_b, out_l, rtol=1e-4, atol=1e-5)
    for gb, gl in zip(grads_b, grads_l):
        torch.testing.assert_close(gb, gl, rtol=1e-4, atol=1e-6)
