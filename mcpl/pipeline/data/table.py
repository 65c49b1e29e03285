"""Read a dataset's table (rows.jsonl or rows.csv) into raw rows, one per data row.

Nothing is dropped: a row that cannot be decoded or parsed still comes back, carrying
its errors, so the report can name it. Row numbers are 1-based data rows as a user
counts them (the CSV header and blank JSONL lines are not rows); `line` is the line of
the file the row starts on.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mcpl.errors import DatasetError

TABLE_NAMES = ("rows.jsonl", "rows.csv")
REQUIRED = ("image", "sentence")
OPTIONAL = ("masks", "group", "overrides", "meta")
COLUMNS = REQUIRED + OPTIONAL
JSON_CELLS = ("masks", "overrides", "meta")  # CSV cells holding JSON
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes


@dataclass
class RawRow:
    """One data row before validation: its values (None if unparsable) and errors so far."""

    row: int
    line: int
    values: dict[str, object] | None
    errors: list[tuple[str, str]] = field(default_factory=list)  # (column, message)

    def error(self, column: str, message: str) -> None:
        self.errors.append((column, message))


@dataclass
class Table:
    path: Path
    rows: list[RawRow]
    header_errors: list[str] = field(default_factory=list)


def find_table(root: Path, table: str | None = None) -> Path:
    """The table file of a dataset folder: `table` if given, else rows.jsonl or rows.csv."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    if table:
        path = root / table
        if not path.is_file():
            raise DatasetError(f"table {path} not found")
        return path
    found = [root / n for n in TABLE_NAMES if (root / n).is_file()]
    if not found:
        raise DatasetError(f"no table in {root}: expected rows.jsonl or rows.csv (see docs/DATA.md)")
    if len(found) > 1:
        raise DatasetError(f"both rows.jsonl and rows.csv in {root}: keep one table per dataset")
    return found[0]


def read_table(path: Path) -> Table:
    """Parse a .jsonl or .csv table; per-row decoding and shape problems become row errors."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read table {path}: {err}") from err
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # UTF-8 byte-order mark (Excel writes one)
    text = data.decode("utf-8", errors="surrogateescape")
    if path.suffix.lower() == ".jsonl":
        table = Table(path, _jsonl_rows(text))
    elif path.suffix.lower() == ".csv":
        table = _csv_table(path, text)
    else:
        raise DatasetError(f"unknown table type {path.name}: use .jsonl or .csv")
    if not table.rows:
        raise DatasetError(f"table {path} has no data rows")
    return table


def _bad_utf8(text: str) -> str | None:
    match = _BAD_BYTE.search(text)
    if match is None:
        return None
    byte = ord(match.group()) - 0xDC00
    return (f"text is not valid UTF-8 (byte 0x{byte:02x} at character {match.start()}); "
            "save the table as UTF-8")


def _jsonl_rows(text: str) -> list[RawRow]:
    rows: list[RawRow] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        raw = RawRow(row=len(rows) + 1, line=line_no, values=None)
        rows.append(raw)
        bad = _bad_utf8(line)
        if bad:
            raw.error("(row)", bad)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raw.error("(row)", f"not valid JSON: {err.msg} at character {err.colno}")
            continue
        if not isinstance(value, dict):
            raw.error("(row)", f"expected a JSON object per line, got {type(value).__name__}")
            continue
        raw.values = {k: v for k, v in value.items() if v is not None}
        _check_columns(raw, list(value))
    return rows


def _csv_table(path: Path, text: str) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header_errors: list[str] = []
    rows: list[RawRow] = []
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"table {path} is empty") from None
    except csv.Error as err:
        raise DatasetError(f"cannot parse the header of {path}: {err}") from err
    header = [h.strip() for h in header]
    bad = _bad_utf8(",".join(header))
    if bad:
        header_errors.append(f"header: {bad}")
    unknown = [h for h in header if h not in COLUMNS]
    missing = [c for c in REQUIRED if c not in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if unknown:
        header_errors.append(f"unknown column(s) {', '.join(map(repr, unknown))} in the header "
                             f"(allowed: {', '.join(COLUMNS)})")
    if missing:
        header_errors.append(f"missing required column(s) {', '.join(map(repr, missing))} in the header")
    if dupes:
        header_errors.append(f"column(s) {', '.join(map(repr, dupes))} appear more than once in the header")
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raw = RawRow(row=len(rows) + 1, line=line, values=None)
            raw.error("(row)", f"CSV syntax error: {err}")
            rows.append(raw)
            continue
        if not any(c.strip() for c in cells):
            continue  # blank line
        raw = RawRow(row=len(rows) + 1, line=line, values=None)
        rows.append(raw)
        for message in header_errors:
            raw.error("(header)", message)
        bad = _bad_utf8(",".join(cells))
        if bad:
            raw.error("(row)", bad)
            continue
        if len(cells) != len(header):
            raw.error("(row)", f"{len(cells)} cells but the header has {len(header)} columns "
                               f"({', '.join(header)}); quote cells that contain commas")
            continue
        values: dict[str, object] = {}
        for name, cell in zip(header, cells, strict=True):
            if name not in COLUMNS or cell.strip() == "":
                continue
            if name in JSON_CELLS:
                try:
                    values[name] = json.loads(cell)
                except json.JSONDecodeError as err:
                    raw.error(name, f"cell is not valid JSON ({err.msg}): {cell[:60]!r}")
            else:
                values[name] = cell.strip() if name != "sentence" else cell
        raw.values = values
        for column in REQUIRED:
            if column in header and column not in values:
                raw.error(column, f"required column {column!r} is empty")
    return Table(path, rows, header_errors)


def _check_columns(raw: RawRow, keys: list[str]) -> None:
    unknown = [k for k in keys if k not in COLUMNS]
    if unknown:
        raw.error("(row)", f"unknown column(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(COLUMNS)})")
    for column in REQUIRED:
        if column not in (raw.values or {}):
            raw.error(column, f"missing required column {column!r}")
