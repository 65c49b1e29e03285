"""Builders for dataset tests: small images, masks and tables written into a temp folder."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image

from mcpl.config import TrainConfig
from mcpl.pipeline.data import load_jobs

SENTENCE = "a red <c1|object|red> and a blue <c2|thing|blue>"
BOX1, BOX2 = (2, 2, 14, 14), (18, 18, 30, 30)


def scene(size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    img.paste((255, 0, 0), BOX1)
    img.paste((0, 0, 255), BOX2)
    return img


def mask(box, size: int = 32) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, box)
    return m


def add_good_files(root: Path, stem: str = "good") -> dict:
    """Write images/<stem>.png with its two masks; return its table row."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    scene().save(root / "images" / f"{stem}.png")
    mask(BOX1).save(root / "masks" / f"{stem}_c1.png")
    mask(BOX2).save(root / "masks" / f"{stem}_c2.png")
    return {"image": f"images/{stem}.png", "sentence": SENTENCE,
            "masks": {"<c1>": f"masks/{stem}_c1.png", "<c2>": f"masks/{stem}_c2.png"}}


def write_jsonl(root: Path, rows: list[dict | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_csv(root: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path = root / "rows.csv"
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def csv_cells(row: dict, header: list[str]) -> list[str]:
    return [json.dumps(row[h]) if isinstance(row.get(h), dict) else str(row.get(h, "")) for h in header]


def row_of(report, n: int):
    return next(r for r in report.rows if r.row == n)


def assert_rejected(report, n: int, column: str, fragment: str) -> None:
    """Row n is rejected for `column` with `fragment` in the reason, in the result and the printed table."""
    r = row_of(report, n)
    assert r.status == "rejected", (n, r.errors)
    assert any(c == column and fragment in m for c, m in r.errors), r.errors
    lines = [line.split(None, 3) for line in report.render().splitlines()]
    assert any(len(p) == 4 and p[0] == str(n) and p[2] == column and fragment in p[3] for p in lines), \
        report.render()


def assert_good_row_is_a_job(report, model: str, row: int = 1) -> None:
    """The valid row of a table with bad rows still becomes a job."""
    assert row_of(report, row).ok, row_of(report, row).errors
    jobs = load_jobs(report.manifest, TrainConfig(steps=2), model)
    assert any(row in j.rows for j in jobs)
