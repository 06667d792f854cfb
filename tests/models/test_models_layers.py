"""The small pieces whose numbers must match the released models: RoPE, RMSNorm, patch merging, pos-embed resize."""
import math

import torch

from nas.models import create_model
from nas.models.layers import DropPath, RMSNorm
from nas.models.local_vim import resize_grid_embedding, rope_tables, rotate_half
from nas.models.local_vmamba import PatchMerging2D


def test_rope_tables_follow_eva02():
    C, H, W, pt = 16, 4, 3, 14
    cos, sin = rope_tables(C, (H, W), pt)
    half = C // 2
    inv = [1.0 / 10000 ** (2 * f / half) for f in range(half // 2)]
    for i in range(H):
        for j in range(W):
            for c in range(C):
                pos = (i / H * pt) if c < half else (j / W * pt)  # rows drive the first half, columns the second
                angle = pos * inv[(c % half) // 2]  # each frequency used by an adjacent (even, odd) pair
                assert math.isclose(cos[i * W + j, c].item(), math.cos(angle), abs_tol=1e-5)
                assert math.isclose(sin[i * W + j, c].item(), math.sin(angle), abs_tol=1e-5)


def test_rotate_half_rotates_adjacent_pairs():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_half(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_rope_buffers_are_persistent_and_sized_by_the_grid():
    model = create_model("local_vim_demo", img_size=(28, 20))
    assert model.state_dict()["rope.freqs_cos"].shape == (7 * 5, model.embed_dim)


def test_rms_norm():
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)


def test_drop_path_is_identity_in_eval_and_keeps_the_mean_in_training():
    dp = DropPath(0.5)
    x = torch.randn(4000, 3).abs() + 1
    assert torch.equal(dp.eval()(x), x)
    out = dp.train()(x)
    assert set(torch.unique((out == 0).all(1).float()).tolist()) == {0.0, 1.0}
    assert abs(out.mean().item() / x.mean().item() - 1) < 0.1


def test_patch_merging_pads_odd_grids_and_orders_neighbours_as_vmamba():
    merge = PatchMerging2D(2, 4)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0)
    x = torch.arange(3 * 3 * 2, dtype=torch.float32).view(1, 3, 3, 2)
    grabbed = {}
    merge.norm.register_forward_hook(lambda m, args, out: grabbed.setdefault("in", args[0]))
    assert merge(x).shape == (1, 2, 2, 4)
    first = grabbed["in"][0, 0, 0]  # (0,0), (1,0), (0,1), (1,1) concatenated
    assert first.tolist() == x[0, 0, 0].tolist() + x[0, 1, 0].tolist() + x[0, 0, 1].tolist() + x[0, 1, 1].tolist()
    assert grabbed["in"][0, 1, 1].tolist() == x[0, 2, 2].tolist() + [0.0] * 6  # zero-padded corner


def test_resize_grid_embedding_keeps_a_constant_and_the_identity():
    table = torch.randn(4 * 4, 3)
    assert torch.equal(resize_grid_embedding(table, (4, 4), (4, 4)), table)
    const = torch.ones(4 * 4, 3)
    torch.testing.assert_close(resize_grid_embedding(const, (4, 4), (6, 3)), torch.ones(18, 3))
