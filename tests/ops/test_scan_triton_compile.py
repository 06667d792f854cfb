"""The Triton kernels compile for sm_90 (Hopper) with the ptxas inside the triton wheel, no GPU needed: with
the pinned Triton and, where a side install is found (scan_triton_aot.side_triton), with Triton 3.6, the GPU
machines' version. The default launch configs fit in registers (no spill stack) and the time loop of each
kernel stays within its budget of warp shuffles. The interpreter tests check what the kernels compute; only
these check that the real compiler accepts them and what it makes of them."""
import os

import pytest
import torch

triton_aot = pytest.importorskip("nas.ops.scan_triton_aot")
from nas.ops import scan_triton_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles real kernels, not interpreted ones")
needs_toolchain = pytest.mark.skipif(not triton_aot.toolchain_available(),
                                     reason="triton's bundled ptxas/cuobjdump are missing")
# the LocalVim-T search layer's launch: 8 directions in one, bf16, every option
SEARCH_LAYER = dict(N=16, Dg=256, S=196, index=True)


def assert_fits(res):
    for kernel in ("forward", "backward"):
        usage = res[kernel]
        # under 255: the compiler fits the kernel, rather than stopping at the limit
        assert 0 < usage["registers"] < 255, (kernel, usage["registers"])
        assert usage["stack_bytes"] == 0 and usage["local_bytes"] == 0, (kernel, res["config"], usage["stack_bytes"])
        assert usage["loop"]["local"] == 0, kernel
        # at most 4 warp shuffles per (channel x step): the dB/dC sums over 16 lanes, nothing else
        assert usage["per_channel_step"]["SHFL"] <= 4, (kernel, usage["per_channel_step"])
        assert usage["ptx"].lstrip().startswith("//") and ".target sm_90" in usage["ptx"]


@needs_toolchain
def test_search_layer_compiles_for_sm90_within_budget():
    res = triton_aot.kernel_resources(torch.bfloat16, **SEARCH_LAYER)
    assert_fits(res)
    # one exponential per state and step forward, two backward (the recompute and the adjoint)
    assert res["forward"]["loop"]["MUFU.EX2"] >= 16 * res["config"][1]
    assert res["forward"]["per_channel_step"]["SHFL"] == 0  # the states' sum y_t is inside each thread


@needs_toolchain
def test_small_state_without_options_compiles_without_spills():
    assert_fits(triton_aot.kernel_resources(torch.float32, N=4, Dg=64, S=49, D=False, z=False, delta_bias=False,
                                            softplus=False))


@needs_toolchain
def test_search_layer_compiles_with_the_gpu_machines_triton():
    side = triton_aot.side_triton("3.6.0")
    if side is None:
        pytest.skip("no Triton 3.6 beside the pinned one (benchmarks/kernel_resources.py installs one into the "
                    "cache folder; or set NAS_TRITON_36 to a `pip install --target` folder)")
    res = triton_aot.kernel_resources_with(side, io_dtype="bf16", **SEARCH_LAYER)
    assert res["triton"].startswith("3.6")
    assert_fits(res)


def test_sass_loop_counts_read_the_time_loop():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R2 ;
        /*0020*/                   FFMA R3, R2, R3, R4 ;
        /*0030*/                   LDG.E.U16 R5, desc[UR4][R6.64] ;
        /*0040*/                   SHFL.BFLY PT, R7, R3, 0x1, 0x1f ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   STG.E.128 desc[UR4][R8.64], R12 ;
        /*0070*/                   EXIT ;
    """
    counts = triton_aot.loop_counts(sass)
    assert counts["MUFU.EX2"] == 1 and counts["FP32"] == 1 and counts["SHFL"] == 1 and counts["LDG.16"] == 1
    assert counts["STG"] == 0 and counts["total"] == 4
    assert triton_aot.per_channel_step(counts, 32, 4, 1)["total"] == pytest.approx(4 / 128, abs=1e-4)


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^io_dtype: expected one of .*got torch.float64$"):
        triton_aot.kernel_resources(torch.float64)


@pytest.mark.parametrize("name", ["_scan_fwd_kernel", "_scan_bwd_kernel"])
def test_lengths_and_strides_do_not_key_the_compile_cache(name):
    """L = 196 and L = 197 (or a new batch) must reuse one compiled kernel: sizes are do_not_specialize, and
    strides keyed only by being 1 (never by their alignment), so only the constexprs (options, tile sizes, N),
    pointer types and unit strides pick a kernel."""
    kernel = getattr(scan_triton_kernels, name)
    ints = {p.name: p for p in kernel.params if not p.is_constexpr and not p.name.endswith("_ptr")}
    assert {"L", "S", "n_chunks", "G", "Dg", "su_l", "sB_l"} <= set(ints)
    sizes = [n for n in ints if not n.startswith("s") or n == "S"]
    assert all(ints[n].do_not_specialize for n in sizes), sizes
    assert all(ints[n].do_not_specialize_on_alignment for n in ints if n not in sizes)
