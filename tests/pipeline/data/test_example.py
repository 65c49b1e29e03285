"""The example dataset: rendered by the project, deterministic, valid, and the committed copy
under data/example is exactly what `mcpl data example` (the DVC prepare stage) renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpl.config import TrainConfig
from mcpl.pipeline.data import load_jobs, validate_dataset
from mcpl.pipeline.data.example import write_example
from mcpl.provenance import REPO_ROOT

REPO = REPO_ROOT


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.parquet"}


def test_example_is_deterministic_valid_and_has_a_group(tmp_path, tiny_model):
    rows = write_example(tmp_path / "a")
    write_example(tmp_path / "b")
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert len(rows) == 6 and sum(1 for r in rows if r.get("group")) == 2
    report = validate_dataset(tmp_path / "a", model=tiny_model)
    assert report.ok, report.render()
    jobs = load_jobs(report.manifest, TrainConfig(), tiny_model)
    assert [j.config.strategy for j in jobs] == ["one"] * 4 + ["diverse"]
    assert all(len(m) == 2 for j in jobs for m in j.masks)


@pytest.mark.skipif(not (REPO / "data" / "example" / "rows.jsonl").exists(), reason="no committed example")
def test_committed_example_matches_the_renderer(tmp_path):
    write_example(tmp_path / "fresh")
    assert files(tmp_path / "fresh") == files(REPO / "data" / "example")
