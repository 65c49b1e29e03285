"""Dataset validation of the table: columns, encodings, sentences, duplicates, groups,
overrides; the manifest's schema; the report and the CLI's exit codes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from helpers.data import (
    SENTENCE,
    add_good_files,
    assert_good_row_is_a_job,
    assert_rejected,
    csv_cells,
    row_of,
    write_csv,
    write_jsonl,
)
from transformers import CLIPTokenizer

from mcpl.cli import main
from mcpl.config import TrainConfig
from mcpl.pipeline.data import MANIFEST_SCHEMA, DatasetError, load_jobs, validate_dataset

HEADER = ["image", "sentence", "masks"]


def validate(root, model, **kw):
    return validate_dataset(root, model=model, **kw)


# --------------------------------------------------------------------------- sentences
@pytest.mark.parametrize("sentence, fragment", [
    ("a red square and a blue circle", "no placeholder"),
    ("a red <c1|object and a blue <c2>", "unbalanced '<'"),
    ("a red c1|object> and a blue <c2>", "unbalanced '>'"),
    ("a <c1|object> and a <c1|thing>", "duplicate placeholder(s) <c1>"),
    ("a <c 1|object>", "invalid placeholder name"),
    ("a big <c1|object|red>", "adjective 'red' of <c1> is not a word of the sentence"),
    ("a " * 40 + "<c1|object>", "tokens long but the model reads at most 32"),
])
def test_malformed_sentence(tmp_path, tiny_model, sentence, fragment):
    good = add_good_files(tmp_path)
    write_jsonl(tmp_path, [good, {"image": good["image"], "sentence": sentence}])
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "sentence", fragment)
    assert_good_row_is_a_job(report, tiny_model)


def test_unknown_initializer(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_jsonl(tmp_path, [good, {"image": good["image"], "sentence": "a <c1|ca\u00f1on>"}])
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "sentence", "ca\u00f1on")


def test_placeholder_colliding_with_vocabulary(tmp_path, tiny_model):
    """A model whose tokenizer already has <cat-toy> (e.g. from an earlier textual inversion)."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    tokenizer.add_tokens(["<cat-toy>"])
    model = tmp_path / "model"
    tokenizer.save_pretrained(model / "tokenizer")
    root = tmp_path / "ds"
    good = add_good_files(root)
    write_jsonl(root, [good, {"image": good["image"], "sentence": "a <cat-toy|object> on a <c2|thing>"}])
    report = validate(root, str(model))
    assert_rejected(report, 2, "sentence", "placeholder <cat-toy> is already in the tokenizer's vocabulary")
    assert row_of(report, 1).ok


# ----------------------------------------------------------------------------- columns
def test_jsonl_row_with_missing_and_extra_column(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_jsonl(tmp_path, [good, {"image": good["image"]}, {**good, "caption": "x", "sentence": "a <c3|thing>"}])
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "sentence", "missing required column 'sentence'")
    assert_rejected(report, 3, "(row)", "unknown column(s) 'caption'")
    assert_good_row_is_a_job(report, tiny_model)


def test_csv_header_with_extra_column_rejects_every_row(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    header = HEADER + ["caption"]
    write_csv(tmp_path, header, [csv_cells(good, HEADER) + ["two squares"]])
    report = validate(tmp_path, tiny_model)
    assert report.header_errors and "unknown column(s) 'caption'" in report.header_errors[0]
    assert_rejected(report, 1, "(header)", "unknown column(s) 'caption'")
    assert "table header problems" in report.render()


def test_csv_header_missing_required_column(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_csv(tmp_path, ["image", "masks"], [csv_cells(good, ["image", "masks"])])
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 1, "(header)", "missing required column(s) 'sentence'")


def test_csv_rows_with_extra_or_missing_cells(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_csv(tmp_path, HEADER, [csv_cells(good, HEADER), csv_cells(good, HEADER) + ["surplus"],
                                 [good["image"], SENTENCE.replace("c1", "c3")], csv_cells(good, HEADER)[:1]])
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "(row)", "4 cells but the header has 3 columns")
    assert_rejected(report, 3, "(row)", "2 cells but the header has 3 columns")
    assert_rejected(report, 4, "(row)", "1 cells but the header has 3 columns")
    assert_good_row_is_a_job(report, tiny_model)


def test_csv_json_cells_quoting_bom_and_empty_optional_cells(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    header = ["image", "sentence", "masks", "group", "overrides"]
    path = write_csv(tmp_path, header, [csv_cells(good, HEADER) + ["", '{"steps": 7}'],
                                        [good["image"], "a <c5|thing>, then", "{not json", "", ""]])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # Excel's byte-order mark
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "masks", "cell is not valid JSON")
    (job,) = load_jobs(report.manifest, TrainConfig(), tiny_model)
    assert job.config.steps == 7 and job.masks[0] == good["masks"]


def test_non_utf8_text(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_csv(tmp_path, HEADER, [csv_cells(good, HEADER), [good["image"], "a caf\u00e9 <c9|thing>", ""]],
              encoding="latin-1")
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "(row)", "not valid UTF-8 (byte 0xe9")
    assert_good_row_is_a_job(report, tiny_model)

    jsonl = tmp_path / "j"
    good = add_good_files(jsonl)
    (jsonl / "rows.jsonl").write_bytes(json.dumps(good).encode() + b"\n"
                                       + b'{"image": "images/good.png", "sentence": "a caf\xe9 <c9>"}\n')
    report = validate(jsonl, tiny_model)
    assert_rejected(report, 2, "(row)", "not valid UTF-8 (byte 0xe9")
    assert_good_row_is_a_job(report, tiny_model)


def test_malformed_json_line_and_blank_lines(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_jsonl(tmp_path, [good, "", '{"image": "images/good.png", "sentence": ', "[1, 2]"])
    report = validate(tmp_path, tiny_model)
    assert [(r.row, r.line) for r in report.rows] == [(1, 1), (2, 3), (3, 4)]
    assert_rejected(report, 2, "(row)", "not valid JSON")
    assert_rejected(report, 3, "(row)", "expected a JSON object per line")


def test_table_level_errors(tmp_path, tiny_model):
    with pytest.raises(DatasetError, match="no table"):
        validate(tmp_path, tiny_model)
    write_jsonl(tmp_path, [])
    with pytest.raises(DatasetError, match="no data rows"):
        validate(tmp_path, tiny_model)
    write_csv(tmp_path, HEADER, [])
    with pytest.raises(DatasetError, match="keep one table"):
        validate(tmp_path, tiny_model)


# ------------------------------------------------------------------- duplicates, groups
def test_duplicate_rows(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    (tmp_path / "images" / "copy.png").write_bytes((tmp_path / "images" / "good.png").read_bytes())
    other = {"image": good["image"], "sentence": "a <c3|thing> and a <c4|object>"}
    write_jsonl(tmp_path, [good, good, {**good, "image": "images/copy.png"}, other])
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "(row)", "duplicate of row 1 (same file and sentence)")
    assert_rejected(report, 3, "(row)", "duplicate of row 1 (same image content and sentence)")
    assert row_of(report, 4).ok  # same image, another sentence: another job
    assert len(load_jobs(report.manifest, TrainConfig(), tiny_model)) == 2


def test_groups(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    add_good_files(tmp_path, "b")
    add_good_files(tmp_path, "c")
    shared = "a red <dot|object|red> and a <x{}|thing>"
    rows = [
        {"image": "images/good.png", "sentence": shared.format(1), "group": "g1"},
        {"image": "images/b.png", "sentence": shared.format(2), "group": "g1"},
        {"image": "images/c.png", "sentence": shared.format(3), "group": "lonely"},
        {"image": "images/good.png", "sentence": shared.format(4), "group": "g2"},
        {"image": "images/missing.png", "sentence": shared.format(5), "group": "g2"},
        {"image": "images/b.png", "sentence": "a <dot|thing>", "group": "g3"},
        {"image": "images/c.png", "sentence": "a <dot|object>", "group": "g3"},
        {"image": "images/b.png", "sentence": "a <q|thing>", "group": "g4", "overrides": {"steps": 3}},
        {"image": "images/c.png", "sentence": "a <q|thing>", "group": "g4"},
        {"image": "images/c.png", "sentence": "a <z|thing>", "overrides": {"strategy": "diverse"}},
        good,
    ]
    write_jsonl(tmp_path, rows)
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 3, "group", "group 'lonely' has only this row")
    assert_rejected(report, 5, "image", "file not found")
    assert_rejected(report, 4, "group", "group 'g2' is not trained because row(s) 5 of it were rejected")
    assert_rejected(report, 6, "group", "different initializers")
    assert_rejected(report, 8, "overrides", "have different overrides")
    assert_rejected(report, 10, "overrides", "strategy 'diverse' needs several rows")
    jobs = load_jobs(report.manifest, TrainConfig(strategy="diverse"), tiny_model)
    by_rows = {tuple(j.rows): j for j in jobs}
    assert set(by_rows) == {(1, 2), (11,)}
    assert by_rows[(1, 2)].config.strategy == "diverse" and by_rows[(1, 2)].group == "g1"
    assert by_rows[(11,)].config.strategy == "one"  # a base 'diverse' never applies to one image


def test_overrides(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    img = good["image"]
    rows = [good, {"image": img, "sentence": "a <o1|thing>", "overrides": {"steps": 0}},
            {"image": img, "sentence": "a <o2|thing>", "overrides": {"stepz": 3}},
            {"image": img, "sentence": "a <o3|thing>", "overrides": [1]},
            {"image": img, "sentence": "a <o4|thing>", "overrides": {"steps": 9, "learning_rate": 0.01}}]
    write_jsonl(tmp_path, rows)
    report = validate(tmp_path, tiny_model)
    assert_rejected(report, 2, "overrides", "steps: Input should be greater than or equal to 1")
    assert_rejected(report, 3, "overrides", "stepz: Extra inputs are not permitted")
    assert_rejected(report, 4, "overrides", "expected a JSON object of training settings")
    jobs = {j.rows[0]: j for j in load_jobs(report.manifest, TrainConfig(steps=50), tiny_model)}
    assert jobs[1].config.steps == 50 and jobs[5].config.steps == 9 and jobs[5].config.learning_rate == 0.01


# ------------------------------------------------------------------- manifest, report, CLI
def test_manifest_schema_and_metadata(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_jsonl(tmp_path, [good, {"image": "images/nope.png", "sentence": SENTENCE, "meta": {"k": 1}}])
    report = validate(tmp_path, tiny_model, manifest_path=tmp_path / "out" / "m.parquet")
    table = pq.read_table(report.manifest)
    assert table.schema.remove_metadata().equals(MANIFEST_SCHEMA)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["dataset"] == str(tmp_path.resolve()) and meta["dataset_relative"] == ".."
    assert meta["table"] == "rows.jsonl" and meta["model"] == tiny_model and meta["rejected"] == "1"
    rows = table.to_pylist()
    assert [r["row"] for r in rows] == [1, 2]  # nothing dropped
    ok, bad = rows
    assert ok["status"] == "ok" and ok["error"] is None and ok["job_key"] and len(ok["image_hash"]) == 16
    assert (ok["width"], ok["height"], ok["mode"], ok["format"]) == (32, 32, "RGB", "PNG")
    assert [c["token"] for c in ok["concepts"]] == ["<c1>", "<c2>"] and ok["concepts"][0]["adjective"] == "red"
    assert {m["token"] for m in ok["masks"]} == {"<c1>", "<c2>"} and ok["file_bytes"] > 0
    assert bad["status"] == "rejected" and "file not found" in bad["error"] and bad["job_key"] is None
    assert bad["errors"][0]["column"] == "image" and json.loads(bad["meta"]) == {"k": 1}


def test_cli_validate_exit_codes_and_table(tmp_path, tiny_model, capsys):
    good = add_good_files(tmp_path)
    write_jsonl(tmp_path, [good])
    assert main(["data", "validate", str(tmp_path), "--model", tiny_model]) == 0
    write_jsonl(tmp_path, [good, {"image": "../up.png", "sentence": "no marker"}])
    capsys.readouterr()
    assert main(["data", "validate", str(tmp_path), "--model", tiny_model]) == 1
    out, err = capsys.readouterr()
    assert "1 rejected" in out and "row  line  column" in out
    assert "    2     2  image" in out and "leaves the dataset folder" in out
    assert "    2     2  sentence" in out and "no placeholder" in out
    assert "1 row(s) rejected" in err
    assert main(["data", "validate", str(tmp_path), "--model", tiny_model, "--keep-going"]) == 0
    assert main(["data", "validate", str(tmp_path / "nothing"), "--model", tiny_model]) == 2
    assert (tmp_path / "manifest.parquet").exists()
