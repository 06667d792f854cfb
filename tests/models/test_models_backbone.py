"""Backbones (create_model(..., features_only=True)): feature maps' shapes, strides and channels for every registered
model at square and non-square sizes, features equal to the classification model's activations, timm's
forward_intermediates, checkpoints both ways (classification in, LocalMamba's outnorm names round trip, position
tables resized), backbones from an arch file, and the one-line errors."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from models_testing import shapes, small_model, vim_keys, vssm_keys

from nas.derive.export import build_arch, write_arch
from nas.errors import UserError
from nas.models import create_model, list_models
from nas.models.backbone import default_vim_indices, load_backbone_checkpoint
from nas.models.local_vim import resize_grid_embedding


def small_pair(name: str, **overrides):
    """(classification model, backbone) of the same small configuration, the backbone holding the model's weights."""
    model = small_model(name, **overrides).eval()
    backbone = small_model(name, features_only=True, **overrides).eval()
    load_backbone_checkpoint(backbone, model.state_dict())
    return model, backbone


def expected_sizes(model, H: int, W: int) -> list[tuple[int, int]]:
    """Each feature map's (h, w), worked out from the architecture: LocalVim pads to its patch; LocalVMamba's
    patch conv floors and every PatchMerging pads an odd size."""
    if "vim" in model.model_name:
        p = model.config["patch_size"]
        return [(math.ceil(H / p), math.ceil(W / p))] * len(model.out_indices)
    h, w, sizes = H // model.config["patch_size"], W // model.config["patch_size"], []
    for _ in model.config["dims"]:
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return [sizes[i] for i in model.out_indices]


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_gives_its_feature_maps(name):
    backbone = small_model(name, features_only=True).eval()
    vim = "vim" in name
    depth = backbone.num_layers if vim else len(backbone.config["dims"])
    assert backbone.out_indices == (default_vim_indices(depth) if vim else list(range(depth)))
    p = backbone.config["patch_size"]
    channels = [backbone.embed_dim] * depth if vim else backbone.config["dims"]
    strides = [p] * depth if vim else [p * 2 ** i for i in range(depth)]
    info = backbone.feature_info
    assert info.channels() == [channels[i] for i in backbone.out_indices]
    assert info.reduction() == [strides[i] for i in backbone.out_indices]
    assert info.module_name() == [f"layers.{i}" for i in backbone.out_indices]
    side = backbone.config["img_size"]
    for H, W in ((side, side), (side - 5, side + 13)):  # square, then non-square and off every window size
        with torch.no_grad():
            maps = backbone(torch.randn(2, 3, H, W))
        assert [tuple(m.shape) for m in maps] == [(2, c, h, w) for c, (h, w) in
                                                  zip(info.channels(), expected_sizes(backbone, H, W))]
        assert all(m.is_contiguous() and torch.isfinite(m).all() for m in maps)


def test_default_out_indices_scale_with_the_depth():
    assert default_vim_indices(20) == [4, 9, 14, 19]   # LocalMamba's Backbone_LocalVisionMamba
    assert default_vim_indices(24) == [5, 11, 17, 23]  # ViTDet's for 24 layers
    assert default_vim_indices(4) == [0, 1, 2, 3] and default_vim_indices(2) == [0, 1]


def _activations(model, x, indices):
    """The classification model's own activations, read by forward hooks: a LocalVim layer's hidden output
    (batch, L, C), a LocalVMamba stage's blocks' output (batch, h, w, C)."""
    seen = {}
    if "vim" in model.model_name:
        modules = {i: model.layers[i] for i in indices}
    else:
        modules = {i: model.layers[i].blocks for i in indices}
    handles = [m.register_forward_hook(lambda _m, _inp, out, i=i: seen.__setitem__(i, out)) for i, m in
               modules.items()]
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    return [seen[i][0] if isinstance(seen[i], tuple) else seen[i] for i in indices], logits


@pytest.mark.parametrize("name, overrides", [
    ("local_vim_demo", {}),
    ("local_vim_tiny_middle_cls_token", {}),
    ("local_vim_demo_search", {"depth": 2}),
    ("local_vssm_demo", {}),
    ("local_vssm_tiny_search", {"depths": [1, 1, 1, 1], "dims": [16, 16, 32, 32]}),
])
def test_backbone_features_are_the_classification_models_activations(name, overrides):
    torch.manual_seed(1)
    model, backbone = small_pair(name, **overrides)
    for norm in backbone.outnorms():  # not the identity, so that a wrong norm would show
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 30, 45)
    acts, logits = _activations(model, x, backbone.out_indices)
    with torch.no_grad():
        maps = backbone(x)
    for act, norm, got in zip(acts, backbone.outnorms(), maps):
        if "vim" in name:
            if model.mid_cls_token:  # the class token sits at num_patches // 2 and is no part of a map
                c = (act.shape[1] - 1) // 2
                act = torch.cat([act[:, :c], act[:, c + 1:]], dim=1)
            act = act.reshape(act.shape[0], *got.shape[-2:], act.shape[-1])
        torch.testing.assert_close(got, norm(act).permute(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
    # timm's forward_intermediates on the classification model: the same maps, and its pooled features are the
    # head's input
    with torch.no_grad():
        inter, pooled = model.forward_intermediates(x, indices=backbone.out_indices)
        head = model.head if "vim" in name else model.classifier
        assert torch.equal(head(pooled), logits)
        only = model.forward_intermediates(x, indices=backbone.out_indices, output_fmt="NHWC", intermediates_only=True)
    for act, a, b in zip(acts, inter, only):
        assert torch.equal(a.permute(0, 2, 3, 1), b)
        assert a.shape[1] == act.shape[-1]


def test_forward_intermediates_takes_timms_indices_and_norm():
    model = small_model("local_vssm_demo").eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        named = model.forward_intermediates(x, indices=[-2, 2], intermediates_only=True)
        normed, final = model.forward_intermediates(x, indices=[2], norm=True, output_fmt="NHWC")
    assert [m.shape[1] for m in last_two] == [64, 128]
    assert all(torch.equal(a, b) for a, b in zip(last_two, named))
    torch.testing.assert_close(normed[0], model.classifier.norm(final))  # timm's rule: only the last stage
    with torch.no_grad():
        first, stopped = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert first[0].shape == (1, 32, 7, 7) and stopped.shape == (1, 4, 4, 64)  # no stage after 0 but its merge


def test_classification_checkpoint_loads_into_a_backbone_of_another_size(tmp_path):
    """A classification checkpoint (the {'model': ...} form, DDP's 'module.' prefix) into a backbone trained for
    detection at another size: position and RoPE tables resized bicubically, a report of what did not carry
    over, and the same features as the classification model resizing its tables on the fly at that size."""
    torch.manual_seed(2)
    model = small_model("local_vim_demo").eval()  # 28 x 28: a 7 x 7 token grid
    path = tmp_path / "classifier.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    backbone = small_model("local_vim_demo", features_only=True, img_size=(40, 52)).eval()  # a 10 x 13 grid
    report = load_backbone_checkpoint(backbone, str(path))
    assert report.missing == [f"outnorm_{j}.{p}" for j in range(4) for p in ("weight", "bias")]
    assert sorted(report.unexpected) == ["head.bias", "head.weight", "norm_f.weight"]
    assert report.resized == [f"{k} 7x7 -> 10x13" for k in ("pos_embed", "rope.freqs_cos", "rope.freqs_sin")]
    grid = model.pos_embed[0].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, size=(10, 13), mode="bicubic", align_corners=False)
    torch.testing.assert_close(backbone.pos_embed[0], by_hand.permute(0, 2, 3, 1).reshape(130, -1))
    x = torch.randn(2, 3, 40, 52)
    acts, _ = _activations(model, x, backbone.out_indices)
    with torch.no_grad():
        maps = backbone(x)
    for act, norm, got in zip(acts, backbone.outnorms(), maps):
        torch.testing.assert_close(got, norm(act.reshape(2, 10, 13, -1)).permute(0, 3, 1, 2))


def test_middle_class_token_keeps_its_entry_when_the_table_is_resized():
    model = small_model("local_vim_tiny_middle_cls_token")  # 32 / 8: a 4 x 4 grid, the class token at 8
    backbone = small_model("local_vim_tiny_middle_cls_token", features_only=True, img_size=48)  # 6 x 6
    assert load_backbone_checkpoint(backbone, model.state_dict()).resized == ["pos_embed 4x4 -> 6x6"]
    old, new = model.pos_embed[0], backbone.pos_embed[0]
    assert new.shape[0] == 37 and torch.equal(new[18], old[8])
    patches = torch.cat([old[:8], old[9:]])
    torch.testing.assert_close(torch.cat([new[:18], new[19:]]), resize_grid_embedding(patches, (4, 4), (6, 6)))


# LocalMamba's layouts at a small size: LocalVim with its 16 x 16 patch (a 4 x 4 grid), LocalVMamba with 4 stages
ROUND_TRIP = {
    "local_vim_tiny": dict(img_size=64, patch_size=16, embed_dim=32, depth=4),
    "local_vim_tiny_middle_cls_token": dict(img_size=64, patch_size=16, embed_dim=32, depth=4),
    "local_vssm_tiny": dict(img_size=64, dims=[16, 32, 64, 128], depths=[1, 1, 2, 1]),
}


def _localmamba_backbone_keys(name: str) -> dict:
    """The state_dict of LocalMamba's detection/segmentation backbone, from the naming reference: the
    classification keys without the classifier, plus its outnorm LayerNorms."""
    if name.startswith("local_vim"):
        keys = vim_keys(32, depth=4, L=16, mid_cls_token="middle" in name)
        for k in ("head.weight", "head.bias", "norm_f.weight"):
            del keys[k]
        keys.update({f"outnorm_{j}.{p}": (32,) for j in range(4) for p in ("weight", "bias")})
    else:
        dims = ROUND_TRIP[name]["dims"]
        keys = {k: v for k, v in vssm_keys(dims, ROUND_TRIP[name]["depths"]).items() if not k.startswith("classifier.")}
        keys.update({f"outnorm{i}.{p}": (dims[i],) for i in range(4) for p in ("weight", "bias")})
    return keys


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_localmamba_backbone_state_dicts_round_trip_strictly(name):
    torch.manual_seed(3)
    want = _localmamba_backbone_keys(name)
    backbone = small_model(name, features_only=True, **ROUND_TRIP[name])
    assert shapes(backbone) == want
    theirs = {k: torch.randn(shape) for k, shape in want.items()}  # as LocalMamba's mmdet/mmseg code saves them
    assert load_backbone_checkpoint(backbone, theirs) == ([], [], [])
    ours = backbone.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)  # and back
    # a whole detector's checkpoint: its backbone is taken, the neck and heads reported
    detector = {"state_dict": {**{f"backbone.{k}": v for k, v in theirs.items()}, "neck.lateral.weight": torch.ones(1)}}
    assert load_backbone_checkpoint(backbone, detector) == ([], ["neck.lateral.weight"], [])
    # our classification checkpoint of the same model carries every weight but the outnorms
    report = load_backbone_checkpoint(backbone, small_model(name, **ROUND_TRIP[name]).state_dict())
    assert report.missing == [k for k in want if k.startswith("outnorm")] and report.resized == []


def test_out_indices_pick_and_name_the_outnorms():
    vim = small_model("local_vim_demo", features_only=True, out_indices=(1, -1))
    assert vim.out_indices == [1, 3] and [k for k in vim.state_dict() if k.startswith("outnorm")] == [
        "outnorm_0.weight", "outnorm_0.bias", "outnorm_1.weight", "outnorm_1.bias"]
    vssm = small_model("local_vssm_demo", features_only=True, out_indices=[2, 0])
    info = vssm.feature_info  # timm's FeatureInfo calls
    assert vssm.out_indices == info.out_indices == [0, 2] and info.reduction() == [4, 16] and len(info) == 2
    assert info.get_dicts(keys=["num_chs", "reduction"]) == [{"num_chs": 32, "reduction": 4},
                                                            {"num_chs": 128, "reduction": 16}]
    assert info[1] == info.get_dicts(idx=1) == {"num_chs": 128, "reduction": 16, "module": "layers.2"}
    assert info.channels(1) == 128 and info.get("module", [0, 1]) == ["layers.0", "layers.2"]
    assert [k for k in vssm.state_dict() if k.startswith("outnorm")] == [
        "outnorm0.weight", "outnorm0.bias", "outnorm2.weight", "outnorm2.bias"]
    assert [m.shape[1] for m in vssm(torch.randn(1, 3, 28, 28))] == [32, 128]


def test_a_searched_arch_file_builds_its_backbone(tmp_path):
    """arch.yaml as derive.py writes it, with per-layer k and registered orders beyond LocalMamba's 8."""
    candidates = ["h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip", "snake_h", "hilbert"]
    directions = [["h", "snake_h"], ["h", "v", "hilbert", "w2"], ["v_flip", "w2", "snake_h"], ["h_flip", "hilbert"]]
    arch = build_arch({"search": {"candidates": candidates}}, "local_vim_demo_search", [2, 4, 3, 2], directions,
                      [[0.1] * 10] * 4, str(tmp_path))
    write_arch(arch, str(tmp_path / "arch.yaml"))
    backbone = create_model(arch["model"], features_only=True, directions=str(tmp_path / "arch.yaml"))
    assert backbone.directions == directions and backbone.config["scans_per_layer"] == [2, 4, 3, 2]
    assert [tuple(m.shape) for m in backbone(torch.randn(1, 3, 20, 36))] == [(1, 48, 5, 9)] * 4
    bare = tmp_path / "bare.yaml"  # a bare per-layer list, as read_arch_file also takes: no model_args to add
    bare.write_text(yaml.safe_dump([["h", "v", "w2", "w7"]] * 4))
    layers = create_model("local_vim_demo", features_only=True, directions=str(bare)).directions
    assert layers == [["h", "v", "w2", "w7"]] * 4


@pytest.mark.parametrize("call, words", [
    (lambda: create_model("local_vim_demo", features_only=True, out_indices=[0, 4]), ["4", "-4 .. 3"]),
    (lambda: create_model("local_vssm_demo", features_only=True, out_indices=[1, 1]), ["stage 1", "more than once"]),
    (lambda: create_model("local_vim_demo", features_only=True, out_indices=5), ["5", "1 .. 4"]),
    (lambda: create_model("local_vim_demo", out_indices=[0]), ["out_indices", "features_only=True"]),
    (lambda: create_model("local_vim_demo", features_only=True)(torch.randn(1, 3, 3, 28)), ["3 x 28", "4 x 4"]),
    (lambda: create_model("local_vssm_demo", features_only=True)(torch.randn(1, 3, 28, 2)), ["28 x 2", "patch"]),
    (lambda: create_model("local_vim_demo").forward_intermediates(torch.randn(1, 3, 8, 8), output_fmt="NLC"),
     ["output_fmt", "NCHW"]),
    (lambda: create_model("local_vim_demo", features_only=True).forward_intermediates(torch.randn(1, 3, 8, 8),
                                                                                       intermediates_only=False),
     ["intermediates_only=True"]),
    (lambda: load_backbone_checkpoint(create_model("local_vim_demo", features_only=True),
                                      create_model("local_vssm_demo").state_dict()), ["does not fit local_vim_demo"]),
    (lambda: load_backbone_checkpoint(create_model("local_vim_demo", features_only=True),
                                      {"pos_embed": torch.zeros(1, 50, 48)}), ["50 tokens", "grid="]),
])
def test_bad_input_is_one_line_naming_the_value(call, words):
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
