"""No silent loss: every table row has exactly one fate in summary.json, and the counts add up.

One table holds each fate: trained, a duplicate rejected at validation, the same work as
another row (merged by `plan_jobs` under the batch's settings), rejected, a job that fails
(its image changed after validation), a two-row group; a rerun turns the trained rows
into done-before. Runs `mcpl batch` itself on the tiny model (1 step, no samples).
"""

from __future__ import annotations

import json

from helpers.data import SENTENCE, add_good_files, write_jsonl
from helpers.hostile import pic

from mcpl.cli import main
from mcpl.config import ConfigSource
from mcpl.pipeline.data import plan_jobs, validate_dataset

FATES = ("trained", "done-before", "duplicate", "rejected", "failed")


def batch(manifest, out, model) -> dict:
    code = main(["batch", "--manifest", str(manifest), "--out", str(out), "--model", model, "--samples", "0",
                 "--set", "steps=1", "--set", "map_timesteps=1", "--set", "checkpoint_every=1"])
    summary = json.loads((out / "summary.json").read_text())
    summary["exit"] = code
    return summary


def test_every_row_has_one_fate_and_the_counts_add_up(tmp_path, tiny_model, capsys):
    root = tmp_path / "data"
    good = add_good_files(root)
    changing = pic(root, "images/changes.png")
    rows = [
        good,                                                   # 1 trained
        dict(good),                                             # 2 rejected: duplicate of row 1
        {**good, "overrides": {"steps": 7}},                    # 3 same work as row 1 once --set steps=1
        {"image": "images/missing.png", "sentence": SENTENCE},  # 4 rejected: no such file
        {"image": changing, "sentence": SENTENCE},              # 5 failed: the image changes after validation
        {"image": pic(root, "images/g1.png"), "sentence": SENTENCE, "group": "g"},  # 6, 7: one diverse job
        {"image": pic(root, "images/g2.png"), "sentence": SENTENCE, "group": "g"},
    ]
    write_jsonl(root, rows)
    report = validate_dataset(root, model=tiny_model)
    pic(root, changing)  # new pixels: the job's input no longer matches the manifest

    plan = plan_jobs(report.manifest, ConfigSource(sets={"steps": 1}), tiny_model)
    assert plan.table_rows == plan.accounted() == 7
    assert [m["row"] for m in plan.merged] == [3] and plan.merged[0]["duplicate_of"] == [1]

    first = batch(report.manifest, tmp_path / "out", tiny_model)
    assert first["exit"] == 1  # a job failed; the others ran
    fates = {r["row"]: r["status"] for r in first["rows"]}
    assert fates == {1: "trained", 2: "rejected", 3: "duplicate", 4: "rejected", 5: "failed", 6: "trained",
                     7: "trained"}
    counts = first["row_counts"]
    assert counts == {"trained": 3, "done-before": 0, "duplicate": 1, "rejected": 2, "failed": 1, "total": 7}
    assert sum(counts[f] for f in FATES) == counts["total"] == len(rows)
    by_row = {r["row"]: r for r in first["rows"]}
    assert "duplicate of row 1" in by_row[2]["error"] and "images/missing.png" in by_row[4]["error"]
    assert by_row[3]["duplicate_of"] == [1] and by_row[3]["job_id"] == by_row[1]["job_id"]
    assert "changed since validation" in by_row[5]["error"]
    printed = capsys.readouterr().out
    assert "rows: 7 = 3 trained + 0 done before + 1 duplicate + 2 rejected + 1 failed" in printed

    again = batch(report.manifest, tmp_path / "out", tiny_model)
    assert again["row_counts"] == {"trained": 0, "done-before": 3, "duplicate": 1, "rejected": 2, "failed": 1,
                                   "total": 7}


def test_a_manifest_row_without_a_job_is_not_lost(tmp_path, tiny_model):
    """A hand-edited manifest (a valid row with no job key) is reported, never silently dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "data"
    write_jsonl(root, [add_good_files(root), {"image": pic(root, "images/b.png"), "sentence": SENTENCE}])
    report = validate_dataset(root, model=tiny_model)
    table = pq.read_table(report.manifest)
    keys = table.column("job_key").to_pylist()
    keys[1] = None
    table = table.set_column(table.schema.get_field_index("job_key"), "job_key", pa.array(keys, pa.string()))
    pq.write_table(table, report.manifest)
    plan = plan_jobs(report.manifest, ConfigSource(), tiny_model)
    assert plan.accounted() == plan.table_rows == 2
    assert [r["row"] for r in plan.rejected] == [2] and "no job" in plan.rejected[0]["error"]
