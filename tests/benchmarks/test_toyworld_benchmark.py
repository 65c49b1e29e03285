"""The toy-world benchmark v2: scenes are a pure function of seeds, orders are balanced, and the
--quick smoke run reports every mode with its untrained / true-word rows and intervals."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import toyworld_mcpl as bench  # noqa: E402


def test_scenes_are_a_pure_function_of_mode_index_and_seed():
    a, b = bench.make_scene("bare", 3, 1000), bench.make_scene("bare", 3, 1000)
    assert a.seeds == b.seeds
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.rendered, b.rendered, strict=True))
    other = bench.make_scene("bare", 3, 7000)  # another seed base: another suite of the same layouts
    assert not np.array_equal(other.rendered[0].image, a.rendered[0].image)
    assert bench.scene_layout("bare", 3) == [[(o.colour, o.shape) for o in other.rendered[0].scene.objects]]
    every = [s for m in bench.MODES for i in range(bench.SEED_BLOCK // 4) for s in bench.scene_seeds(m, i)]
    assert max(every) < 5000  # never the sweep's validation scenes
    assert len(set(every)) == len(every)  # no scene is used twice


@pytest.mark.parametrize("mode", ["shuffled", "bare"])
def test_two_object_orders_are_balanced(mode):
    first = collections.Counter(bench.scene_layout(mode, i)[0][0] for i in range(12))
    assert sorted(first.values()) == [3, 3, 3, 3]  # every held-out pair first in half of its 6 scenes
    fixed = collections.Counter(bench.scene_layout("coloured", i)[0][0] for i in range(12))
    assert len(fixed) == 3  # v1's fixed order: yellow square is never first


def test_three_objects_and_diverse_groups():
    positions = collections.Counter((pair, k) for i in range(24)
                                    for k, pair in enumerate(bench.scene_layout("three", i)[0]))
    assert set(positions.values()) == {6}  # each pair in each position equally often
    for i in range(16):
        scene = bench.make_scene("diverse", i)
        shared = scene.concepts[0]
        assert 2 <= len(scene.seeds) <= 3 and [n.count("x") for n in scene.names] == [1] * len(scene.seeds)
        for image, obj in enumerate(shared.objects):
            spec = scene.rendered[image].scene.objects[obj]
            assert (spec.colour, spec.shape) == (shared.colour, shared.shape)
        assert "<x|object|" in scene.sentence(0) and scene.sentence(0, None).count("|object|") == 0


def test_intervals_are_t_intervals_over_scenes():
    iv = bench.interval([0.0, 0.5, 1.0])
    assert iv["mean"] == 0.5 and abs(iv["half"] - 4.30 * 0.5 / 3 ** 0.5) < 1e-3 and iv["n"] == 3


def test_quick_run_reports_every_mode_with_reference_rows_and_intervals(tmp_path):
    out = tmp_path / "quick.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toyworld_mcpl.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert set(report["summary"]) == set(bench.MODES)
    for mode, summary in report["summary"].items():
        rows = set(summary["variants"])
        assert {"untrained", "true", *bench.DEFAULT_VARIANTS[mode]} == rows
        for s in summary["variants"].values():
            assert {"recovery", "shape", "iou", "recovery_gain", "iou_gain"} <= set(s) and "half" in s["recovery"]
    assert "recovery: full - mcpl_one" in report["summary"]["bare"]["differences"]
    assert "recovery: diverse_full - full" in report["summary"]["diverse"]["differences"]
    assert set(report["chance_per_shape"]) == {f"{k}:{c} {s}" for k in ("coloured", "bare")
                                               for c, s in bench._pairs()}
    bare = report["rows"]["bare"][0]["variants"]["mcpl_one"]["concepts"]
    assert sorted(c["object"] for c in bare.values()) == [0, 1]  # words paired with objects one-to-one
    assert (tmp_path / "quick.md").read_text().startswith("Toy-world MCPL benchmark v2")
