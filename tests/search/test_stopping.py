"""The search's stopping rule (search.stop) and its compute counter (path_steps), alone and end to end."""
import json
import os

import pytest
import torch

from nas.cli.search import main, parse_args, resolve_config
from nas.data import build_datasets
from nas.engine import checkpoint
from nas.engine.run_log import epoch_records, read_log
from nas.search.run import run_search, settle
from nas.search.stopping import STOP_DEFAULTS, stop_state
from test_search import TINY, _free_port, _spawn, model_state

CANDIDATES = ("a", "b", "c", "d")
A = [0.4, 0.3, 0.2, 0.1]      # top-2 keeps a, b; margin 0.3 - 0.2 = 0.1
A2 = [0.45, 0.3, 0.15, 0.1]   # the same set, margin 0.15
B = [0.3, 0.1, 0.4, 0.2]      # keeps a, c
THIN = [0.34, 0.31, 0.3, 0.05]  # keeps a, b with a margin of 0.01


def rule(rows, k=2, **settings):
    """The rule after the last of ``rows`` (one layer's probabilities per epoch, or a list of layers)."""
    epochs = [{"epoch": i + 1, "probs": r if isinstance(r[0], list) else [r]} for i, r in enumerate(rows)]
    return stop_state(epochs, {**STOP_DEFAULTS, "patience": 2, "min_margin": 0.05, "min_epochs": 1, **settings},
                      k, CANDIDATES, 0.5)


def test_the_rule_counts_the_epochs_the_derived_set_held_and_reads_margins():
    s = rule([B, A, A2, A])
    assert (s.epoch, s.stable, s.stop) == (4, 2, True)
    assert s.margins == pytest.approx([0.1])
    assert rule([B, A, A]).stop is False and rule([B, A, A]).stable == 1   # held 1 epoch, patience 2
    assert rule([A, B, A, A]).stable == 1                                   # a change restarts the count
    assert rule([A, A, A, THIN]).stop is False                              # margin 0.01 < 0.05
    assert rule([A, A, A, THIN], min_margin=0.01 - 1e-9).stop is True
    assert rule([A, A, A, A], patience=None).stop is False                  # off: LocalMamba's schedule
    assert stop_state([], STOP_DEFAULTS, 2, CANDIDATES, 0.5) is None  # before the first epoch


def test_the_rule_never_stops_before_min_epochs():
    assert [rule([A] * n, min_epochs=4).stop for n in range(1, 6)] == [False, False, False, True, True]


def test_the_rule_takes_the_set_derive_takes_per_layer_k_and_auto():
    # two layers, k per layer: layer 0 keeps a (margin 0.4 - 0.3), layer 1 all four (margin: its weakest, 0.1)
    s = rule([[A, A]] * 3, k=[1, 4])
    assert s.stop and s.margins == pytest.approx([0.1, 0.1])
    # auto (mass 0.5): A keeps a, b (0.4 + 0.3), a uniform layer a tie of 2 (margin 0): it never settles
    s = rule([[A, [0.25] * 4]] * 3, k="auto")
    assert not s.stop and s.stable == 2 and s.margins == pytest.approx([0.1, 0.0])


# alpha is frozen for 2 epochs, so the derived set holds from epoch 1 to 2 and the rule (patience 1, no margin
# asked) holds first at epoch 2, min_epochs: a stop that does not depend on how the tiny search moves alpha
STOP = ["--search.stop.patience", "1", "--search.stop.min_margin", "0", "--search.stop.min_epochs", "2"]
SMALL = TINY + ["--data.num_classes", "4"]  # 48 training images: 2 steps of 24 per epoch
RUN = SMALL + ["--epochs", "3", "--strategy.alpha_lr", "0.05", "--strategy.alpha_warmup_epochs", "2"]
SETTINGS = {**STOP_DEFAULTS, "patience": 1, "min_margin": 0.0, "min_epochs": 2}


def per_epoch_path_steps(argv, out, world=1, paths=8):
    """A TINY search's path-steps per epoch: each rank's whole batches of its shard x layers x paths."""
    cfg = settle(resolve_config(*parse_args(argv + ["--out", out]))[0])
    data = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"])
    batch = cfg["train"]["batch_size"]
    return world * (len(data.train) // world // batch * batch) * cfg["model_args"]["depth"] * paths


def test_a_search_stops_when_the_rule_holds_resumes_stopped_and_continues_exactly_with_more_patience(tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    assert main(RUN + ["--out", straight]) == 0
    assert main(RUN + STOP + ["--out", stopped]) == 0
    history = json.load(open(os.path.join(stopped, "alphas.json")))
    assert [stop_state(history["epochs"][:e], SETTINGS, 4, history["directions"], 0.5).stop
            for e in (1, 2)] == [False, True]
    assert len(history["epochs"]) == 2  # it stopped at the first epoch the rule held
    log = os.path.join(stopped, "log.jsonl")
    events = [r for r in read_log(log) if r.get("event") == "stopped"]
    assert len(events) == 1 and events[0]["epochs_done"] == 2 and events[0]["stable_epochs"] == 1
    assert events[0]["path_steps"] == epoch_records(log)[2]["path_steps"] == 2 * per_epoch_path_steps(RUN, stopped)
    assert len(events[0]["margins"]) == 2 and min(events[0]["margins"]) >= 0
    # the folder reads as finished: resuming with the same settings trains nothing and logs no epoch
    assert main(RUN + STOP + ["--out", stopped, "--resume"]) == 0
    assert checkpoint.load(os.path.join(stopped, "last.pt"))["loop"]["epoch"] == 2 and max(epoch_records(log)) == 2
    # a larger patience continues as if it had never stopped
    assert main(RUN + STOP[:1] + ["10"] + STOP[2:] + ["--out", stopped, "--resume"]) == 0
    epochs = json.load(open(os.path.join(stopped, "alphas.json")))["epochs"]
    assert epochs[2]["probs"] != epochs[1]["probs"]  # alpha trained in epoch 3, so equality below means something
    a, b = model_state(stopped), model_state(straight)
    for key in b:  # weights and alpha
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    done, ref = epoch_records(log), epoch_records(os.path.join(straight, "log.jsonl"))
    assert [r["path_steps"] for r in done.values()] == [r["path_steps"] for r in ref.values()]
    assert ref[3]["wall_s"] == pytest.approx(sum(r["epoch_time_s"] for r in ref.values()))


@pytest.mark.parametrize("strategy,paths", [("sampled", 3), ("bilevel", 8 * 2)])
def test_path_steps_count_images_times_layers_times_paths_run(tmp_path, strategy, paths):
    """sampled runs k = 3 paths; bilevel every path twice per step (the weight step's batch and the alpha
    step's held-out batch before it); joint: the test above."""
    argv = SMALL + ["--epochs", "1", "--strategy.name", strategy, "--strategy.k", "3"]
    out = str(tmp_path / strategy)
    assert main(argv + ["--out", out]) == 0
    assert epoch_records(os.path.join(out, "log.jsonl"))[1]["path_steps"] == per_epoch_path_steps(argv, out,
                                                                                                  paths=paths)


def _stop_worker(rank, world, port, out, result_dir):
    from nccl_emulation import join_as_cuda_process
    join_as_cuda_process(rank, world, port)
    torch.set_num_threads(1)
    cfg, out = resolve_config(*parse_args(RUN + STOP + ["--out", out]))
    result = run_search(cfg, out)
    torch.save({"epoch": result["record"]["epoch"], "path_steps": result["record"]["path_steps"]},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_stop_after_the_same_epoch_and_count_both_ranks(tmp_path):
    out, results = str(tmp_path / "ddp"), tmp_path / "ranks"
    results.mkdir()
    _spawn(_stop_worker, (2, _free_port(), out, str(results)))
    r0, r1 = torch.load(results / "rank0.pt"), torch.load(results / "rank1.pt")
    assert r0["epoch"] == r1["epoch"] == 2  # both stopped after epoch 2 of 3
    events = [r for r in read_log(os.path.join(out, "log.jsonl")) if r.get("event") == "stopped"]
    assert [e["epochs_done"] for e in events] == [2]
    assert r0["path_steps"] == r1["path_steps"] == 2 * per_epoch_path_steps(RUN, out, world=2)
