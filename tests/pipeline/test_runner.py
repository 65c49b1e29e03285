"""The in-process batch: every job writes its bundle; a rerun skips done jobs; a failing job
does not stop the others; the summary lists every outcome and every rejected row."""

from __future__ import annotations

import json
import os

from helpers.data import SENTENCE, add_good_files, write_jsonl

from mcpl.cli import main
from mcpl.config import RunOptions, TrainConfig
from mcpl.pipeline.data import load_jobs, rejected_rows, validate_dataset
from mcpl.pipeline.runner import Observer
from mcpl.pipeline.workers import run_batch

FAST = TrainConfig(steps=2, batch_size=2, map_timesteps=2, checkpoint_every=1)


class Counter:
    def __init__(self):
        self.steps = 0

    def on_step(self, step, logs):
        self.steps += 1

    def on_checkpoint(self, step, path):
        pass


def test_batch_partial_rerun(tmp_path, tiny_model):
    root = tmp_path / "ds"
    good = add_good_files(root)
    add_good_files(root, "b")
    rows = [good, {"image": "images/b.png", "sentence": "a <k1|thing> and a <k2|object>"},
            {"image": "images/b.png", "sentence": "a <k3|thing>"},
            {"image": "images/missing.png", "sentence": SENTENCE}]
    write_jsonl(root, rows)
    report = validate_dataset(root, tmp_path / "manifest.parquet", model=tiny_model)
    assert len(report.rejected) == 1
    jobs = load_jobs(report.manifest, FAST, tiny_model)
    assert len(jobs) == 3
    os.remove(root / "images" / "b.png")  # jobs 2 and 3 now fail when they load their image
    counters = []

    class Counting(Observer):  # the runner hands each job the callbacks its observers return
        def job_started(self, job):
            counters.append(Counter())
            return [counters[-1]]

    out = tmp_path / "batch"
    quiet = RunOptions(progress=False, samples=0)
    first = run_batch(jobs, out, quiet, [Counting()], rejected=rejected_rows(report.manifest))
    assert [j.status for j in first.jobs] == ["done", "failed", "failed"]
    assert counters[0].steps == 2
    assert "file not found" in first.jobs[1].error and (out / "jobs" / jobs[1].job_id / "error.log").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 2, "jobs": 3, "rejected_rows": 1}
    assert summary["rejected"][0]["row"] == 4 and "file not found" in summary["rejected"][0]["error"]
    assert summary["jobs"][0]["concepts"] == ["<c1>", "<c2>"] and summary["jobs"][0]["metrics"]["image_0"]
    record = out / "jobs" / jobs[0].job_id / "job.json"
    assert json.loads(record.read_text())["job_id"] == jobs[0].job_id
    stamp = record.stat().st_mtime_ns

    add_good_files(root, "b")  # fixed: the rerun trains only the failed jobs
    second = run_batch(jobs, out, quiet.model_copy(update={"keep_checkpoints": False}), [Counting()])
    assert [j.status for j in second.jobs] == ["skipped", "done", "done"]
    assert record.stat().st_mtime_ns == stamp and len(counters) == 5  # not called for the skipped job
    assert not (out / "jobs" / jobs[1].job_id / "error.log").exists()
    assert not (out / "jobs" / jobs[1].job_id / "checkpoints").exists()
    third = run_batch(jobs, out, quiet)
    assert [j.status for j in third.jobs] == ["skipped"] * 3 and third.ok


def test_cli_batch(tmp_path, tiny_model, capsys):
    root = tmp_path / "ds"
    write_jsonl(root, [add_good_files(root), {"image": "images/good.png", "sentence": "a <k|thing>"}])
    assert main(["data", "validate", str(root), "--manifest", str(tmp_path / "m.parquet"),
                 "--model", tiny_model]) == 0
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  steps: 3\n  batch_size: 1\n  map_timesteps: 1\nother: 1\n")
    argv = ["batch", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "b"), "--model", tiny_model,
            "--config", f"{params}:train", "--set", "steps=2", "--samples", "0", "--quiet", "--threads", "1"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["counts"]["done"] == 2
    record = json.loads((tmp_path / "b" / summary["jobs"][0]["out_dir"] / "job.json").read_text())
    assert record["steps"] == 2 and record["config"]["batch_size"] == 1
    assert main(argv) == 0
    assert "0 trained, 2 already done" in capsys.readouterr().out
    os.remove(root / "images" / "good.png")
    assert main(argv + ["--no-skip"]) == 1
    assert main(["evaluate", "--batch", str(tmp_path / "b"), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["jobs"]["failed"] == 2 and metrics["attention"]["concepts"] == 0
