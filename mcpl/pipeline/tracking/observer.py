"""MLflow as an observer of the runner: a parent run per batch, a nested run per job.

Per job: params (every config field), the loss curve while it trains, summary metrics,
lineage tags (git revision, dataset/image/model hashes, strategy), the bundle's files
(embeddings, overlays, samples) and, on failure, the error and its traceback. Per batch:
lineage, the base config, counts, summary.json and the manifest. Everything goes through
the Tracker, so nothing is lost while MLflow is down.

A job that runs in another process (a worker, a Prefect task's subprocess) gets a
`TrackingSettings` and joins the batch's parent run from there.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcpl.job.bundle import JobOutcome, JobRecord, JobStatus
from mcpl.method.model_files import model_hash
from mcpl.pipeline.data.jobs import JobSpec
from mcpl.pipeline.report import BatchSummary, run_file
from mcpl.pipeline.runner import BatchContext, JobContext, Observer
from mcpl.pipeline.tracking.store import DEFAULT_EXPERIMENT, now_ms, resolve_tracking_uri, safe_key
from mcpl.pipeline.tracking.tracker import LOSS_KEYS, MlflowCallback, Tracker, _finite
from mcpl.provenance import git_revision


# ------------------------------------------------------------------ job record -> run
def flatten(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    """Nested dicts to dotted keys (`metrics.image_0.<dog>.iou`)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(f"{prefix}.{k}" if prefix else str(k), v)
    else:
        yield prefix, value


def metric_name(name: str) -> str:
    """MLflow metric names allow only alphanumerics, `_ - . / :` and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "", name)


def job_params(record: JobRecord) -> dict[str, Any]:
    """Everything that defines the job, as flat params."""
    params = {f"config.{k}": v for k, v in flatten("", record.config)}
    params.update({"base_model": record.base_model, "strategy": record.strategy, "job_id": record.job_id,
                   "learning_rate": record.learning_rate, "attention_layers": ",".join(record.attention_layers),
                   "concepts": ",".join(c.token for c in record.concepts),
                   "images": ",".join(i.source for i in record.images)})
    for i, image in enumerate(record.images):
        params[f"sentence.{i}"] = image.sentence
    return {k: v for k, v in params.items() if v is not None}


def job_summary_metrics(record: JobRecord) -> dict[str, float]:
    """Timing, final loss and evaluation metrics of a finished job."""
    out: dict[str, Any] = {"final_loss": record.final_loss, "train_seconds": record.train_seconds,
                           "wall_seconds": record.wall_seconds, "steps": record.steps}
    if record.train_seconds:
        out["steps_per_second"] = record.steps / record.train_seconds
    for name, value in flatten("", record.metrics):
        out[metric_name(f"eval.{name}")] = value
    return {k: float(v) for k, v in out.items() if _finite(v)}


def job_lineage_tags(record: JobRecord, extra: dict[str, Any] | None = None) -> dict[str, str]:
    tags = {"mcpl.kind": "job", "mcpl.job_id": record.job_id, "mcpl.strategy": record.strategy,
            "mcpl.base_model": record.base_model, "mcpl.base_model_hash": record.base_model_hash,
            "mcpl.config_hash": record.config_hash, "mcpl.image_hashes": ",".join(i.hash for i in record.images),
            "mcpl.git_rev": record.git_rev or git_revision()}
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return {k: str(v) for k, v in tags.items()}


def log_job_result(tracker: Tracker, key: str, record: JobRecord, bundle, history_before: int | None = None) -> None:
    """Params, summary metrics, lineage tags, the bundle's files and the loss curve's steps before
    `history_before` (steps a resumed run trained in an earlier process; None: the whole curve)."""
    tracker.log_params(key, job_params(record))
    tracker.set_tags(key, job_lineage_tags(record))
    end = history_before if history_before is not None else len(record.history) + 1
    ts = now_ms()
    rows = [[k, float(h[k]), ts, int(h["step"])] for h in record.history if int(h["step"]) < end
            for k in LOSS_KEYS if k in h]
    if rows:
        tracker.log_metric_rows(key, rows)
    tracker.log_metrics(key, job_summary_metrics(record), step=int(record.steps))
    for path, folder in bundle.artifacts():
        tracker.log_artifacts(key, path, folder)


def job_key(parent_key: str | None, job_id: str) -> str:
    """A job's run key: under its batch, so a retry in the same batch continues the same run."""
    return safe_key(f"{parent_key}.job-{job_id}" if parent_key else f"job-{job_id}")


def dataset_hash(specs: Iterable[JobSpec]) -> str:
    """Content hash of the data a batch trains on (images' pixel hashes, sentences, masks)."""
    items = sorted(json.dumps([list(s.images), list(s.image_hashes), list(s.sentences), s.masks, s.group],
                              sort_keys=True) for s in specs)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ the observer
@dataclass
class TrackingSettings:
    """How a process joins a batch's tracking (JSON-able: passed to job processes and workers)."""

    uri: str
    spool_dir: str
    experiment: str = DEFAULT_EXPERIMENT
    parent_key: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # lineage tags every job run carries

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrackingSettings:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def tracker(self) -> Tracker:
        tracker = Tracker(self.uri, self.spool_dir, self.experiment)
        if self.parent_key and self.parent_run_id and not tracker.run_id(self.parent_key):
            tracker.spool.set_run_id(self.parent_key, self.parent_run_id)
        return tracker


class MlflowObserver(Observer):
    """Logs a batch (when it sees `batch_started`) and each of its jobs to MLflow, through a Tracker."""

    def __init__(self, tracker: Tracker, parent_key: str | None = None, job_tags: dict[str, str] | None = None,
                 batch_key: str | None = None) -> None:
        self.tracker = tracker
        self.parent_key = parent_key
        self.job_tags = dict(job_tags or {})
        self.batch_key = batch_key
        self._jobs: dict[str, tuple[str, MlflowCallback, bool]] = {}

    @classmethod
    def joining(cls, settings: TrackingSettings) -> MlflowObserver:
        """An observer in a job process: its job runs nest under the batch's parent run."""
        return cls(settings.tracker(), settings.parent_key, settings.tags)

    @classmethod
    def for_batch(cls, out_root: str | Path, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                  batch_key: str | None = None) -> MlflowObserver:
        """An observer that opens the batch's parent run; its spool lives in the batch folder."""
        tracker = Tracker(resolve_tracking_uri(uri), Path(out_root) / "mlflow-spool", experiment)
        return cls(tracker, batch_key=batch_key or f"batch-{time.strftime('%Y%m%d-%H%M%S')}")

    def settings(self) -> TrackingSettings:
        """What a job process needs to join this batch's tracking."""
        return TrackingSettings(self.tracker.uri, str(self.tracker.spool.root), self.tracker.experiment,
                                self.parent_key, self.tracker.run_id(self.parent_key) if self.parent_key else None,
                                dict(self.job_tags))

    # ---- batch
    def batch_started(self, batch: BatchContext) -> None:
        if not self.batch_key:
            return
        if self.tracker.spool.keys():  # logs an earlier, interrupted batch could not write
            self.tracker.replay()
        dataset_name = Path(batch.jobs[0].dataset).name if batch.jobs else ""
        lineage = {"mcpl.kind": "batch", "mcpl.git_rev": git_revision(), "mcpl.dataset": dataset_name,
                   "mcpl.dataset_hash": dataset_hash(batch.jobs), "mcpl.base_model": batch.model,
                   "mcpl.base_model_hash": model_hash(batch.model) if batch.model else "",
                   "mcpl.strategy": batch.base_config.strategy if batch.base_config else "",
                   "mcpl.out": str(batch.out_root), **{k: str(v) for k, v in batch.params.items()
                                                       if k.startswith("mcpl.")}}
        self.tracker.start_run(self.batch_key, f"batch {dataset_name} {time.strftime('%Y-%m-%d %H:%M:%S')}", lineage)
        params = {k: v for k, v in batch.params.items() if not k.startswith("mcpl.")}
        params.update({"manifest": batch.manifest, "model": batch.model, "jobs": len(batch.jobs),
                       "rejected_rows": len(batch.rejected)})
        if batch.base_config is not None:
            params.update({f"config.{k}": v for k, v in batch.base_config.model_dump().items()})
        self.tracker.log_params(self.batch_key, params)
        self.parent_key = self.batch_key
        self.job_tags = {k: lineage[k] for k in ("mcpl.git_rev", "mcpl.base_model_hash", "mcpl.dataset_hash")}

    def batch_finished(self, summary: BatchSummary) -> None:
        if not self.batch_key:
            return
        self.tracker.finish()
        summary.links = self.run_links()
        summary.batch_key = self.batch_key
        summary.mlflow_run_id = self.tracker.run_id(self.batch_key)
        summary.tracking = self.tracker.status.to_dict()
        c = summary.to_dict()["counts"]
        self.tracker.log_metrics(self.batch_key, {"jobs_done": c["done"], "jobs_skipped": c["skipped"],
                                                  "jobs_failed": c["failed"], "rows_rejected": c["rejected_rows"],
                                                  "wall_seconds": summary.finished - summary.started})
        self.tracker.set_tags(self.batch_key, {"mcpl.outcome": "failed" if c["failed"] else "ok"})
        written = summary.write()
        for path in (written, run_file(written)):
            self.tracker.log_artifacts(self.batch_key, path)
        manifest = Path(summary.out_root) / "manifest.parquet"
        if manifest.exists():
            self.tracker.log_artifacts(self.batch_key, manifest)
        self.tracker.end_run(self.batch_key, "FAILED" if c["failed"] else "FINISHED")
        summary.tracking = self.tracker.finish().to_dict()

    # ---- jobs
    def job_started(self, job: JobContext) -> Sequence:
        spec = job.spec
        key = job_key(self.parent_key, spec.job_id)
        fresh = self.tracker.run_id(key) is None and not self.tracker.spool.pending(key)
        tags = {"mcpl.kind": "job", "mcpl.job_id": spec.job_id, "mcpl.rows": ",".join(map(str, spec.rows)),
                "mcpl.images": ",".join(spec.images), "mcpl.group": spec.group or "", "mcpl.dataset": spec.dataset,
                "mcpl.dataset_hash": dataset_hash([spec]), "mcpl.strategy": spec.config.strategy,
                "mcpl.device": job.device, "mcpl.resume_checkpoint": job.resumed_from, **self.job_tags}
        self.tracker.start_run(key, f"job {spec.job_id[:8]} ({', '.join(spec.images)})",
                               {k: str(v) for k, v in tags.items()}, parent=self.parent_key)
        callback = MlflowCallback(self.tracker, key)
        self._jobs[spec.job_id] = (key, callback, fresh)
        return [callback]

    def job_finished(self, job: JobContext, outcome: JobOutcome) -> None:
        if job.spec.job_id not in self._jobs:  # skipped: nothing trained, nothing to log
            return
        key, callback, fresh = self._jobs.pop(job.spec.job_id)
        callback.flush()
        if outcome.status is JobStatus.FAILED:
            self.tracker.set_tags(key, {"mcpl.error": (outcome.error or "")[:5000]})
            if job.bundle.error_log.exists():
                self.tracker.log_artifacts(key, job.bundle.error_log)
            self.tracker.end_run(key, "FAILED")
        else:
            before = (callback.first_step or 1) if fresh else 0
            log_job_result(self.tracker, key, job.bundle.record(), job.bundle, history_before=before)
            self.tracker.end_run(key, "FINISHED")
        outcome.run_id = self.tracker.run_id(key)
        job.bundle.write_outcome(outcome)

    def run_links(self) -> dict[str, str]:
        """job_id -> the URL of its run in the MLflow UI (HTTP stores only; empty while MLflow is down)."""
        if not self.tracker.uri.startswith(("http://", "https://")) or not self.tracker.status.online:
            return {}
        try:
            exp = self.tracker.experiment_id()
        except Exception:  # noqa: BLE001 - links are a nicety; MLflow errors come in many types
            return {}
        base = self.tracker.uri.rstrip("/")
        return {job: f"{base}/#/experiments/{exp}/runs/{run}" for job, run in self.run_ids().items()}

    def run_ids(self) -> dict[str, str]:
        """job_id -> MLflow run id of every job this observer logged (for the registry)."""
        prefix = f"{safe_key(self.parent_key)}.job-" if self.parent_key else "job-"
        out = {}
        for key in self.tracker.spool.known_keys():
            if key.startswith(prefix) and (run_id := self.tracker.run_id(key)):
                out[key[len(prefix):]] = run_id
        return out
