"""Parameter counts and FLOPs of the published models against the published figures."""
import pytest
from models_testing import default_model

from nas.models import count_parameters, flops

# name: (published params (M), published GFLOPs, our fvcore-convention GFLOPs)
PUBLISHED = {"local_vim_tiny": (8, 1.5, 2.18), "local_vim_small": (28, 4.8, 6.39),
             "local_vssm_tiny": (26, 5.7, 5.73), "local_vssm_small": (50, 11.4, 11.40)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_flops_match_the_published_figures(name):
    params_m, gflops, ours = PUBLISHED[name]
    model = default_model(name)
    assert count_parameters(model) / 1e6 == pytest.approx(params_m, abs=0.5)
    assert flops(model, 224, convention="released") / 1e9 == pytest.approx(gflops, abs=0.05)
    assert flops(model) / 1e9 == pytest.approx(ours, abs=0.01)


def test_flops_scale_with_the_image_and_count_padding():
    model = default_model("local_vssm_tiny_search")
    assert flops(model, 112) < flops(model, (224, 160)) < flops(model, 224)
    demo = default_model("local_vim_demo_search")
    assert flops(demo, 28) > 0 and flops(demo, 32) > flops(demo, 28)


def test_flops_bad_input():
    with pytest.raises(ValueError, match="convention: expected 'fvcore' or 'released'"):
        flops(default_model("local_vim_demo"), convention="thop")
