"""Run a list of jobs in-process (no server): each writes its bundle, done work is skipped.

Layout under `out_root`:
    jobs/<job_id>/            the bundle of mcpl.job.run_job (job.json marks it done)
    jobs/<job_id>/spec.json   the JobSpec that made it (dataset, rows, images, group, config)
    jobs/<job_id>/concepts/<name>/concept.json, overlay.png, sample.png   registry cards
    jobs/<job_id>/error.log   traceback of a failed attempt (removed once it succeeds)
    summary.json              every job's outcome and every rejected table row

A job whose bundle already has a job.json with the same job id is skipped; a job that
fails is recorded with its error and the batch goes on. Re-running the same batch resumes
an interrupted job from its checkpoints (the engine's resume) and skips finished ones.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcpl.job.run import JOB_FILE
from mcpl.pipeline.data.jobs import JobSpec
from mcpl.pipeline.registry.publish import (
    SPEC_FILE,  # the JobSpec of a bundle (dataset, rows, group), read by the registry
)

SUMMARY_FILE = "summary.json"
JOBS_DIR = "jobs"


@dataclass
class JobOutcome:
    job_id: str
    status: str  # "done" (trained now) | "skipped" (done before) | "failed"
    rows: list[int]
    images: list[str]
    group: str | None
    out_dir: str  # relative to the batch folder
    seconds: float = 0.0
    error: str | None = None
    concepts: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


@dataclass
class BatchSummary:
    out_root: str
    jobs: list[JobOutcome]
    rejected: list[dict] = field(default_factory=list)  # rejected table rows (from the manifest)
    started: float = 0.0
    finished: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for j in self.jobs if j.status == status)

    @property
    def failed(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"out_root": self.out_root, "started": self.started, "finished": self.finished,
                "counts": {s: self.count(s) for s in ("done", "skipped", "failed")} | {
                    "jobs": len(self.jobs), "rejected_rows": len(self.rejected)},
                "jobs": [asdict(j) for j in self.jobs], "rejected": self.rejected}

    def write(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else Path(self.out_root) / SUMMARY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        tmp.replace(path)
        return path

    def render(self) -> str:
        lines = [f"{len(self.jobs)} job(s): {self.count('done')} trained, {self.count('skipped')} already done, "
                 f"{self.count('failed')} failed; {len(self.rejected)} table row(s) rejected at validation"]
        for j in self.failed:
            lines.append(f"  FAILED {j.job_id} ({_label(j)}): {j.error}")
        for r in self.rejected:
            lines.append(f"  rejected row {r.get('row')}: {r.get('error')}")
        return "\n".join(lines)


def _label(j: JobOutcome | JobSpec) -> str:
    rows = ", ".join(map(str, j.rows))
    return f"group {j.group!r}, rows {rows}" if j.group else f"row {rows}"


def job_dir(out_root: str | Path, job_id: str) -> Path:
    return Path(out_root) / JOBS_DIR / job_id


def new_outcome(spec: JobSpec, out_root: str | Path) -> JobOutcome:
    """A job's outcome record, 'failed' until the job proves otherwise."""
    out = job_dir(out_root, spec.job_id)
    return JobOutcome(spec.job_id, "failed", list(spec.rows), list(spec.images), spec.group,
                      str(out.relative_to(out_root)))


def train_one(spec: JobSpec, out: Path, callbacks: Sequence = (), device: str | None = None, samples: int = 2,
              sample_steps: int = 25, progress: bool = True) -> dict:
    """Run one job into its bundle folder (resuming from its checkpoints); raise on failure.

    Shared by the in-process batch and the orchestrated task, so both write the same
    bundle: spec.json, the engine's bundle, the registry cards. Returns job.json's record.
    """
    from mcpl.job.run import run_job
    from mcpl.pipeline.registry.publish import concept_cards

    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1))
    result = run_job(spec.model, spec.load_inputs(), spec.config, out, callbacks=list(callbacks),
                     device=device, samples=samples, sample_steps=sample_steps, progress=progress)
    if result.record.get("job_id") != spec.job_id:
        raise RuntimeError(f"the engine recorded job id {result.record.get('job_id')} for job {spec.job_id}; "
                           "its inputs differ from the manifest (validate again)")
    concept_cards(out)  # each concept's card files, as the registry publishes them (idempotent)
    (out / "error.log").unlink(missing_ok=True)
    return result.record


def is_done(out_dir: Path, job_id: str) -> dict | None:
    """The job.json record if the bundle at out_dir is finished work for job_id."""
    try:
        record = json.loads((out_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("job_id") == job_id else None


def run_batch(jobs: Sequence[JobSpec], out_root: str | Path, skip_done: bool = True,
              callbacks_factory: Callable[[JobSpec], Sequence] | None = None, progress: bool = True, *,
              rejected: Sequence[dict] = (), samples: int = 2, sample_steps: int = 25,
              device: str | None = None, keep_checkpoints: bool = True, log: bool = True) -> BatchSummary:
    """Run every job (sequentially, in this process); never stops at a failing job.

    `callbacks_factory(spec)` gives each job's TrainCallbacks (e.g. MLflow or Prefect
    loggers). `rejected`: table rows rejected at validation, carried into the summary.
    `keep_checkpoints=False` deletes a finished job's checkpoints/ (its resumable state).
    `progress`: the engine's progress bars; `log`: one line per job on stderr.
    """
    out_root = Path(out_root)
    summary = BatchSummary(str(out_root), [], list(rejected), started=time.time())
    for n, spec in enumerate(jobs, start=1):
        out = job_dir(out_root, spec.job_id)
        outcome = new_outcome(spec, out_root)
        summary.jobs.append(outcome)
        record = is_done(out, spec.job_id) if skip_done else None
        if record is not None:
            outcome.status = "skipped"
            fill_outcome(outcome, record)
            _say(log, f"[{n}/{len(jobs)}] {spec.job_id} ({_label(spec)}): done before, skipped")
            summary.write()
            continue
        _say(log, f"[{n}/{len(jobs)}] {spec.job_id} ({_label(spec)}): training "
                       f"{spec.config.steps} steps, strategy {spec.config.strategy}")
        started = time.time()
        try:
            callbacks = list(callbacks_factory(spec)) if callbacks_factory else []
            record = train_one(spec, out, callbacks, device, samples, sample_steps, progress)
        except Exception as err:  # noqa: BLE001 - one job's failure must not stop the batch
            outcome.seconds = round(time.time() - started, 2)
            outcome.error = f"{type(err).__name__}: {err}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.log").write_text(traceback.format_exc())
            _say(log, f"[{n}/{len(jobs)}] {spec.job_id} FAILED: {outcome.error} (traceback: {out}/error.log)")
            summary.write()
            continue
        outcome.status, outcome.seconds = "done", round(time.time() - started, 2)
        fill_outcome(outcome, record)
        if not keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        _say(log, f"[{n}/{len(jobs)}] {spec.job_id}: {outcome.status} in {outcome.seconds:.0f} s"
                  + (f" ({outcome.error})" if outcome.error else ""))
        summary.write()
    summary.finished = time.time()
    summary.write()
    return summary


def fill_outcome(outcome: JobOutcome, record: dict) -> None:
    outcome.concepts = [c["token"] for c in record.get("concepts", [])]
    outcome.metrics = record.get("metrics", {})


def _say(log: bool, message: str) -> None:
    if log:
        print(message, file=sys.stderr, flush=True)
