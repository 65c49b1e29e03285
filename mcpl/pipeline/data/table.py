"""Read a dataset's table (rows.jsonl or rows.csv) into raw rows, one per data row.

Nothing is dropped: a row that cannot be decoded or parsed still comes back, carrying
its errors, so the report can name it. Row numbers are 1-based data rows as a user
counts them (the CSV header and blank JSONL lines are not rows); `line` is the line of
the file the row starts on.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mcpl.errors import DatasetError

TABLE_NAMES = ("rows.jsonl", "rows.csv")
REQUIRED = ("image", "sentence")
OPTIONAL = ("masks", "group", "overrides", "meta")
COLUMNS = REQUIRED + OPTIONAL
JSON_CELLS = ("masks", "overrides", "meta")  # CSV cells holding JSON
MAX_TABLE_BYTES = 256 * 1024 * 1024  # a table of a million rows is ~200 MB; anything larger is not a table
MAX_JSON_DEPTH = 32  # no column needs more than 3 levels; deep nesting is an attack on the parser
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # (32 before 16: FF FE 00 00)
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
csv.field_size_limit(2**31 - 1)  # the csv module's 128 KiB default would split a long cell into bogus rows;
# our own per-column limits (mcpl.pipeline.data.validate) reject an oversized cell by name instead


class JSONProblem(ValueError):
    """JSON that parses under Python's lenient rules but is not usable data (duplicate keys, NaN, 1e400)."""


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise JSONProblem(f"key(s) {', '.join(map(repr, dupes))} appear more than once in one object")
    return dict(pairs)


def _constant(name: str) -> float:
    raise JSONProblem(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONProblem(f"number {text[:40]} is too large (not a finite double)")
    return value


def parse_json(text: str) -> object:
    """Strict JSON: duplicate keys, NaN/Infinity, overflowing numbers and absurd nesting are errors.

    Raises ValueError with a readable message (json's own errors included).
    """
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)
    except JSONProblem:
        raise
    except json.JSONDecodeError as err:
        raise ValueError(f"{err.msg} at character {err.colno}") from None
    except RecursionError:
        raise JSONProblem(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise JSONProblem(str(err).split(";")[0]) from None
    if too_deep(value):
        raise JSONProblem(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests objects/arrays more than `limit` deep (iterative, stops early)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return False


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
        if Path(table).name != table or table in (".", ".."):
            raise DatasetError(f"--table {table!r} must be a file name inside {root}, not a path")
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
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:
            raise DatasetError(f"table {path} is {size:,} bytes; the limit is {MAX_TABLE_BYTES:,} "
                               "(split the dataset into several folders)")
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read table {path}: {err.strerror or err}") from None
    text = _decode(path, data)
    if path.suffix.lower() == ".jsonl":
        table = Table(path, _jsonl_rows(text))
    elif path.suffix.lower() == ".csv":
        table = _csv_table(path, text)
    else:
        raise DatasetError(f"unknown table type {path.name}: use .jsonl or .csv")
    if not table.rows:
        raise DatasetError(f"table {path} has no data rows")
    return table


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 (a byte-order mark is fine); UTF-16/32 with a byte-order mark too (Excel's "Unicode text").

    Undecodable bytes survive as surrogate escapes, so the rows holding them are named.
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as err:
                raise DatasetError(f"table {path} starts with a {codec.upper()} byte-order mark but is not "
                                   f"valid {codec.upper()} ({err.reason} at byte {err.start}); save it as UTF-8") \
                    from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[3:]  # UTF-8 byte-order mark (Excel writes one)
    head = data[:4096]
    if len(head) >= 4 and head.count(0) * 4 >= len(head):
        raise DatasetError(f"table {path} looks like UTF-16/UTF-32 text without a byte-order mark "
                           "(every other byte is 0); save it as UTF-8")
    return data.decode("utf-8", errors="surrogateescape")


def _lines(text: str) -> list[str]:
    """Lines split at LF, CRLF or a lone CR only (str.splitlines would also split at U+2028, \\x1c, ...,
    which are legal inside a JSON string, and so cut one row into two)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _bad_utf8(text: str) -> str | None:
    match = _BAD_BYTE.search(text)
    if match is None:
        return None
    byte = ord(match.group()) - 0xDC00
    return (f"text is not valid UTF-8 (byte 0x{byte:02x} at character {match.start()}); "
            "save the table as UTF-8")


def _jsonl_rows(text: str) -> list[RawRow]:
    rows: list[RawRow] = []
    for line_no, line in enumerate(_lines(text), start=1):
        line = line.removeprefix("\ufeff")  # a byte-order mark where two files were concatenated
        if not line.strip():
            continue
        raw = RawRow(row=len(rows) + 1, line=line_no, values=None)
        rows.append(raw)
        bad = _bad_utf8(line)
        if bad:
            raw.error("(row)", bad)
            continue
        try:
            value = parse_json(line)
        except ValueError as err:
            raw.error("(row)", f"not valid JSON: {err}")
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
        while not any(h.strip() for h in header) or (header and header[0].startswith("sep=") and len(header) <= 2):
            header = next(reader)  # blank lines, and Excel's "sep=," hint line, before the header
    except StopIteration:
        raise DatasetError(f"table {path} is empty") from None
    except csv.Error as err:
        raise DatasetError(f"cannot parse the header of {path}: {err}") from None
    header = [h.strip() for h in header]
    bad = _bad_utf8(",".join(header))
    if bad:
        header_errors.append(f"header: {bad}")
    unknown = [h for h in header if h not in COLUMNS and h]  # unnamed columns (a trailing comma) must stay empty
    missing = [c for c in REQUIRED if c not in header]
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    if unknown:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
            hint = "; the header looks separated by ';', tab or '|': mcpl reads comma-separated CSV"
        elif any(h.lower() in COLUMNS for h in unknown):
            hint = "; column names are lowercase"
        header_errors.append(f"unknown column(s) {', '.join(repr(h[:60]) for h in unknown[:10])} in the header "
                             f"(allowed: {', '.join(COLUMNS)}){hint}")
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
            message = f"CSV syntax error: {err}"
            if "unexpected end of data" in str(err):
                message = (f"a quoted cell starting on line {line} is never closed: lines {line} to "
                           f"{reader.line_num} were read as one row; close the quote (double a quote inside a cell)")
            raw.error("(row)", message)
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
        for i, (name, cell) in enumerate(zip(header, cells, strict=True), start=1):
            if not name and cell.strip():
                raw.error("(row)", f"cell {i} has a value ({cell[:40]!r}) but its column has no name in the header")
            if name not in COLUMNS or cell.strip() == "":
                continue
            if name in JSON_CELLS:
                try:
                    values[name] = parse_json(cell)
                except ValueError as err:
                    raw.error(name, f"cell is not valid JSON ({err}): {cell[:60]!r}")
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
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raw.error("(row)", f"unknown column(s) {', '.join(repr(k[:60]) for k in unknown[:10])}{more} "
                           f"(allowed: {', '.join(COLUMNS)})")
    for column in REQUIRED:
        if column not in (raw.values or {}):
            raw.error(column, f"missing required column {column!r}")
