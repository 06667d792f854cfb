"""The Triton kernels compile for sm_90 (Hopper) and sm_80 with the ptxas inside the triton wheel, no GPU
needed, and the default launch configs fit in registers (no spill stack). The interpreter tests check what
the kernels compute; only these check that the real compiler accepts them."""
import os

import pytest
import torch

triton_aot = pytest.importorskip("nas.ops.scan_triton_aot")
from nas.ops import scan_triton  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles real kernels, not interpreted ones")
needs_toolchain = pytest.mark.skipif(not triton_aot.toolchain_available(),
                                     reason="triton's bundled ptxas/cuobjdump are missing")


@needs_toolchain
@pytest.mark.parametrize("io_dtype,N,Dg,S,index,options", [
    (torch.bfloat16, 16, 256, 196, True, True),     # LocalVim-T search layer: 8 directions in one launch
    (torch.float32, 16, 384, 196, True, True),      # a derived LocalVim layer, fp32
    (torch.float16, 16, 192, 3136, False, True),    # LocalVMamba stage 1 as a single grouped scan
    (torch.bfloat16, 1, 256, 196, True, True),      # d_state 1 (VMamba v2 style): wide channel tiles
    (torch.float32, 4, 64, 49, False, False),       # no D / z / delta_bias / softplus
    (torch.bfloat16, 64, 128, 197, True, True),     # the largest d_state the backend takes
])
def test_default_launch_configs_compile_for_sm90_without_spills(io_dtype, N, Dg, S, index, options):
    res = triton_aot.kernel_resources(io_dtype, N=N, Dg=Dg, S=S, index=index, D=options, z=options,
                                      delta_bias=options, softplus=options)
    for kernel in ("forward", "backward"):
        usage = res[kernel]
        assert 0 < usage["registers"] <= 255, (kernel, usage)
        assert usage["stack_bytes"] == 0 and usage["local_bytes"] == 0, (kernel, res["config"], usage)


@pytest.mark.skipif(not triton_aot.toolchain_available(80), reason="triton's bundled ptxas for sm_80 is missing")
def test_search_layer_compiles_for_sm80_without_spills():  # A100s run searches too
    res = triton_aot.kernel_resources(torch.bfloat16, N=16, Dg=256, S=196, index=True, arch=80)
    assert all(res[k]["stack_bytes"] == 0 and 0 < res[k]["registers"] <= 255 for k in ("forward", "backward")), res


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^io_dtype: expected one of .*got torch.float64$"):
        triton_aot.kernel_resources(torch.float64)


@pytest.mark.parametrize("name", ["_scan_fwd_kernel", "_scan_bwd_kernel"])
def test_lengths_and_strides_do_not_key_the_compile_cache(name):
    """L = 196 and L = 197 (or any new stride) must reuse one compiled kernel: every integer argument is
    do_not_specialize, so only the constexprs (options, tile sizes, N) and pointer types pick a kernel."""
    kernel = getattr(scan_triton, name)
    ints = [p for p in kernel.params if not p.is_constexpr and not p.name.endswith("_ptr")]
    assert {"L", "S", "n_chunks", "su_l", "sB_l"} <= {p.name for p in ints}
    assert all(p.do_not_specialize for p in ints), [p.name for p in ints if not p.do_not_specialize]
