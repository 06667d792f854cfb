"""Every constructor argument checked in one place (nas.models.settings) before a model is built: one line
naming the value and what is allowed, and an image size refused when its activations cannot fit."""
import pytest
import torch

from nas.errors import UserError
from nas.models import create_model
from nas.models import settings
from nas.models.local_vim import LocalVim
from nas.models.local_vmamba import LocalVMamba
from nas.models.registry import model_spec


@pytest.mark.parametrize("name,args,message", [
    ("local_vim_demo_search", {"depth": -1}, "depth: expected an int >= 1, got -1"),
    ("local_vim_demo_search", {"depth": 2.5}, "depth: expected an int >= 1, got 2.5"),
    ("local_vim_demo_search", {"depth": 0}, "depth: expected an int >= 1, got 0"),
    ("local_vim_demo_search", {"patch_size": 0}, "patch_size: expected an int >= 1, got 0"),
    ("local_vim_demo_search", {"expand": 0}, "expand: expected an int >= 1, got 0"),
    ("local_vim_demo_search", {"scattn": "bogus"}, "scattn: expected one of channel, full, got 'bogus'"),
    ("local_vim_demo_search", {"drop_path_rate": 2}, "drop_path_rate: expected a number >= 0 and < 1, got 2"),
    ("local_vim_demo_search", {"d_state": 0}, "d_state: expected an int >= 1, got 0"),
    ("local_vim_demo_search", {"num_classes": True}, "num_classes: expected an int >= 0, got True"),
    ("local_vim_demo_search", {"img_size": [28]}, "img_size: expected an int >= 1 or [height, width], ints >= 1, "
                                                  "got [28]"),
    ("local_vim_demo_search", {"scans_per_layer": 2},
     "scans_per_layer: local_vim_demo_search is a search model, which runs all its candidates in every layer; "
     "scans_per_layer is the number of directions of a derived model (a search chooses how many to keep with "
     "strategy.k)"),
    ("local_vim_demo", {"embed_dim": 4, "expand": 1},
     "expand: embed_dim 4 x expand 1 makes 4 scanned channels; SCAttn needs at least 8"),
    ("local_vssm_demo_search", {"ssm_ratio": 0.1},
     "ssm_ratio: ssm_ratio 0.1 x dims 32 makes 3 scanned channels; SCAttn needs at least 8"),
    ("local_vssm_demo", {"dims": [32, 64]}, "dims: expected one width per stage (3 stages), got [32, 64]"),
    ("local_vssm_demo", {"depths": [1, 0, 1]}, "depths: expected a list of ints >= 1 (one depth per stage), "
                                               "got [1, 0, 1]"),
    ("local_vssm_demo", {"img_size": 3}, "img_size: expected at least the patch size of local_vssm_demo (4), got 3"),
])
def test_a_bad_argument_is_one_line_before_anything_is_built(name, args, message):
    with pytest.raises(UserError) as caught:
        create_model(name, **args)
    assert str(caught.value) == message


def test_an_image_size_whose_activations_cannot_fit_is_refused_before_any_allocation():
    """100000 x 100000 images: 625 million tokens per layer; the position table alone would be 120 GB."""
    with pytest.raises(UserError, match=r"^img_size: 100000 x 100000 images make 625,000,000 tokens per layer of "
                                        r"local_vim_demo_search, whose activations for one training step of 1 image "
                                        r"need at least [\d,.]+ GB; this machine has [\d,.]+ GB; expected a smaller "
                                        r"img_size$"):
        create_model("local_vim_demo_search", img_size=100000)


def _saved_bytes(model, images) -> int:
    """The bytes of every distinct tensor autograd keeps for the backward of one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum()
    return sum(storages.values())


@pytest.mark.parametrize("name,args", [
    ("local_vim_demo_search", {"img_size": 20, "depth": 2, "embed_dim": 16}),
    ("local_vim_demo", {"img_size": 20, "depth": 2, "embed_dim": 16, "scans_per_layer": 2,
                        "directions": [["h", "v"], ["h", "w2"]]}),
    ("local_vssm_demo_search", {"img_size": 20, "dims": [8, 16], "depths": [1, 1]}),
    ("local_vssm_demo", {"img_size": 20, "dims": [8, 16], "depths": [1, 1], "scans_per_layer": 2,
                         "directions": [["h", "v"], ["h", "w2"]]}),
])
def test_the_activation_estimate_is_a_lower_bound_of_what_a_step_keeps(name, args):
    """The memory check refuses only sizes that cannot fit: its estimate never exceeds what autograd saves."""
    directions = args.pop("directions", None)
    model = create_model(name, directions=directions, **args).train()
    config = settings.resolved_config(model_spec(name), args)
    batch = 3
    estimate = settings.activation_bytes(config, model_spec(name).search, batch)
    saved = _saved_bytes(model, torch.randn(batch, 3, 20, 20))
    assert 0 < estimate <= saved


def test_every_constructor_argument_has_a_check():
    for cls in (LocalVim, LocalVMamba):
        unchecked = set(cls.CONFIG_KEYS) - set(settings.CHECKS) - set(settings.NOT_CHECKED_HERE)
        assert not unchecked, f"{cls.__name__}: {sorted(unchecked)}"
