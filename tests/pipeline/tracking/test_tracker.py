"""MLflow tracking: spool-and-replay when MLflow is unreachable, loss curves, resume evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.servers import FAST, free_port, jobs_for, write_dataset

pytest_plugins = ("helpers.server_fixtures",)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def all_runs(uri: str) -> list:
    c = client(uri)
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


@pytest.fixture(scope="module")
def one_job(tmp_path_factory, tiny_model):
    root = write_dataset(tmp_path_factory.mktemp("ds") / "pets", [
        {"image": "a.png", "colours": ("red", "blue"), "sentence": "a photo of a <dog|dog> on a <board|board>"}])
    return jobs_for(root, tiny_model)[0]


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    from mcpl.pipeline.tracking.store import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_spool_keeps_order_and_cursor(tmp_path):
    from mcpl.pipeline.tracking.spool import Spool

    spool = Spool(tmp_path)
    for i in range(3):
        spool.append("k", {"op": "log_batch", "i": i})
    assert [op["i"] for op in spool.pending("k")] == [0, 1, 2]
    spool.mark_done("k", 2)
    assert [op["i"] for op in spool.pending("k")] == [2]
    spool.mark_done("k", 1)
    assert spool.pending("k") == [] and spool.keys() == []


def test_unreachable_mlflow_is_spooled_then_replayed(tmp_path):
    """Every call made while MLflow is down is kept on disk and lands, in order, once it is back."""
    from mcpl.pipeline.tracking.tracker import Tracker

    dead = f"http://127.0.0.1:{free_port()}"
    artifact = tmp_path / "files" / "note.txt"
    artifact.parent.mkdir()
    artifact.write_text("kept")
    offline = Tracker(dead, tmp_path / "spool", "spooltest")
    offline.start_run("batch-1", "batch", {"mcpl.kind": "batch"})
    offline.start_run("batch-1.job-a", "job a", {"mcpl.kind": "job"}, parent="batch-1")
    offline.log_params("batch-1.job-a", {"lr": 0.1})
    for step in range(1, 4):
        offline.log_metrics("batch-1.job-a", {"loss": 1.0 / step}, step=step)
    offline.log_artifacts("batch-1.job-a", artifact.parent, "files")
    offline.end_run("batch-1.job-a")
    offline.end_run("batch-1")
    status = offline.finish()
    assert not status.online and status.spooled == 9 and status.pending == 9
    assert "unreachable" in status.message() and "mcpl registry build" in status.message()

    uri = f"sqlite:///{tmp_path / 'back.db'}"
    back = Tracker(uri, tmp_path / "spool", "spooltest").finish()
    assert back.pending == 0 and back.replayed == 9
    c = client(uri)
    runs = {r.data.tags["mcpl.kind"]: r for r in all_runs(uri)}
    parent, job = runs["batch"], runs["job"]
    assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [m.step for m in c.get_metric_history(job.info.run_id, "loss")] == [1, 2, 3]
    assert job.data.params["lr"] == "0.1"
    assert job.info.status == parent.info.status == "FINISHED"
    assert [f.path for f in c.list_artifacts(job.info.run_id, "files")] == ["files/note.txt"]


def test_rejected_call_is_dropped_not_spooled(tmp_path):
    from mcpl.pipeline.tracking.tracker import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "spool")
    tracker.start_run("r", "r")
    tracker.log_params("r", {"a": 1})
    tracker.log_params("r", {"a": 2})  # MLflow params are immutable: a permanent error
    status = tracker.finish()
    assert status.online and status.spooled == 0 and len(status.dropped) == 1


class Crash:
    """Fails the first attempt at step 3 (after the step-2 checkpoint)."""

    def __init__(self) -> None:
        self.armed = True

    def on_step(self, step, logs):
        if self.armed and step == 3:
            self.armed = False
            raise RuntimeError("crash at step 3")

    def on_checkpoint(self, step, path):
        pass


def test_tracked_job_retry_resumes_and_logs_one_curve(tmp_path, one_job):
    """A crashed job's second attempt continues from its checkpoint in the same MLflow run."""
    from mlflow.entities import RunStatus

    from mcpl.config import RunOptions
    from mcpl.pipeline.runner import Observer, run_one
    from mcpl.pipeline.tracking.observer import MlflowObserver
    from mcpl.pipeline.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = Tracker(uri, tmp_path / "spool")
    tracker.start_run("batch-x", "batch")
    crash = Crash()

    class Crashing(Observer):
        def job_started(self, job):
            return [crash]

    options = RunOptions(samples=1, sample_steps=2, progress=False)
    observers = [Crashing(), MlflowObserver(tracker, "batch-x")]
    attempt = run_one(one_job, tmp_path / "out", options, observers)
    assert attempt.status == "failed" and "crash at step 3" in attempt.error
    failed = json.loads((tmp_path / "out" / "jobs" / one_job.job_id / "outcome.json").read_text())
    assert failed["status"] == "failed" and "crash at step 3" in failed["error"]
    job_run = client(uri).get_run(failed["run_id"])
    assert RunStatus.from_string(job_run.info.status) == RunStatus.FAILED

    outcome = run_one(one_job, tmp_path / "out", options, observers).to_dict()
    assert outcome["status"] == "done" and outcome["resumed_from"] == 2 and outcome["first_step"] == 3
    assert outcome["run_id"] == failed["run_id"]  # the retry continues the same run
    run = client(uri).get_run(outcome["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mcpl.resumed_from_step"] == "2"
    steps = sorted({m.step for m in client(uri).get_metric_history(outcome["run_id"], "loss")})
    assert steps == list(range(1, FAST["steps"] + 1))
    arts = {f.path for f in client(uri).list_artifacts(outcome["run_id"], "concepts/dog")}
    assert {"concepts/dog/learned_embeds.safetensors", "concepts/dog/overlay.png",
            "concepts/dog/concept.json"} <= arts
    assert Path(tmp_path / "out" / "jobs" / one_job.job_id / "spec.json").exists()
    assert tracker.finish().pending == 0

    skipped = run_one(one_job, tmp_path / "out", options, [MlflowObserver(tracker, "batch-y")])
    assert skipped.status == "skipped"
