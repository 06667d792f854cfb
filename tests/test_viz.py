"""The search figures: the heatmap's colour scale centred on 1/8 and its marks, the history's ticks and kept
lines, atomic PNG writes."""
import os

import matplotlib.colors
import numpy as np
import pytest
import torch
from PIL import Image

from nas.models import derive_directions
from nas.ops import DIRECTIONS
from nas.viz import alpha_heatmap, alpha_history_figure, decimals_to_tell_apart, save_figure


def early_alphas(layers=3, epochs=1, seed=0):
    """Alphas as a search has them after its first steps: 1e-3 * randn, probabilities within 1e-3 of 1/8."""
    torch.manual_seed(seed)
    return [1e-3 * (e + 1) * torch.randn(layers, len(DIRECTIONS)) for e in range(epochs)]


def test_heatmap_of_an_early_search_is_not_one_flat_colour(tmp_path):
    alpha = early_alphas()[0]
    probs = alpha.softmax(1).numpy()
    fig = alpha_heatmap(probs, derive_directions(alpha, 4))
    image = fig.axes[0].images[0]
    assert isinstance(image.norm, matplotlib.colors.TwoSlopeNorm) and image.norm.vcenter == pytest.approx(1 / 8)
    low, centre, high = image.to_rgba(np.array([probs.min(), 1 / 8, probs.max()]))[:, :3]
    assert np.allclose(centre, 1, atol=0.05)  # 1/8 is white
    # the weakest and the strongest direction are strong colours, and different ones
    assert np.linalg.norm(low - centre) > 0.8 and np.linalg.norm(high - centre) > 0.8
    assert np.linalg.norm(high - low) > 0.4
    path = str(tmp_path / "alphas.png")
    save_figure(fig, path)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels // 32, axis=0)) > 8  # many colours reach the file, not one flat tone
    assert os.listdir(tmp_path) == ["alphas.png"]  # written atomically: no temporary file left


def test_heatmap_colour_bar_ticks_tell_apart_close_values():
    probs = np.full((2, 8), 1 / 8)
    probs[0, 0], probs[1, 1] = 1 / 8 + 2e-5, 1 / 8 - 3e-5
    fig = alpha_heatmap(probs, [["h"], ["v"]])
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert len(labels) == 3 and len(set(labels)) == 3 and labels[1] == "0.12500"


def test_heatmap_letters_coinciding_directions():
    alpha = early_alphas(layers=2)[0]
    coinciding = [(("h", "w7"), ("h_flip", "w7_flip")), ()]
    fig = alpha_heatmap(alpha.softmax(1).numpy(), derive_directions(alpha, 4), coinciding=coinciding)
    texts = {(t.get_position(), t.get_text()) for t in fig.axes[0].texts}
    col = DIRECTIONS.index
    assert texts == {((col("h"), 0), "a"), ((col("w7"), 0), "a"), ((col("h_flip"), 0), "b"),
                     ((col("w7_flip"), 0), "b")}
    assert "same scan" in fig.axes[0].get_xlabel()


def test_history_ticks_are_readable_and_kept_directions_stand_out():
    alphas = early_alphas(layers=6, epochs=7)
    epochs = [{"epoch": e + 1, "probs": a.softmax(1).tolist()} for e, a in enumerate(alphas)]
    kept = derive_directions(alphas[-1], 4)
    fig = alpha_history_figure(epochs, kept)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 6
    for i, ax in enumerate(panels):
        assert ax.yaxis.get_offset_text().get_text() == ""  # full values, no "+1.25e-1" to add in one's head
        ys = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(ys) == len(set(ys)) and all(float(y) == pytest.approx(0.125, abs=0.01) for y in ys)
        xs = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert all(x.lstrip("−-").isdigit() for x in xs)  # whole epochs
        for line, name in zip(ax.lines, DIRECTIONS):
            if name in kept[i]:
                assert line.get_linestyle() == "-" and line.get_linewidth() > 1.5
            else:
                assert line.get_linestyle() == "--" and line.get_linewidth() < 1.5
    assert "solid: kept" in fig._suptitle.get_text()


def test_decimals_to_tell_apart():
    assert decimals_to_tell_apart([(0.5, 0.25)]) == 3
    assert decimals_to_tell_apart([(0.1250001, 0.1250004), (0.5, 0.25)]) == 7
    assert decimals_to_tell_apart([(0.125, 0.125)]) == 3  # a true tie cannot be told apart: no extra digits
