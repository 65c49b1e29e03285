"""Hostile tables: encodings, byte-order marks, line endings, blank lines, CSV quoting and
injection, JSON cells, oversized cells and files, tables that are not files.

Each case writes one dataset folder and asserts the exact outcome: the dataset is refused
as a whole (DatasetError, exit 2) with a reason, or every row ends as expected (row
number, line, column, reason) and the manifest is written. Row-level hostile values are in
test_hostile.py.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.hostile import GOOD, pic

from mcpl.pipeline.data import DatasetError, validate_dataset

HEADER = "image,sentence,group,overrides,meta,masks"


def jsonl(*rows: dict | str) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def csv_text(*rows: list[str], header: str = HEADER, newline: str = "\n") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline)
    for r in rows:
        writer.writerow(r)
    return header + newline + buf.getvalue()


@dataclass
class Table:
    """A table case: `build(root)` writes images and returns (file name, bytes) of the table, or None
    when it writes the table itself; then either the dataset is refused (`refused` in the message)
    or `rows` lists every row: (row, line, None for accepted | {column: fragment})."""

    id: str
    build: Callable[[Path], tuple[str, bytes] | None]
    rows: list[tuple[int, int, dict | None]] = field(default_factory=list)
    refused: str | None = None


def two(root: Path) -> tuple[str, str]:
    return pic(root, "images/a.png"), pic(root, "images/b.png")


def good(image: str, **extra) -> dict:
    return {"image": image, "sentence": GOOD, **extra}


def _jsonl(text_fn: Callable[[str, str], str], encoding: str = "utf-8", bom: bytes = b""):
    def build(root):
        a, b = two(root)
        return "rows.jsonl", bom + text_fn(a, b).encode(encoding)
    return build


def _csv(rows_fn: Callable[[str, str], str], encoding: str = "utf-8", bom: bytes = b""):
    def build(root):
        a, b = two(root)
        return "rows.csv", bom + rows_fn(a, b).encode(encoding)
    return build


def _sparse(root):
    a, _ = two(root)
    path = root / "rows.jsonl"
    path.write_text(jsonl(good(a)))
    with open(path, "r+b") as fh:
        fh.truncate(300 * 1024 * 1024)  # sparse: no disk used, but the table claims 300 MB
    return None


def _fifo(root):
    two(root)
    os.mkfifo(root / "rows.jsonl")
    return None


def _folder(root):
    two(root)
    (root / "rows.csv").mkdir()
    return None


def _both(root):
    a, _ = two(root)
    (root / "rows.csv").write_text(csv_text([a, GOOD, "", "", "", ""]))
    (root / "rows.jsonl").write_text(jsonl(good(a)))
    return None


OK2 = [(1, 1, None), (2, 2, None)]
DEEP = "[" * 3000 + "]" * 3000

TABLES = [
    # ---- JSONL: encodings and line endings ----------------------------------------------
    Table("jsonl-crlf", _jsonl(lambda a, b: jsonl(good(a), good(b)).replace("\n", "\r\n")), OK2),
    Table("jsonl-lone-cr", _jsonl(lambda a, b: jsonl(good(a), good(b)).replace("\n", "\r")), OK2),
    Table("jsonl-mixed-endings", _jsonl(lambda a, b: json.dumps(good(a)) + "\r\n" + json.dumps(good(b)) + "\r"), OK2),
    Table("jsonl-utf8-bom", _jsonl(lambda a, b: jsonl(good(a), good(b)), bom=codecs.BOM_UTF8), OK2),
    Table("jsonl-utf16-le-bom", _jsonl(lambda a, b: jsonl(good(a), good(b)), "utf-16-le", codecs.BOM_UTF16_LE), OK2),
    Table("jsonl-utf16-be-bom", _jsonl(lambda a, b: jsonl(good(a), good(b)), "utf-16-be", codecs.BOM_UTF16_BE), OK2),
    Table("jsonl-utf32-bom", _jsonl(lambda a, b: jsonl(good(a), good(b)), "utf-32-le", codecs.BOM_UTF32_LE), OK2),
    Table("jsonl-utf16-no-bom", _jsonl(lambda a, b: jsonl(good(a), good(b)), "utf-16-le"),
          refused="looks like UTF-16/UTF-32 text without a byte-order mark"),
    Table("jsonl-utf16-bom-broken", lambda root: ("rows.jsonl", codecs.BOM_UTF16_LE + b"{\x00\"\x00\x00\xd8"),
          refused="starts with a UTF-16 byte-order mark but is not valid UTF-16"),
    Table("jsonl-latin-1-row", _jsonl(lambda a, b: json.dumps(good(a)) + "\n" + json.dumps(good(b)).replace(
        "a red", "a r\xe9d") + "\n", "latin-1"), [(1, 1, None), (2, 2, {"(row)": "not valid UTF-8 (byte 0xe9"})]),
    Table("jsonl-million-blank-lines", _jsonl(lambda a, b: "\n" * 1_000_000 + json.dumps(good(a)) + "\n" * 5
                                              + " \t \n" + json.dumps(good(b))), [(1, 1_000_001, None),
                                                                                 (2, 1_000_007, None)]),
    Table("jsonl-no-final-newline", _jsonl(lambda a, b: json.dumps(good(a)) + "\n" + json.dumps(good(b))), OK2),
    Table("jsonl-raw-nul", _jsonl(lambda a, b: json.dumps(good(a)) + "\n" + json.dumps(good(b)).replace(
        "a red", "a\x00red") + "\n"), [(1, 1, None), (2, 2, {"(row)": "Invalid control character"})]),
    Table("jsonl-line-separators-in-strings", _jsonl(lambda a, b: json.dumps(good(a), ensure_ascii=False).replace(
        "a red", "a\u2028red") + "\n" + json.dumps(good(b)) + "\n"),
        [(1, 1, {"sentence": "line separator U+2028"}), (2, 2, None)]),
    Table("jsonl-form-feed-and-vt-between-rows", _jsonl(lambda a, b: json.dumps(good(a)) + "\x0c\n\x0b\n"
                                                        + json.dumps(good(b)) + "\n"),
          [(1, 1, {"(row)": "not valid JSON"}), (2, 3, None)]),  # a lone \v line is blank
    Table("jsonl-empty", lambda root: ("rows.jsonl", b""), refused="has no data rows"),
    Table("jsonl-only-blank-lines", lambda root: ("rows.jsonl", b"\n \n\t\n\r\n"), refused="has no data rows"),
    Table("jsonl-huge-sparse", _sparse, refused="the limit is 268,435,456"),
    Table("table-is-a-fifo", _fifo, refused="no table in"),
    Table("table-is-a-folder", _folder, refused="no table in"),
    Table("two-tables", _both, refused="both rows.jsonl and rows.csv"),
    # ---- CSV: header ----------------------------------------------------------------------
    Table("csv-bom", _csv(lambda a, b: csv_text([a, GOOD, "", "", "", ""], [b, GOOD, "", "", "", ""]),
                          bom=codecs.BOM_UTF8), [(1, 2, None), (2, 3, None)]),
    Table("csv-utf16-bom", _csv(lambda a, b: csv_text([a, GOOD, "", "", "", ""], [b, GOOD, "", "", "", ""]),
                                "utf-16-le", codecs.BOM_UTF16_LE), [(1, 2, None), (2, 3, None)]),
    Table("csv-quoted-header", _csv(lambda a, b: csv_text([a, GOOD], header='"image","sentence"')), [(1, 2, None)]),
    Table("csv-blank-lines-before-header", _csv(lambda a, b: "\n\n" + csv_text([a, GOOD, "", "", "", ""])),
          [(1, 4, None)]),
    Table("csv-excel-sep-line", _csv(lambda a, b: "sep=,\n" + csv_text([a, GOOD, "", "", "", ""])), [(1, 3, None)]),
    Table("csv-duplicate-column", _csv(lambda a, b: csv_text([a, GOOD, a], header="image,sentence,image")),
          [(1, 2, {"(header)": "'image' appear more than once"})]),
    Table("csv-semicolons", _csv(lambda a, b: f"image;sentence\n{a};{GOOD}\n"),
          [(1, 2, {"(header)": "looks separated by ';'"})]),
    Table("csv-uppercase-header", _csv(lambda a, b: csv_text([a, GOOD], header="Image,Sentence")),
          [(1, 2, {"(header)": "column names are lowercase"})]),
    Table("csv-header-only", _csv(lambda a, b: HEADER + "\n"), refused="has no data rows"),
    Table("csv-trailing-comma", _csv(lambda a, b: f"image,sentence,\n{a},{GOOD},\n{b},{GOOD},oops\n"),
          [(1, 2, None), (2, 3, {"(row)": "cell 3 has a value ('oops') but its column has no name"})]),
    # ---- CSV: quoting, line endings, cells ------------------------------------------------
    Table("csv-crlf", _csv(lambda a, b: csv_text([a, GOOD, "", "", "", ""], [b, GOOD, "", "", "", ""],
                                                 newline="\r\n")), [(1, 2, None), (2, 3, None)]),
    Table("csv-lone-cr", _csv(lambda a, b: csv_text([a, GOOD, "", "", "", ""], [b, GOOD, "", "", "", ""],
                                                    newline="\r")), [(1, 2, None), (2, 3, None)]),
    Table("csv-embedded-newline", _csv(lambda a, b: csv_text([a, GOOD.replace(" and", "\nand"), "", "", "", ""],
                                                             [b, GOOD, "", "", "", ""])),
          [(1, 2, {"sentence": "U+000A LINE FEED"}), (2, 4, None)]),
    Table("csv-unterminated-quote", _csv(lambda a, b: f'{HEADER}\n{a},{GOOD},,,,\n{b},"{GOOD},,,,\n{a},x,,,,\n'),
          [(1, 2, None), (2, 3, {"(row)": "a quoted cell starting on line 3 is never closed"})]),
    Table("csv-stray-quote", _csv(lambda a, b: f'{HEADER}\n{a},{GOOD},,,,\n{b},"a" <c1>,,,,\n'),
          [(1, 2, None), (2, 3, {"(row)": "CSV syntax error"})]),
    Table("csv-extra-cells", _csv(lambda a, b: f"{HEADER}\n{a},{GOOD},,,,\n{b},a, b <c1>,,,,\n"),
          [(1, 2, None), (2, 3, {"(row)": "7 cells but the header has 6 columns"})]),
    Table("csv-raw-nul", _csv(lambda a, b: csv_text([a, GOOD, "", "", "", ""], [b + "\x00.png", GOOD, "", "", "", ""])),
          [(1, 2, None), (2, 3, {"image": "control character U+0000"})]),
    Table("csv-latin-1-cell", _csv(lambda a, b: csv_text([a, GOOD, "", "", "", ""], [b, "a caf\xe9 <c1>", "", "", "",
                                                                                  ""]), "latin-1"),
          [(1, 2, None), (2, 3, {"(row)": "not valid UTF-8 (byte 0xe9"})]),
    Table("csv-whitespace-row", _csv(lambda a, b: f"{HEADER}\n{a},{GOOD},,,,\n  , ,,,,\n{b},{GOOD},,,,\n"),
          [(1, 2, None), (2, 4, None)]),
    Table("csv-formula-injection", _csv(lambda a, b: csv_text(
        [a, "=cmd|' /C calc'!A0", "", "", "", ""], ["=HYPERLINK(\"http://evil\")", GOOD, "", "", "", ""],
        [b, GOOD, "@SUM(A1)", "", "", ""], [a, "-2+3 <c1>", "", "", "", ""])),
        [(1, 2, {"sentence": "a spreadsheet formula"}), (2, 3, {"image": "a spreadsheet formula"}),
         (3, 4, {"group": "a spreadsheet formula"}), (4, 5, {"sentence": "a spreadsheet formula"})]),
    Table("csv-json-cells", _csv(lambda a, b: csv_text(
        [a, GOOD, "", '{"steps": 5, "steps": 6}', "", ""], [b, GOOD, "", '{"learning_rate": NaN}', "", ""],
        [a, GOOD, "", "", DEEP, ""], [b, GOOD, "", "steps=5", "", ""], [a, GOOD, "", "", "", "masks/x.png"])),
        [(1, 2, {"overrides": "key(s) 'steps' appear more than once"}),
         (2, 3, {"overrides": "NaN is not a JSON number"}),
         (3, 4, {"meta": "nested more than 32 levels deep"}),
         (4, 5, {"overrides": "cell is not valid JSON"}),
         (5, 6, {"masks": "cell is not valid JSON"})]),
    Table("csv-200k-cells", _csv(lambda a, b: csv_text(
        [a, GOOD, "", "", json.dumps({"x": "y" * 200_000}), ""], [b, GOOD + " and" * 50_000, "", "", "", ""],
        [a, GOOD, "g" * 200_000, "", "", ""], ["x" * 200_000, GOOD, "", "", "", ""])),
        [(1, 2, {"meta": "the limit is 65,536"}), (2, 3, {"sentence": "the limit is 1,000"}),
         (3, 4, {"group": "the limit is 100"}), (4, 5, {"image": "the limit is 1,024"})]),
]


@pytest.mark.parametrize("case", TABLES, ids=[t.id for t in TABLES])
def test_table(tmp_path, tiny_model, case):
    root = tmp_path / "dataset"
    root.mkdir()
    built = case.build(root)
    if built is not None:
        name, data = built
        (root / name).write_bytes(data)
    if case.refused:
        with pytest.raises(DatasetError, match=None) as err:
            validate_dataset(root, model=tiny_model)
        assert case.refused in str(err.value), str(err.value)
        assert not (root / "manifest.parquet").exists()
        return
    report = validate_dataset(root, model=tiny_model)
    assert report.manifest.is_file()
    got = [(r.row, r.line) for r in report.rows]
    assert got == [(n, line) for n, line, _ in case.rows], got
    for (n, _, expected), r in zip(case.rows, report.rows, strict=True):
        if expected is None:
            assert r.ok, (n, r.errors)
            continue
        assert {c for c, _ in r.errors} == set(expected), (n, r.errors)
        for column, fragment in expected.items():
            assert any(c == column and fragment in m for c, m in r.errors), (n, r.errors)
    text = report.render()
    assert all(ch == "\n" or ch.isprintable() or ch == " " for ch in text)


def test_cli_exit_codes_for_a_refused_table(tmp_path, tiny_model, capsys):
    """A table that cannot be read at all: exit 2, one `error:` line, no traceback, no manifest."""
    from mcpl.cli import main

    (tmp_path / "rows.jsonl").write_bytes("{}\n".encode("utf-16-le"))
    assert main(["data", "validate", str(tmp_path), "--model", tiny_model]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "UTF-16" in err and "Traceback" not in err
    assert not (tmp_path / "manifest.parquet").exists()


def test_table_option_and_pixel_limit_cannot_point_elsewhere(tmp_path, tiny_model, capsys):
    from mcpl.cli import main

    (tmp_path / "outside.jsonl").write_text("{}\n")
    root = tmp_path / "dataset"
    root.mkdir()
    assert main(["data", "validate", str(root), "--table", "../outside.jsonl", "--model", tiny_model]) == 2
    assert "must be a file name inside" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["data", "validate", str(root), "--max-pixels", "-5"])
    assert exit_.value.code == 2 and "expected a positive number of pixels" in capsys.readouterr().err


def test_a_corrupt_manifest_is_an_error_not_a_traceback(tmp_path, tiny_model, capsys):
    from mcpl.cli import main

    (tmp_path / "manifest.parquet").write_bytes(b"not parquet")
    assert main(["batch", "--manifest", str(tmp_path / "manifest.parquet"), "--out", str(tmp_path / "out"),
                 "--model", tiny_model]) == 2
    err = capsys.readouterr().err
    assert "is not a readable manifest" in err and "Traceback" not in err
