"""The registry: names, aliases, overrides, direction lists from data and files, and bad input."""
import pytest
import yaml

from nas.models import create_model, list_models, published_directions
from nas.ops import DIRECTIONS

CONTRACT = ["local_vim_tiny", "local_vim_small", "local_vim_tiny_middle_cls_token", "local_vim_tiny_search",
            "local_vssm_tiny", "local_vssm_small", "local_vssm_tiny_search", "local_vssm_small_search"]


def test_contract_names_and_small_variants_are_registered():
    names = list_models()
    assert set(CONTRACT) <= set(names)
    assert {"local_vim_demo", "local_vim_demo_search", "local_vssm_demo", "local_vssm_demo_search"} <= set(names)
    aliases = set(list_models(include_aliases=True)) - set(names)
    assert {n.replace("vssm", "vmamba") for n in names if "vssm" in n} == aliases
    assert list_models("*_search") == sorted(n for n in names if n.endswith("_search"))


def test_derived_models_default_to_the_published_lists():
    assert create_model("local_vim_demo").config["img_size"] == 28
    for name in ("local_vim_tiny", "local_vssm_small"):
        assert create_model(name).directions == published_directions(name)


def test_published_lists_are_written_in_canonical_order():
    from nas.models.arch import published_names
    for name in published_names():
        for layer in published_directions(name):
            assert layer == sorted(layer, key=DIRECTIONS.index)


def test_overrides_reach_the_model():
    model = create_model("local_vim_demo_search", img_size=36, num_classes=3, drop_path_rate=0.2, scattn="full",
                         backend="ref")
    assert model.num_classes == 3 and model.grid == (9, 9)
    assert model.layers[-1].drop_path.p == pytest.approx(0.2 * 2 / 3)
    assert model.layers[0].mixer.attn.mode == "full" and model.layers[0].mixer.backend == "ref"


def test_directions_from_a_list_an_arch_file_and_a_published_name(tmp_path):
    arch = [["h", "v", "w2", "w7_flip"]] * 4
    assert create_model("local_vssm_demo", directions=arch).directions == arch
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump({"model": "local_vssm_demo_search", "directions": arch, "k": 4}))
    assert create_model("local_vssm_demo", directions=str(path)).directions == arch
    assert create_model("local_vssm_demo", directions=path).directions == arch
    wo = create_model("local_vim_tiny", directions="local_vim_tiny_wo_search")
    assert wo.directions == [["h", "h_flip", "w2", "w2_flip"]] * 20


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"model: unknown model name 'local_vim_huge'; expected one of .*local_vim_tiny"):
        create_model("local_vim_huge")


GOOD = [["h", "h_flip", "v", "v_flip"]] * 4


@pytest.mark.parametrize("directions,match", [
    (GOOD[:3], r"directions: expected 4 per-layer lists \(one per layer of local_vim_demo\), got 3"),
    (GOOD + [GOOD[0]], r"expected 4 per-layer lists .* got 5"),
    (GOOD[:3] + [["h", "v", "zigzag", "w2"]], r"directions\[3\]: unknown scan direction 'zigzag'"),  # diag is registered
    ([["h", "h", "v", "w2"]] + GOOD[1:], r"directions\[0\]: direction 'h' appears more than once"),
    ([["h", "v", "w2"]] + GOOD[1:], r"directions\[0\]: expected 4 directions per layer, got 3"),
    (GOOD[:2] + [DIRECTIONS[:5]] + GOOD[3:], r"directions\[2\]: expected 4 directions per layer, got 5"),
    (GOOD[:3] + ["h"], r"directions\[3\]: expected a list of 4 scan directions, got 'h'"),
    (42, r"directions: expected a list of 4 per-layer lists of 4 scan directions"),
])
def test_malformed_direction_lists(directions, match):
    with pytest.raises(ValueError, match=match):
        create_model("local_vim_demo", directions=directions)


def test_scans_per_layer_sets_k():
    model = create_model("local_vim_demo", directions=[["h", "v"]] * 4, scans_per_layer=2)
    assert len(model.layers[0].mixer.directions) == 2
    with pytest.raises(ValueError, match=r"expected 2 directions per layer, got 4"):
        create_model("local_vim_demo", scans_per_layer=2)


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"directions: local_vim_demo_search is a search model"):
        create_model("local_vim_demo_search", directions=GOOD)
    with pytest.raises(ValueError, match=r"colour: not an option of local_vim_demo; expected one of .*img_size"):
        create_model("local_vim_demo", colour="red")
    with pytest.raises(ValueError, match=r"scattn: expected one of channel, full, got 'spatial'"):
        create_model("local_vim_demo", scattn="spatial")
    with pytest.raises(ValueError, match=r"directions: arch file '.*missing.yaml' not found"):
        create_model("local_vim_demo", directions=str(tmp_path / "missing.yaml"))
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump({"model": "x", "layers": []}))
    with pytest.raises(ValueError, match=r"has no 'directions' key"):
        create_model("local_vim_demo", directions=path)
    with pytest.raises(ValueError, match=r"backend: expected one of auto, .*, got 'cuda'"):
        create_model("local_vssm_demo", backend="cuda")
