"""search.py end to end on the demo data in tiny settings: artifacts, resume, strategies, bad input."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nas.data import build_datasets
from nas.engine import checkpoint
from nas.models import arch_parameters, create_model
from nas.search.run import main, parse_args, resolve_config, run_search

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


def test_resume_continues_exactly(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(TINY + ["--out", straight, "--epochs", "2"]) == 0
    assert main(TINY + ["--out", split, "--epochs", "2", "--train.stop_after_epochs", "1"]) == 0  # "killed"
    assert checkpoint.load(os.path.join(split, "last.pt"))["loop"]["epoch"] == 1
    assert main(TINY + ["--out", split, "--resume"]) == 0
    torch.testing.assert_close(alphas_of(split), alphas_of(straight), rtol=0, atol=1e-6)
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


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg, out = resolve_config(*parse_args(TINY + ["--out", out, "--epochs", "1", "--strategy.alpha_lr", "0.05"]))
    result = run_search(cfg, out)
    torch.save(result["alphas"], os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_process_gloo_run_keeps_alpha_identical(tmp_path):
    out, results = str(tmp_path / "ddp"), tmp_path / "ranks"
    results.mkdir()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out, str(results)), nprocs=2, start_method="spawn")
    a0, a1 = torch.load(results / "rank0.pt"), torch.load(results / "rank1.pt")
    torch.testing.assert_close(a0, a1, rtol=0, atol=0)
    assert a0.abs().max() > 1e-2  # alpha did train
    torch.testing.assert_close(alphas_of(out), a0, rtol=0, atol=0)  # rank 0 wrote the checkpoint


def test_hierarchical_search_heatmap_knows_its_stages(tmp_path, monkeypatch):
    seen = {}
    import nas.search.alphas as alphas_module
    real = alphas_module.alpha_heatmap

    def spy(probs, kept, title, stage_ends=None):
        seen["stage_ends"] = stage_ends
        return real(probs, kept, title, stage_ends)

    monkeypatch.setattr(alphas_module, "alpha_heatmap", spy)
    out = str(tmp_path / "vssm")
    assert main(["-c", DEMO, "--model", "local_vssm_demo_search", "--out", out, "--epochs", "1",
                 "--data.images_per_class", "6", "--train.batch_size", "20", "--log.progress", "false",
                 "--train.warmup_epochs", "0"]) == 0
    assert seen["stage_ends"] == [1, 3, 4]  # local_vssm_demo: depths [1, 2, 1]
