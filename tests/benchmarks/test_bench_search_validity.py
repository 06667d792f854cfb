"""The search-validity benchmark: its expected sets against the scan-order contract, and the small version
(one task, one strategy) end to end on real PNG files, checking the recovered set and the premise."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from nas.ops import DIRECTIONS, scan_order  # noqa: E402
from validity_tasks import COLOURS, TASKS, expected_directions  # noqa: E402

REACH = 3  # LocalVimMixer's causal conv1d has width 4: it hands the 3 steps before a token to it


def carriers_by_scan_order(cells, grid):
    """Directions that scan every cell of R before position n // 2 (where the class token goes) and one of
    them among the last REACH positions before it: read from ``scan_order`` itself, padding included."""
    out = []
    for d in DIRECTIONS:
        order = scan_order(d, grid, grid).tolist()
        positions = [order.index(r * grid + c) for r, c in cells]
        if all(p < grid * grid // 2 for p in positions) and any(p >= grid * grid // 2 - REACH for p in positions):
            out.append(d)
    return out


def test_expected_sets_follow_the_scan_orders():
    sets = [expected_directions(t.cells, t.grid, REACH) for t in TASKS]
    assert sets == [carriers_by_scan_order(t.cells, t.grid) for t in TASKS]
    assert sorted(len(s) for s in sets) == [3, 3, 4]
    assert len({tuple(s) for s in sets}) == len(TASKS)  # every task asks for another set


def test_partial_or_distant_regions_are_refused():
    with pytest.raises(ValueError, match=r"h sees 1 of the 2 tokens of R"):
        expected_directions(((2, 3), (3, 2)), 6, REACH)  # two tokens that different directions see
    with pytest.raises(ValueError, match=r"no token of R lies in its last 3 steps"):
        expected_directions(((0, 0),), 6, REACH)  # seen by h, but 18 steps before the class token


def test_one_task_one_strategy(tmp_path):
    task = next(t for t in TASKS if t.grid == 4)
    out = tmp_path / "record.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_search_validity.py"), "--tasks", task.name,
                           "--strategies", "joint", "--search-seeds", "0", "--retrain-seeds", "0",
                           "--train-per-class", "64", "--val-per-class", "32", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted((tmp_path / "work" / task.name / "data" / "train").glob("*/*.png"))  # what the search read
    assert len(images) == 64 * len(COLOURS)
    with Image.open(images[0]) as img:
        assert img.size == (task.img_size, task.img_size) and img.mode == "RGB"

    record = json.loads(out.read_text())
    assert record["environment"]["torch"] and record["settings"]["conv_reach"] == REACH
    (result,) = record["tasks"]
    expected = expected_directions(task.cells, task.grid, REACH)
    assert result["expected"] == expected
    (search,) = result["searches"]
    probs = dict(zip(DIRECTIONS, search["probs"]))
    assert sum(probs.values()) == pytest.approx(1.0)
    ranked = sorted(DIRECTIONS, key=lambda d: -probs[d])
    assert set(ranked[:len(expected)]) == set(expected) and search["recovered"]
    assert search["mass_on_expected"] == pytest.approx(sum(probs[d] for d in expected))
    assert search["mass_on_expected"] > len(expected) / len(DIRECTIONS) + 0.05  # moved away from uniform
    assert search["top4"] == [d for d in DIRECTIONS if d in ranked[:4]]

    runs = {c["name"]: c["runs"] for c in result["candidates"]}
    assert [r["directions"] for r in runs["searched (joint)"]] == [search["top4"]]
    assert runs["expected"][0]["val_top1"] >= 95.0  # the premise: E carries the label ...
    assert runs["complement"][0]["val_top1"] <= result["chance_top1"] + 15.0  # ... and nothing else does
    assert runs["complement"][0]["carriers"] == 0 and runs["expected"][0]["carriers"] == len(expected)
