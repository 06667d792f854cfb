"""The fast backends' first-use self-check (nas.ops.selfcheck): it passes the real kernels, catches a kernel
made wrong on purpose (forward, one gradient, an exception), falls back to the torch backend with one warning
line (or refuses when the backend was named), can be switched off, and costs little."""
import logging
import os
import time

import pytest
import torch

from nas.errors import UserError
from nas.ops import causal_conv, cpu_kernels, scan_cpu, selfcheck
from nas.ops.selective_scan import resolve_backend, selective_scan

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no compiled CPU kernels")
REAL_SCAN = scan_cpu.selective_scan_cpu


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not checked anything yet."""
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(selfcheck, "_warned", set())
    monkeypatch.delenv("NAS_SELFCHECK", raising=False)


def output_off(**kw):
    out = REAL_SCAN(**kw)
    return (out[0] * 1.01, out[1]) if isinstance(out, tuple) else out * 1.01


def delta_gradient_off(**kw):
    delta = kw["delta"] * 1.0
    delta.register_hook(lambda g: g * 1.1)  # the forward is right, delta's gradient 10% off
    return REAL_SCAN(**{**kw, "delta": delta})


def raises(**kw):
    raise RuntimeError("illegal instruction in scan_forward\nsecond line")


def test_the_real_kernels_pass_well_inside_the_tolerance(fresh):
    name, error = selfcheck._check_cpu()
    assert error < selfcheck.TOLERANCE[torch.float32] / 10, (name, error)
    assert selfcheck.cpu_failure() == "" and resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("fault, found", [(output_off, "is off by 1.0e-02 ("),
                                          (delta_gradient_off, "(gradient of delta"),
                                          (raises, "failed: RuntimeError: illegal instruction in scan_forward")])
def test_a_wrong_kernel_falls_back_to_torch_with_one_warning_line(fresh, monkeypatch, caplog, fault, found):
    monkeypatch.setattr(scan_cpu, "selective_scan_cpu", fault)
    x = selfcheck.scan_problem(2, 8, 6, 4, 0, seed=3)
    conv_calls = []
    with caplog.at_level(logging.WARNING):
        y = selective_scan(**x)  # "auto": the first call checks
        monkeypatch.setattr(causal_conv, "causal_conv1d_silu_cpu", lambda *a: conv_calls.append(a))
        selective_scan(**x)
        conv = causal_conv.causal_conv1d_silu(torch.randn(1, 3, 5), torch.randn(3, 1, 4), None)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert lines[0].startswith("self-check: the cpu backend on cpu (") and found in lines[0], lines[0]
    assert f"torch {torch.__version__}" in lines[0] and "using the torch backend instead" in lines[0]
    assert "\n" not in lines[0]
    # what ran is the torch backend: its numbers, and the conv's PyTorch reference
    torch.testing.assert_close(y[0], selective_scan(**x, backend="torch")[0], rtol=0, atol=0)
    assert not conv_calls and conv.shape == (1, 3, 5)
    with pytest.raises(UserError, match=r"^self-check: the cpu backend .*; use backend='torch'"):
        selective_scan(**x, backend="cpu")


def test_nas_selfcheck_0_skips_the_check(fresh, monkeypatch):
    monkeypatch.setenv("NAS_SELFCHECK", "0")
    monkeypatch.setattr(scan_cpu, "selective_scan_cpu", raises)
    assert resolve_backend("auto", torch.device("cpu")) == "cpu" and not selfcheck._verdicts


def test_the_check_leaves_the_global_random_state_alone(fresh):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert selfcheck.cpu_failure() == ""
    assert torch.equal(torch.get_rng_state(), before)


def test_the_check_runs_under_no_grad_and_inference_mode(fresh):
    with torch.inference_mode():
        assert selfcheck.cpu_failure() == ""


def test_the_check_costs_well_under_a_second(fresh):
    cpu_kernels.library()  # built or loaded already: the check's own cost
    start = time.process_time()  # this process's CPU time: on a busy machine the wall clock says little
    assert selfcheck.cpu_failure() == ""
    assert time.process_time() - start < 0.5


@pytest.mark.interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter")
def test_the_triton_check_passes_the_kernels_and_catches_a_fault(fresh, monkeypatch):
    """The models' launch (all directions through an index table with pads, every option), under the
    interpreter: the real kernels pass, a kernel 1% off fails, and "auto" then runs torch."""
    from nas.ops import scan_triton

    options = ("multi", "index", "D", "z", "bias", "softplus")
    cpu = torch.device("cpu")
    assert selfcheck.triton_failure(cpu, torch.float32, 4, options) == ""
    real = scan_triton.multi_direction_scan_triton
    monkeypatch.setattr(scan_triton, "multi_direction_scan_triton", lambda **kw: real(**kw) * 1.01)
    assert selfcheck.triton_failure(cpu, torch.float32, 4, options) == ""  # remembered for this key
    failure = selfcheck.triton_failure(cpu, torch.float32, 8, options)  # another state size: a new variant
    assert failure.startswith("self-check: the triton backend on cpu (") and "fp32" not in failure
    assert "float32, N 8, multi+index+D+z+bias+softplus) is off by 1.0e-02 (" in failure, failure
    assert selfcheck.settle("triton", False, failure) == "torch"


def test_a_gpu_older_than_the_kernels_gets_torch_with_one_line(monkeypatch, caplog):
    """Compute capability 7.5 (no GPU here: the device queries answer as a T4 would): "auto" takes torch and
    says why once; 'triton' named explicitly is refused naming the GPU and its capability."""
    import importlib

    ss = importlib.import_module("nas.ops.selective_scan")  # the module: nas.ops exports the function by its name
    monkeypatch.setattr(ss, "_warned_gpus", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    gpu = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("auto", gpu) == "torch"
        assert resolve_backend("auto", gpu) == "torch"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["the Triton kernels need a GPU of compute capability 8.0 or newer; Tesla T4 on cuda:0 is 7.5; "
                     "using the torch backend"], lines
    with pytest.raises(ValueError, match=r"^backend: the Triton kernels need .* Tesla T4 on cuda:0 is 7\.5; use"):
        resolve_backend("triton", gpu)
