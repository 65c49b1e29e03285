"""Validate a dataset folder row by row and write its manifest (parquet, explicit schema).

Every table row gets one manifest row: what was read, what was learned about its files,
and a status with the reasons it was rejected. Valid rows are grouped into jobs (one
image, or one MCPL-diverse group) under a content key; `mcpl.pipeline.data.jobs.load_jobs` turns
those into `JobSpec`s with the final job ids (content + config + model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from mcpl.config import TrainConfig
from mcpl.job.bundle import portable_path
from mcpl.method.inputs import image_hash
from mcpl.method.prompts import (
    Sentence,
    SentenceError,
    check_against_vocab,
    parse_sentence,
    plan_prompts,
    shown,
    text_problem,
    visible,
)
from mcpl.pipeline.data.files import (
    DEFAULT_MAX_PIXELS,
    FileCheckError,
    check_path_text,
    load_image,
    load_mask,
    mask_pixels,
)
from mcpl.pipeline.data.table import DatasetError, RawRow, find_table, read_table

MANIFEST_NAME = "manifest.parquet"
MANIFEST_VERSION = "1"
MAX_GROUP_CHARS = 100  # a group name becomes part of registry names and file names
MAX_JSON_CHARS = 65_536  # `meta` / `overrides` as JSON text: they are kept in every manifest row
MAX_MASKS = 64  # one per placeholder; a sentence within the token limit has far fewer
MAX_ASPECT = 2.0  # training sees the centred square: a wider image loses more than half of itself
# A cell starting with one of these is a formula in Excel / LibreOffice / Sheets (CSV injection):
# no sentence, name or path of ours starts like that, so such a cell is refused, never stored.
FORMULA_START = ("=", "+", "-", "@")

_ERROR = pa.struct([("column", pa.string()), ("message", pa.string())])
_MASK = pa.struct([("token", pa.string()), ("path", pa.string())])
_CONCEPT = pa.struct([("token", pa.string()), ("name", pa.string()), ("initializer", pa.string()),
                      ("adjective", pa.string())])
MANIFEST_SCHEMA = pa.schema([
    pa.field("row", pa.int32(), nullable=False),        # 1-based data row, as users count them
    pa.field("line", pa.int32(), nullable=False),       # line of the table file the row starts on
    pa.field("status", pa.string(), nullable=False),    # "ok" | "rejected"
    pa.field("error", pa.string()),                     # every reason, "; "-joined (null when ok)
    pa.field("errors", pa.list_(_ERROR)),               # the same, as (column, message)
    pa.field("warnings", pa.list_(pa.string())),
    pa.field("image", pa.string()),                     # path relative to the dataset folder
    pa.field("sentence", pa.string()),
    pa.field("masks", pa.list_(_MASK)),                 # placeholder token -> relative mask path
    pa.field("group", pa.string()),
    pa.field("overrides", pa.string()),                 # JSON object of TrainConfig fields
    pa.field("meta", pa.string()),                      # JSON, kept as given
    pa.field("concepts", pa.list_(_CONCEPT)),
    pa.field("image_hash", pa.string()),                # hash of the decoded RGB pixels (mcpl.method.images)
    pa.field("file_bytes", pa.int64()),
    pa.field("format", pa.string()),
    pa.field("mode", pa.string()),                      # the file's mode before conversion to RGB
    pa.field("width", pa.int32()),                      # after EXIF orientation
    pa.field("height", pa.int32()),
    pa.field("converted", pa.list_(pa.string())),       # conversions applied (mode, EXIF, alpha)
    pa.field("job_key", pa.string()),                   # content key of the row's job (null if rejected)
])


@dataclass
class RowResult:
    """One table row after validation (one manifest row)."""

    row: int
    line: int
    image: str | None = None
    sentence: str | None = None
    masks: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    overrides: dict = field(default_factory=dict)
    meta: object = None
    concepts: list[dict] = field(default_factory=list)
    image_hash: str | None = None
    file_bytes: int | None = None
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    converted: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    job_key: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def status(self) -> str:
        return "ok" if self.ok else "rejected"

    @property
    def error(self) -> str | None:
        return "; ".join(f"{c}: {m}" for c, m in self.errors) if self.errors else None

    def reject(self, column: str, message: str) -> None:
        self.errors.append((column, message))

    def to_record(self) -> dict:
        """The manifest row. Text is stored as given, except what UTF-8 cannot hold (lone surrogates),
        which is escaped: a hostile value must never stop the manifest from being written."""
        s = _storable
        return {
            "row": self.row, "line": self.line, "status": self.status, "error": s(self.error),
            "errors": [{"column": s(c), "message": s(m)} for c, m in self.errors],
            "warnings": [s(w) for w in self.warnings],
            "image": s(self.image), "sentence": s(self.sentence),
            "masks": [{"token": t, "path": s(p)} for t, p in self.masks.items()], "group": s(self.group),
            "overrides": json.dumps(self.overrides, sort_keys=True),
            "meta": None if self.meta is None else json.dumps(self.meta, sort_keys=True),
            "concepts": self.concepts, "image_hash": self.image_hash, "file_bytes": self.file_bytes,
            "format": self.format, "mode": self.mode, "width": self.width, "height": self.height,
            "converted": self.converted, "job_key": self.job_key if self.ok else None,
        }


def _storable(text: str | None) -> str | None:
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class ValidationReport:
    """The outcome of validating one dataset: every row, and where the manifest went."""

    root: Path
    table: Path
    manifest: Path | None
    model: str
    rows: list[RowResult]
    header_errors: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> list[RowResult]:
        return [r for r in self.rows if not r.ok]

    @property
    def valid(self) -> list[RowResult]:
        return [r for r in self.rows if r.ok]

    @property
    def ok(self) -> bool:
        return not self.rejected

    @property
    def job_keys(self) -> list[str]:
        return list(dict.fromkeys(r.job_key for r in self.valid if r.job_key))

    def render(self) -> str:
        """A readable summary: counts, then one line per rejection reason, then warnings.

        Safe to print: every non-printable character of user text is escaped (`visible`).
        """
        return "\n".join(visible(line) for line in self._lines())

    def _lines(self) -> list[str]:
        lines = [f"dataset {self.root} ({self.table.name}): {len(self.rows)} row(s), {len(self.valid)} valid, "
                 f"{len(self.rejected)} rejected -> {len(self.job_keys)} job(s)"]
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        if self.header_errors:
            lines.append("table header problems (every row is rejected until they are fixed):")
            lines += [f"  {e}" for e in self.header_errors]
        if self.rejected:
            lines.append("rejected rows:")
            width = max(len("column"), *(len(c) for r in self.rejected for c, _ in r.errors))
            lines.append(f"  {'row':>5} {'line':>5}  {'column':<{width}}  reason")
            for r in self.rejected:
                shown = [(c, m) for c, m in r.errors if c != "(header)"] or r.errors[:1]
                for column, message in shown:
                    lines.append(f"  {r.row:>5} {r.line:>5}  {column:<{width}}  {message}")
        warned = [r for r in self.rows if r.warnings]
        if warned:
            lines.append("warnings:")
            lines += [f"  row {r.row}: {w}" for r in warned for w in r.warnings]
        return lines

    def __str__(self) -> str:
        return self.render()


class Vocabulary:
    """The base model's tokenizer, for the checks that need it (no other model part is loaded)."""

    def __init__(self, model: str):
        from transformers import AutoTokenizer  # the primary tokenizer of any family (CLIP, or LDM's BERT)

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot load the tokenizer of model {model!r}: {err}") from err
        self.vocab = self.tokenizer.get_vocab()
        self.limit = min(int(self.tokenizer.model_max_length), 77)  # LDM's pipeline reads 77 tokens

    @lru_cache(maxsize=4096)  # noqa: B019 - one instance per validation; words repeat
    def ids(self, word: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(word, add_special_tokens=False).input_ids)

    def check(self, sentence: Sentence, strategy: str, num_vectors: int) -> tuple[list[str], list[str]]:
        """(errors, warnings) for placeholders, initializers and prompt length."""
        errors, warnings = [], []
        try:
            check_against_vocab([sentence], self.vocab)
        except SentenceError as err:
            errors.append(f"{err}; rename the placeholder")
        unk = self.tokenizer.unk_token_id
        for word in dict.fromkeys(sentence.words):
            ids = self.ids(word)
            if not ids or (unk is not None and unk in ids and word not in self.vocab):
                codes = " ".join(f"U+{ord(ch):04X}" for ch in word[:8])
                errors.append(f"the word {shown(word)} ({codes}) cannot be written with the model's tokenizer "
                              f"(it would become {self.tokenizer.unk_token or 'nothing'}); remove or replace it")
        for c in sentence.concepts:
            ids = self.ids(c.initializer)
            unk = self.tokenizer.unk_token_id
            if not ids or (unk is not None and unk in ids and c.initializer not in self.vocab):
                errors.append(f"initializer word {c.initializer!r} of {c.token} is not known to the tokenizer")
            elif len(ids) > 1:
                pieces = self.tokenizer.convert_ids_to_tokens(list(ids))
                warnings.append(f"initializer {c.initializer!r} of {c.token} splits into {pieces}; "
                                "their embeddings are averaged")
        plan = plan_prompts([sentence], strategy, num_vectors, use_templates=False)
        learned = {t.token for t in plan.tokens}
        length = 2 + sum(num_vectors if w in learned else len(self.ids(w)) for w in plan.cores[0])
        if length > self.limit:
            errors.append(f"the sentence is {length} tokens long but the model reads at most {self.limit}; "
                          "shorten it")
        return errors, warnings


def validate_dataset(root: str | Path, manifest_path: str | Path | None = None, model: str | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, *, table: str | None = None,
                     write: bool = True) -> ValidationReport:
    """Check every row of the dataset at `root`; write the manifest; return the report.

    Raises DatasetError only when the dataset as a whole is unusable (no table, no rows,
    tokenizer cannot load). Row problems never raise: they are in `report.rejected`.
    """
    root = Path(root)
    table_path = find_table(root, table)
    parsed = read_table(table_path)
    if not model:
        from mcpl.method.model_files import default_model

        model = default_model()
    vocab = Vocabulary(model)
    results = [check_row(raw, root, vocab, max_pixels) for raw in parsed.rows]
    _check_duplicates(results)
    _check_groups(results)
    _assign_job_keys(results)
    manifest = Path(manifest_path) if manifest_path else root / MANIFEST_NAME
    report = ValidationReport(root, table_path, manifest if write else None, model, results, parsed.header_errors)
    if write:
        write_manifest(report, manifest, max_pixels)
    return report


# ------------------------------------------------------------------------------- rows
def check_row(raw: RawRow, root: Path, vocab: Vocabulary, max_pixels: int) -> RowResult:
    """One table row, checked column by column; never raises.

    This is a boundary: a row must not stop the table. Each column's check runs on its
    own, and an unexpected exception in one becomes that column's error (with its type),
    so the manifest is still written and every other row and column is still checked.
    """
    r = RowResult(row=raw.row, line=raw.line, errors=list(raw.errors))
    values = raw.values
    if values is None:
        return r
    r.image = _text(values.get("image"))
    r.sentence = _text(values.get("sentence"))
    _guard(r, "meta", _check_meta, r, values.get("meta"))
    _guard(r, "group", _check_group, r, values.get("group"))
    strategy, num_vectors = _guard(r, "overrides", _check_overrides, r, values.get("overrides")) or ("one", 1)
    image = _guard(r, "image", _check_image, r, root, values.get("image"), max_pixels)
    sentence = _guard(r, "sentence", _check_sentence, r, vocab, values.get("sentence"), strategy, num_vectors)
    _guard(r, "masks", _check_masks, r, root, values.get("masks"), sentence, image, max_pixels)
    return r


def _guard(r: RowResult, column: str, check, *args):
    """Run one column's check; an exception it did not expect becomes that column's error."""
    try:
        return check(*args)
    except (MemoryError, RecursionError) as err:
        r.reject(column, f"the value is too large or too deeply nested to check ({type(err).__name__})")
    except Exception as err:  # noqa: BLE001 - the row boundary: one bad value must not stop the table
        r.reject(column, f"cannot be checked ({type(err).__name__}: {visible(err, 200)}); fix the value "
                         "(and please report this message as an mcpl bug)")
    return None


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)[:1000]


def _formula(text: str) -> bool:
    return text.lstrip().startswith(FORMULA_START)


def _check_meta(r: RowResult, meta: object) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict):
        r.reject("meta", f"expected a JSON object, got {type(meta).__name__}")
        return
    size = len(json.dumps(meta))
    if size > MAX_JSON_CHARS:
        r.reject("meta", f"{size:,} characters of JSON; the limit is {MAX_JSON_CHARS:,} (keep large data in files)")
        return
    r.meta = meta


def _check_group(r: RowResult, group: object) -> None:
    if group is None:
        return
    if isinstance(group, bool) or not isinstance(group, str | int):
        r.reject("group", f"expected a name (text), got {type(group).__name__}")
        return
    name = str(group).strip()
    if not name:
        return
    if len(name) > MAX_GROUP_CHARS:
        r.reject("group", f"a group name of {len(name):,} characters; the limit is {MAX_GROUP_CHARS}")
    elif text_problem(name):
        r.reject("group", f"the group name {shown(name)} contains a {text_problem(name)}")
    elif _formula(name):
        r.reject("group", f"the group name {shown(name)} starts with {name[0]!r} (a spreadsheet formula); rename it")
    else:
        r.group = name


def _check_overrides(r: RowResult, overrides: object) -> tuple[str, int]:
    """Validate per-row TrainConfig overrides; return (strategy, num_vectors) used for checks."""
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        r.reject("overrides", f"expected a JSON object of training settings, got {type(overrides).__name__}")
        return "one", 1
    size = len(json.dumps(overrides))
    if size > MAX_JSON_CHARS:
        r.reject("overrides", f"{size:,} characters of JSON; the limit is {MAX_JSON_CHARS:,}")
        return "one", 1
    try:
        # strict: a table says what it means; true is not 1, "500" is not 500, 1.5 is not a step count
        config = TrainConfig.model_validate(overrides, strict=True)
    except ValidationError as err:
        for e in err.errors()[:10]:
            where = ".".join(visible(x, 60) for x in e["loc"]) or "overrides"
            got = "" if e["type"] == "extra_forbidden" else f", got {visible(repr(e.get('input')), 60)}"
            r.reject("overrides", f"{where}: {e['msg']}{got} (limits: docs/DATA.md, `mcpl train --help`)")
        return "one", 1
    except TypeError as err:
        r.reject("overrides", visible(err, 200))
        return "one", 1
    r.overrides = overrides
    strategy = overrides.get("strategy")
    if strategy == "diverse" and r.group is None:
        r.reject("overrides", "strategy 'diverse' needs several rows: give them the same `group`")
    if r.group is not None and strategy not in (None, "diverse"):
        r.reject("overrides", f"rows of a group train with strategy 'diverse', not {strategy!r}")
    return ("all" if strategy == "all" else "one"), config.num_vectors


def _check_image(r: RowResult, root: Path, value: object, max_pixels: int):
    if value is None:
        return None
    try:
        text = check_path_text(value)
        if _formula(text):
            raise FileCheckError(f"{shown(text)} starts with {text[0]!r} (a spreadsheet formula); rename the file")
        image, info = load_image(root, text, max_pixels)
    except FileCheckError as err:
        r.reject("image", str(err))
        return None
    r.image_hash = image_hash(image)
    r.file_bytes, r.format, r.mode = info.file_bytes, info.format, info.mode
    r.width, r.height, r.converted = info.width, info.height, info.notes
    if max(image.size) > MAX_ASPECT * min(image.size):
        side = min(image.size)
        r.warnings.append(f"image {image.width}x{image.height}: training sees only its centred {side}x{side} "
                          "square; crop the image around its objects")
    return image


def _check_sentence(r: RowResult, vocab: Vocabulary, value: object, strategy: str,
                    num_vectors: int) -> Sentence | None:
    if value is None:
        return None
    if not isinstance(value, str):
        r.reject("sentence", f"expected text, got {type(value).__name__}")
        return None
    if _formula(value):
        r.reject("sentence", f"the sentence starts with {value.lstrip()[0]!r} (a spreadsheet formula): {shown(value)}")
        return None
    try:
        sentence = parse_sentence(value)
    except SentenceError as err:
        r.reject("sentence", f"{err} (syntax: docs/FORMAT.md)")
        return None
    r.concepts = [{"token": c.token, "name": c.name, "initializer": c.initializer, "adjective": c.adjective}
                  for c in sentence.concepts]
    try:
        errors, warnings = vocab.check(sentence, strategy, num_vectors)
    except SentenceError as err:
        errors, warnings = [str(err)], []
    for message in errors:
        r.reject("sentence", message)
    r.warnings += warnings
    return sentence


def _check_masks(r: RowResult, root: Path, value: object, sentence: Sentence | None, image, max_pixels: int) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        r.reject("masks", 'expected a JSON object like {"<name>": "masks/name.png"}, '
                          f"got {type(value).__name__}")
        return
    if len(value) > MAX_MASKS:
        r.reject("masks", f"{len(value):,} masks; at most {MAX_MASKS} (one per placeholder of the sentence)")
        return
    tokens = [c.token for c in sentence.concepts] if sentence else None
    seen: dict[str, str] = {}
    for key, path in value.items():
        token = key.strip() if key.strip().startswith("<") else f"<{key.strip()}>"
        if not re.fullmatch(r"<[A-Za-z0-9_-]+>", token):
            r.reject("masks", f"mask key {shown(key, 60)} is not a placeholder (write it as in the sentence: "
                              '"<name>")')
            continue
        if token in seen:
            r.reject("masks", f"two masks for {token} (keys {shown(seen[token])} and {shown(key)}); keep one")
            continue
        seen[token] = key
        if tokens is not None and token not in tokens:
            r.reject("masks", f"mask for {token}, but the sentence has no {token} "
                              f"(placeholders: {', '.join(tokens)})")
            continue
        try:
            text = check_path_text(path)
            if _formula(text):
                raise FileCheckError(f"{shown(text)} starts with {text[0]!r} (a spreadsheet formula); rename it")
            mask, info = load_mask(root, text, max_pixels)
        except FileCheckError as err:
            r.reject("masks", f"mask of {token}: {err}")
            continue
        if image is not None and mask.size != image.size:
            r.reject("masks", f"mask of {token} is {mask.width}x{mask.height} but the image is "
                              f"{image.width}x{image.height}; masks must match the image's size")
            continue
        if mask_pixels(mask) == 0:
            r.reject("masks", f"mask of {token} ({shown(text)}) is empty: no white (> 127) pixels")
            continue
        r.masks[token] = text
        if info.notes:
            r.converted = r.converted + [f"mask of {token}: {n}" for n in info.notes]


# ---------------------------------------------------------------------------- table-wide
def _dedupe_key(r: RowResult) -> tuple:
    return (r.image_hash, r.sentence, r.group, json.dumps(r.overrides, sort_keys=True))


def _check_duplicates(results: list[RowResult]) -> None:
    seen: dict[tuple, RowResult] = {}
    for r in results:
        if not r.ok:
            continue
        first = seen.setdefault(_dedupe_key(r), r)
        if first is not r:
            same = "file" if r.image == first.image else "image content"
            r.reject("(row)", f"duplicate of row {first.row} (same {same} and sentence"
                              f"{', group' if r.group else ''}); remove one of them")


def _check_groups(results: list[RowResult]) -> None:
    """A group trains only when all of its rows are valid, there are >= 2, and they agree."""
    groups: dict[str, list[RowResult]] = {}
    for r in results:
        if r.group is not None:
            groups.setdefault(r.group, []).append(r)
    for name, members in groups.items():
        bad = [m.row for m in members if not m.ok]
        good = [m for m in members if m.ok]
        if bad:
            for m in good:
                m.reject("group", f"group {name!r} is not trained because row(s) {_rows(bad)} of it were "
                                  "rejected; fix them and validate again")
            continue
        if len(members) < 2:
            members[0].reject("group", f"group {name!r} has only this row; MCPL-diverse needs at least two "
                                       "images (drop the group to train it alone)")
            continue
        overrides = {json.dumps(m.overrides, sort_keys=True) for m in members}
        if len(overrides) > 1:
            for m in members:
                m.reject("overrides", f"rows {_rows([x.row for x in members])} of group {name!r} have "
                                      "different overrides; a group trains as one job with one config")
            continue
        try:
            plan_prompts([parse_sentence(m.sentence or "") for m in members], "diverse")
        except SentenceError as err:
            for m in members:
                m.reject("group", f"group {name!r} (rows {_rows([x.row for x in members])}): {err}")


def _rows(rows: list[int]) -> str:
    return ", ".join(str(x) for x in rows)


def _assign_job_keys(results: list[RowResult]) -> None:
    jobs: dict[str, list[RowResult]] = {}
    for r in results:
        if r.ok:
            jobs.setdefault(r.group if r.group is not None else f"row:{r.row}", []).append(r)
    for members in jobs.values():
        key = json.dumps([[m.image_hash for m in members], [m.sentence for m in members],
                          json.dumps(members[0].overrides, sort_keys=True), members[0].group])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        for m in members:
            m.job_key = digest


# ------------------------------------------------------------------------------ manifest
def write_manifest(report: ValidationReport, path: Path, max_pixels: int) -> Path:
    """Write the manifest atomically, with dataset facts in the schema metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = report.root.resolve()
    metadata = {
        "mcpl.manifest_version": MANIFEST_VERSION,
        "dataset": portable_path(root),  # as dataset_relative: a clone elsewhere writes the same bytes
        "dataset_relative": os.path.relpath(root, path.parent.resolve()),
        "table": report.table.name,
        "model": report.model,
        "max_pixels": str(max_pixels),
        "rows": str(len(report.rows)),
        "rejected": str(len(report.rejected)),
        "header_errors": json.dumps(report.header_errors),
    }  # no timestamp: the same dataset gives the same bytes, so DVC sees no change
    schema = MANIFEST_SCHEMA.with_metadata(metadata)
    table = pa.Table.from_pylist([r.to_record() for r in report.rows], schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> tuple[list[dict], dict[str, str]]:
    """Manifest rows (dicts, table order) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found; run `mcpl data validate DATASET --manifest {path}`")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"{path} is not a readable manifest ({str(err)[:200]}); validate again") from None
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
    if meta.get("mcpl.manifest_version") != MANIFEST_VERSION:
        raise DatasetError(f"{path} is not an mcpl manifest (version {MANIFEST_VERSION}); validate again")
    return table.to_pylist(), meta
