"""State_dict keys and shapes against tables written from the checkpoint-naming reference (default 224 size)."""
import pytest
from models_testing import default_model, shapes, vim_keys, vssm_keys

EXPECTED = {
    "local_vim_tiny": lambda: vim_keys(192),
    "local_vim_small": lambda: vim_keys(384),
    "local_vim_tiny_middle_cls_token": lambda: vim_keys(192, mid_cls_token=True),
    "local_vim_tiny_search": lambda: vim_keys(128, K=8, search=True),
    "local_vssm_tiny": lambda: vssm_keys([96, 192, 384, 768], [2, 2, 9, 2]),
    "local_vssm_small": lambda: vssm_keys([96, 192, 384, 768], [2, 2, 27, 2]),
    "local_vssm_tiny_search": lambda: vssm_keys([32, 64, 128, 256], [2, 2, 9, 2], K=8, search=True),
    "local_vssm_small_search": lambda: vssm_keys([32, 64, 128, 256], [2, 2, 27, 2], K=8, search=True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_state_dict_matches_the_naming_reference(name):
    got, want = shapes(default_model(name)), EXPECTED[name]()
    assert sorted(set(got) - set(want)) == [], "keys the reference does not have"
    assert sorted(set(want) - set(got)) == [], "keys the reference has that we lack"
    assert {k: v for k, v in got.items() if want[k] != v} == {}, "shape mismatches"


def test_aliases_build_the_same_architecture():
    from nas.models import create_model
    assert shapes(create_model("local_vmamba_tiny_search")) == shapes(default_model("local_vssm_tiny_search"))


def test_scattn_full_adds_the_spatial_branch_keys():
    from nas.models import create_model
    model = create_model("local_vim_demo", scattn="full")
    keys = shapes(model)
    Di = 2 * model.embed_dim
    assert keys["layers.0.mixer.attn.local_reduce.weight"] == (Di // 8, Di)
    assert keys["layers.0.mixer.attn.spatial_select.weight"] == (1, 2 * (Di // 8))
