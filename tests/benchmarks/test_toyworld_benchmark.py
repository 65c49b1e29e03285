"""The toy-world benchmark scripts still run end to end (tiny settings; the numbers are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toyworld_mcpl.py"), "--scenes", "1", "--steps", "2",
                    "--images", "1", "--sample-steps", "2", "--workers", "1", "--out", str(out), *extra],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_toyworld_benchmark_reports_every_variant_the_oracle_and_the_targets(tmp_path):
    report = run_benchmark(tmp_path / "coloured.json")
    assert set(report["summary"]) == {"separate", "mcpl_all", "mcpl_one", "attn_mask", "prompt_cl", "bind_adj",
                                      "oracle"}
    assert report["lr"] == 3e-3  # the toy model's hint
    assert "full_recovery>=0.9" in report["targets"]["met"]
    assert (tmp_path / "coloured.png").exists() and (tmp_path / "coloured.md").read_text().startswith("| variant")
    concepts = report["rows"][0]["variants"]["bind_adj"]["concepts"]
    assert [c["object"] for c in concepts.values()] == [0, 1]  # coloured: the sentence binds word k to object k


@pytest.mark.slow
def test_bare_sentences_pair_words_with_objects_one_to_one(tmp_path):
    report = run_benchmark(tmp_path / "bare.json", "--sentence", "bare")
    assert "bind_adj" not in report["summary"]  # no adjective to bind
    for variant in report["rows"][0]["variants"].values():
        assert sorted(c["object"] for c in variant["concepts"].values()) == [0, 1]
