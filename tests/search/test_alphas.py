"""Which candidate scans coincide per layer (checked against the real mixers), the log note, and the
TensorBoard output of the alpha report (one custom-scalars chart per layer), read back from the event file."""
import glob
import itertools
import json
import os
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from nas.engine.run_log import RunLogger
from nas.models import create_model, set_active_paths
from nas.models.ss2d import SS2D
from nas.models.vim_mixer import LocalVimMixer
from nas.ops import DIRECTIONS
from nas.ops.directions import coinciding_directions
from nas.search.alphas import (AlphaHistory, coincidence_note, coinciding_per_layer, layer_grids, layer_probs, report,
                               write_tensorboard_layout)

SMALL_VIM = dict(depth=2, embed_dim=16)
SMALL_VSSM = dict(dims=[8, 8, 8, 8, 8], depths=[1, 1, 1, 1, 1], d_state=4)


def grids_seen(model, img_size):
    """The (H, W) every searchable layer's mixer receives in a real forward pass."""
    seen = []
    mixers = [m for m in model.modules() if isinstance(m, (LocalVimMixer, SS2D))]
    hooks = [m.register_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[1]) if isinstance(m, LocalVimMixer) else tuple(args[0].shape[1:3])))
        for m in mixers]
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    with torch.no_grad():
        model(torch.zeros(1, 3, h, w))
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("name,img_size,args", [
    ("local_vim_demo_search", 28, SMALL_VIM),            # 7 x 7
    ("local_vim_demo_search", (20, 36), SMALL_VIM),      # 5 x 9
    ("local_vim_demo_search", 30, SMALL_VIM),            # padded to 8 x 8
    ("local_vssm_demo_search", 28, SMALL_VSSM),          # 7, 4, 2, 1, 1
    ("local_vssm_demo_search", 36, SMALL_VSSM),          # 9, 5, 3, 2, 1
    ("local_vssm_demo_search", (20, 44), SMALL_VSSM),    # 5 x 11, 3 x 6, ...
])
def test_layer_grids_are_what_the_forward_scans(name, img_size, args):
    model = create_model(name, img_size=img_size, **args)
    assert layer_grids(model) == grids_seen(model, img_size)


def same_parameters_in_every_direction(mixer):
    """Copy direction 0's parameters into the 7 others, so that two directions differ only by their scan."""
    with torch.no_grad():
        if isinstance(mixer, SS2D):
            K, Di = len(DIRECTIONS), mixer.d_inner
            for p in (mixer.x_proj_weight, mixer.dt_projs_weight, mixer.dt_projs_bias.fill_(-2.0),
                      mixer.A_logs.view(K, Di, -1), mixer.Ds.view(K, Di)):
                p.copy_(p[:1].expand_as(p))
            return
        for name, p in mixer.named_parameters():
            if name.startswith(("conv1d_0", "x_proj_0", "dt_proj_0", "A_log_0", "D_0")):
                if name == "dt_proj_0.bias":
                    p.fill_(-2.0)  # a slow decay: pad steps leave a visible trace
                for k in range(1, len(DIRECTIONS)):
                    mixer.get_parameter(name.replace("_0", f"_{k}", 1)).copy_(p)


def single_direction_outputs(mixer, H, W):
    torch.manual_seed(0)
    same_parameters_in_every_direction(mixer)
    outputs = []
    with torch.no_grad():
        for k in range(len(DIRECTIONS)):
            set_active_paths(mixer, [[k]])
            if isinstance(mixer, SS2D):
                outputs.append(mixer(torch.randn(2, H, W, mixer.d_model, generator=torch.Generator().manual_seed(1))))
            else:
                outputs.append(mixer(torch.randn(2, H * W, mixer.d_model, generator=torch.Generator().manual_seed(1)),
                                     (H, W)))
    return outputs


GRIDS = [(7, 7), (14, 7), (7, 14), (5, 7), (3, 2), (2, 2), (4, 4), (1, 1), (1, 5), (5, 1), (6, 3)]


@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("mixer_kind", ["local_vim", "ss2d"])
def test_coinciding_directions_compute_the_same_in_the_real_mixers(mixer_kind, H, W):
    """With equal parameters, two directions give the same mixer output exactly when they are grouped."""
    mixer = SS2D(8, d_state=4) if mixer_kind == "ss2d" else LocalVimMixer(8, d_state=4)
    outputs = single_direction_outputs(mixer, H, W)
    groups = coinciding_directions(H, W, ignore_leading_pads=mixer_kind == "ss2d")
    for a, b in itertools.combinations(range(len(DIRECTIONS)), 2):
        grouped = any(DIRECTIONS[a] in g and DIRECTIONS[b] in g for g in groups)
        difference = (outputs[a] - outputs[b]).abs().max().item()
        if grouped:
            assert difference < 1e-6, (DIRECTIONS[a], DIRECTIONS[b], difference)
        else:
            assert difference > 1e-4, (DIRECTIONS[a], DIRECTIONS[b], difference)


def test_coinciding_per_layer_and_the_log_note():
    vim = create_model("local_vim_demo_search", **SMALL_VIM)  # 28 px, patch 4: 7 x 7 tokens in both layers
    assert coinciding_per_layer(vim) == [(("h", "w7"), ("h_flip", "w7_flip"))] * 2
    note = coincidence_note(vim)
    assert "\n" not in note and "layers 0-1 (7 x 7 tokens): h = w7, h_flip = w7_flip" in note and "--distinct" in note
    vssm = create_model("local_vssm_demo_search", **SMALL_VSSM)  # stages of 7, 4, 2, 1, 1 tokens a side
    per_layer = coinciding_per_layer(vssm)
    assert per_layer[1] == () and per_layer[2] == (("h", "w2"), ("h_flip", "w2_flip"))
    assert per_layer[3] == per_layer[4] == (tuple(DIRECTIONS),)  # one token: every scan is the same
    note = coincidence_note(vssm)
    assert "layer 0 (7 x 7 tokens)" in note and "layer 2 (2 x 2 tokens): h = w2, h_flip = w2_flip" in note
    assert f"layers 3-4 (1 x 1 tokens): {' = '.join(DIRECTIONS)}" in note
    assert coincidence_note(create_model("local_vim_demo_search", img_size=56, **SMALL_VIM)) is None  # 14 x 14


def test_report_writes_one_tensorboard_chart_per_layer(tmp_path):
    model = create_model("local_vim_demo_search", **SMALL_VIM)
    logger = RunLogger(str(tmp_path), enabled=True)
    write_tensorboard_layout(logger.writer, 2)
    probs = layer_probs(model)
    summary = report(logger, model, probs, 1, str(tmp_path))
    logger.close()
    assert set(summary) == {"alpha_entropy_mean", "alpha_gap45_mean"}
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    scalars = events.Tags()["scalars"]
    assert "alpha/layer00/w7_flip" in scalars
    assert events.Scalars("alpha/layer01/h")[0].value == pytest.approx(probs[1][0])
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    (category,) = layout.category
    assert [c.title for c in category.chart] == ["layer 00", "layer 01"]
    for i, chart in enumerate(category.chart):
        matched = sorted(t for t in scalars if any(re.search(p, t) for p in chart.multiline.tag))
        assert matched == sorted(f"alpha/layer{i:02d}/{d}" for d in DIRECTIONS)  # its 8 directions, nothing else
    assert os.path.getsize(tmp_path / "figures" / "alphas.png") > 1000


def test_alpha_history_is_written_whole(tmp_path):
    history = AlphaHistory()
    history.record(1, [[0.125] * 8])
    history.record(2, [[0.125] * 8])
    history.record(2, [[0.5] + [0.5 / 7] * 7])  # a repeated epoch replaces the earlier record
    path = str(tmp_path / "alphas.json")
    history.write(path)
    assert [e["epoch"] for e in json.load(open(path))["epochs"]] == [1, 2]
    assert glob.glob(str(tmp_path / ".*")) == []  # no temporary file left behind
