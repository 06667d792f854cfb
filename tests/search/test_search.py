"""search.py end to end on the demo data in tiny settings: artifacts, resume, strategies, bad input."""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from nas.data import build_datasets
from nas.engine import checkpoint
from nas.models import arch_parameters, create_model
from nas.cli.search import main, parse_args, resolve_config
from nas.search.run import run_search
from nccl_emulation import CPU_REFUSED, join_as_cuda_process

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "search_spaces", "demo.yaml")
# 2 layers of width 16 on a 4 x 4 token grid, 12 images per class: one epoch takes a few seconds
TINY = ["-c", DEMO, "--data.images_per_class", "12", "--train.batch_size", "24", "--model_args.depth", "2",
        "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false", "--train.warmup_epochs", "0"]


def alphas_of(run_dir):
    state = checkpoint.load(os.path.join(run_dir, "last.pt"))["model"]
    return torch.stack([v for k, v in state.items() if k.endswith("multi_scan.weights")])


def test_demo_search_leaves_every_artifact(tmp_path):
    out = str(tmp_path / "run")
    assert main(TINY + ["--out", out, "--epochs", "2"]) == 0
    for name in ("config.yaml", "last.pt", "best.pt", "alphas.json", "log.jsonl", "figures/alphas.png",
                 "train_files.txt", "val_files.txt", "classes.txt"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    alphas = json.load(open(os.path.join(out, "alphas.json")))
    assert alphas["directions"] == ["h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip"]
    assert [e["epoch"] for e in alphas["epochs"]] == [1, 2]
    probs = torch.tensor(alphas["epochs"][-1]["probs"])
    assert probs.shape == (2, 8) and torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(probs, alphas_of(out).view(2, 8).softmax(1), atol=1e-6)
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("train_loss", "train_top1", "val_top1", "val_top5", "lr", "images_per_s", "peak_memory_mb",
                "alpha_entropy_mean", "alpha_gap45_mean"):
        assert key in lines[-1], key
    # a real TensorBoard event file with the per-layer probabilities, entropies, gaps and the heatmap
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(out, "tb")).Reload()
    tags = events.Tags()
    assert "alpha/layer00/w7_flip" in tags["scalars"] and "alpha_entropy/layer01" in tags["scalars"]
    assert "alpha_gap/layer00" in tags["scalars"] and "epoch/val_top1" in tags["scalars"]
    assert "alpha/heatmap" in tags["images"]
    assert len(events.Scalars("epoch/train_loss")) == 2


def model_state(run_dir):
    return checkpoint.load(os.path.join(run_dir, "last.pt"))["model"]


@pytest.mark.parametrize("strategy", ["joint", "bilevel", "sampled"])
def test_resume_continues_exactly(tmp_path, strategy):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    argv = TINY + ["--epochs", "2", "--strategy.name", strategy, "--strategy.alpha_lr", "0.05"]
    assert main(argv + ["--out", straight]) == 0
    assert main(argv + ["--out", split, "--train.stop_after_epochs", "1"]) == 0  # "killed"
    assert checkpoint.load(os.path.join(split, "last.pt"))["loop"]["epoch"] == 1
    assert main(argv + ["--out", split, "--resume"]) == 0
    a, b = model_state(split), model_state(straight)
    assert a.keys() == b.keys()
    for key in a:  # weights and alpha
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert alphas_of(straight).abs().max() > 1e-2  # alpha did train, so equality means something
    history = json.load(open(os.path.join(split, "alphas.json")))["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]


@pytest.mark.parametrize("strategy", ["bilevel", "sampled"])
def test_other_strategies_run_and_move_alpha(tmp_path, strategy):
    out = str(tmp_path / strategy)
    assert main(TINY + ["--out", out, "--epochs", "1", "--strategy.name", strategy, "--strategy.alpha_lr", "0.05"]) == 0
    alphas = alphas_of(out)
    assert torch.isfinite(alphas).all() and alphas.abs().max() > 1e-2  # init is 1e-3 * randn
    if strategy == "bilevel":
        assert os.path.getsize(os.path.join(out, "heldout_files.txt")) > 0


def test_bilevel_reports_val_not_its_alpha_split(tmp_path):
    out = str(tmp_path / "bilevel")
    assert main(TINY + ["--out", out, "--epochs", "1", "--strategy.name", "bilevel"]) == 0
    record = json.loads(open(os.path.join(out, "log.jsonl")).readline())
    assert 0 <= record["heldout_top1"] <= 100 and record["heldout_loss"] > 0  # the alpha steps' own numbers
    # val_top1 (what best.pt is chosen by) is the saved model's top-1 on val_files.txt, not on heldout_files.txt
    from nas import config as cfglib
    from nas.engine.distributed import DistEnv
    from nas.engine.loop import evaluate
    from nas.data import build_loader
    cfg = cfglib.load_yaml(os.path.join(out, "config.yaml"))
    data = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"], None)
    model = create_model(cfg["model"], img_size=cfg["img_size"], num_classes=data.num_classes, **cfg["model_args"])
    model.load_state_dict(model_state(out))
    val = evaluate(model, build_loader(data.val, 24, False), DistEnv())
    held = evaluate(model, build_loader(data.heldout, 24, False), DistEnv())
    assert len(data.val) != len(data.heldout)
    assert record["val_top1"] == pytest.approx(val["val_top1"], abs=1e-9)
    assert record["val_loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    assert record["val_loss"] != pytest.approx(held["val_loss"], rel=1e-6)


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_below_one_is_an_error_before_anything_is_written(tmp_path, capsys, epochs):
    out = tmp_path / "none"
    assert main(TINY + ["--out", str(out), "--epochs", epochs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"search.py: error: train.epochs: expected an int >= 1, got {epochs}"]
    assert not out.exists()


def test_alpha_warmup_keeps_alpha_fixed(tmp_path):
    out = str(tmp_path / "warm")
    argv = TINY + ["--out", out, "--epochs", "1", "--strategy.alpha_warmup_epochs", "1"]
    assert main(argv) == 0
    # the same construction as the run, in the same order, gives the initial alpha
    cfg, _ = resolve_config(*parse_args(argv))
    torch.manual_seed(cfg["seed"])
    data = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"], None)
    fresh = create_model(cfg["model"], img_size=cfg["img_size"], num_classes=data.num_classes, **cfg["model_args"])
    torch.testing.assert_close(alphas_of(out), torch.stack([a.detach() for a in arch_parameters(fresh)]))


@pytest.mark.parametrize("argv,message", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--train.lrr", "1"], "unknown key 'train.lrr'"),
    (["--model", "local_vim_nope_search"], "unknown model name 'local_vim_nope_search'"),
    (["--model", "local_vim_demo"], "is a derived model"),
    (["--strategy.name", "random"], "strategy.name: unknown strategy 'random'"),
    (["--strategy.k", "9"], "strategy.k: expected an int from 1 to 8"),
    (["--data.images_per_class", "100000"], "100000"),
    (["--resume"], "holds no last.pt"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main(TINY + ["--out", str(tmp_path / "bad"), "--epochs", "1"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("search.py: error: ") and message in err[0], err
    assert not os.path.exists(tmp_path / "bad" / "last.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, result_dir, strategy):
    join_as_cuda_process(rank, world, port)  # every collective must get past what NCCL refuses
    torch.set_num_threads(1)
    cfg, out = resolve_config(*parse_args(TINY + ["--out", out, "--epochs", "1", "--strategy.alpha_lr", "0.05",
                                                  "--strategy.name", strategy]))
    result = run_search(cfg, out)
    torch.save(result["alphas"], os.path.join(result_dir, f"rank{rank}.pt"))


def _spawn(worker, args, timeout=240):
    """Run a 2-process gloo group; fail (not hang) if the ranks deadlock."""
    context = mp.start_processes(worker, args=args, nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the 2-process run did not finish within {timeout} s")


@pytest.mark.parametrize("strategy", ["joint", "bilevel", "sampled"])
def test_two_process_gloo_run_keeps_alpha_identical(tmp_path, strategy):
    out, results = str(tmp_path / "ddp"), tmp_path / "ranks"
    results.mkdir()
    _spawn(_ddp_worker, (2, _free_port(), out, str(results), strategy))
    a0, a1 = torch.load(results / "rank0.pt"), torch.load(results / "rank1.pt")
    torch.testing.assert_close(a0, a1, rtol=0, atol=0)
    assert a0.abs().max() > 1e-2  # alpha did train
    torch.testing.assert_close(alphas_of(out), a0, rtol=0, atol=0)  # rank 0 wrote the checkpoint


def _nccl_only_worker(rank, world, port, out, result_dir):
    """A run in the group the code before the fix joined on CUDA: NCCL alone."""
    join_as_cuda_process(rank, world, port, backend="nccl")
    torch.set_num_threads(1)
    try:
        run_search(*resolve_config(*parse_args(TINY + ["--out", out, "--epochs", "1"])))
        error = None
    except RuntimeError as e:
        error = str(e)
    torch.save(error, os.path.join(result_dir, f"rank{rank}.pt"))


def test_the_emulated_nccl_group_refuses_what_nccl_refuses(tmp_path):
    """The emulation is strict: a group of NCCL alone (what CUDA processes joined before) fails at the first
    step's collective, as every CUDA torchrun run did; the group ``setup`` now joins passes (tests above)."""
    results = tmp_path / "ranks"
    results.mkdir()
    _spawn(_nccl_only_worker, (2, _free_port(), str(tmp_path / "nccl"), str(results)))
    for rank in (0, 1):
        error = torch.load(results / f"rank{rank}.pt")
        assert error is not None and CPU_REFUSED in error, error


def _nan_worker(rank, world, port, out, result_dir, bad_calls):
    """Rank 1's loss is NaN on the training steps numbered in ``bad_calls`` (all steps if None)."""
    import contextlib
    import io

    from nas.search import strategies

    join_as_cuda_process(rank, world, port)
    torch.set_num_threads(1)
    real, calls = strategies.Strategy.loss, []

    def loss(self, model, images, labels):
        value, logits = real(self, model, images, labels)
        calls.append(len(calls))
        if rank == 1 and (bad_calls is None or calls[-1] in bad_calls):
            value = value * float("nan")
        return value, logits

    strategies.Strategy.loss = loss
    argv = TINY + ["--out", out, "--epochs", "1", "--strategy.alpha_lr", "0.05", "--train.max_bad_steps", "2"]
    if bad_calls is not None:
        result = {"code": 0, "stderr": "", "alphas": run_search(*resolve_config(*parse_args(argv)))["alphas"]}
    else:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            result = {"code": main(argv)}
        result["stderr"] = err.getvalue()
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, monkeypatch):
    out, results = str(tmp_path / "nan"), tmp_path / "ranks"
    results.mkdir()
    _spawn(_nan_worker, (2, _free_port(), out, str(results), [1]))  # the second of the epoch's 2 steps
    r0, r1 = torch.load(results / "rank0.pt"), torch.load(results / "rank1.pt")
    assert r0["code"] == r1["code"] == 0, (r0["stderr"], r1["stderr"])
    saved = checkpoint.load(os.path.join(out, "last.pt"))
    assert saved["loop"]["step"] == 1  # two batches, one optimizer step: rank 0 skipped its finite step too
    torch.testing.assert_close(r0["alphas"], r1["alphas"], rtol=0, atol=0)


def test_nan_for_max_bad_steps_stops_every_rank_with_one_line(tmp_path):
    out, results = str(tmp_path / "nan"), tmp_path / "ranks"
    results.mkdir()
    _spawn(_nan_worker, (2, _free_port(), out, str(results), None))
    for rank in (0, 1):
        r = torch.load(results / f"rank{rank}.pt")
        lines = r["stderr"].strip().splitlines()  # the run's own log lines, then the error
        assert r["code"] == 2 and "Traceback" not in r["stderr"], r
        assert [line for line in lines if "error" in line] == lines[-1:], lines
        assert lines[-1].startswith("search.py: error: the loss was not finite for 2 steps in a row"), lines
    assert not os.path.exists(os.path.join(out, "last.pt"))


def test_hierarchical_search_heatmap_knows_its_stages(tmp_path, monkeypatch):
    seen = {}
    import nas.search.alphas as alphas_module
    real = alphas_module.alpha_heatmap

    def spy(probs, kept, title, stage_ends=None, **kwargs):
        seen["stage_ends"] = stage_ends
        return real(probs, kept, title, stage_ends, **kwargs)

    monkeypatch.setattr(alphas_module, "alpha_heatmap", spy)
    out = str(tmp_path / "vssm")
    assert main(["-c", DEMO, "--model", "local_vssm_demo_search", "--out", out, "--epochs", "1",
                 "--data.images_per_class", "6", "--train.batch_size", "20", "--log.progress", "false",
                 "--train.warmup_epochs", "0"]) == 0
    assert seen["stage_ends"] == [1, 3, 4]  # local_vssm_demo: depths [1, 2, 1]


def test_identical_candidates_are_named_once_in_the_log(tmp_path, capsys):
    out = str(tmp_path / "seven")  # 28 px / patch 4: a 7 x 7 token grid, where w7 is raster order
    assert main(TINY + ["--out", out, "--epochs", "1", "--img_size", "28"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "candidate scans are the same" in line]
    assert len(lines) == 1 and "layers 0-1 (7 x 7 tokens): h = w7, h_flip = w7_flip." in lines[0], lines
    assert "--distinct" in lines[0]
