"""The one job runner: `run_pack` runs jobs (a pack of one or more) into their bundles; observers listen.

`mcpl batch`, the DVC train stage, the Prefect tasks and the workers (mcpl.pipeline.workers,
`run_batch`) all come here. What else
happens around a job (progress lines, its MLflow run, the registry, Prefect logs) is an
`Observer`: the runner calls its hooks and hands the engine the TrainCallbacks they
return; an observer never runs a job itself. Layout under a batch folder:

    jobs/<job_id>/    the job's bundle (mcpl.job.bundle), job.json marks it done
    summary.json      every job's outcome and every input row's fate (mcpl.pipeline.report)

A job whose bundle already has a job.json with the same job id is skipped; a job that
fails is recorded with its error and the batch goes on; re-running resumes an interrupted
job from its checkpoints (the engine's resume) and skips finished ones.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mcpl.config import RunOptions, TrainConfig
from mcpl.errors import BundleError
from mcpl.job.bundle import Bundle, JobOutcome, JobStatus
from mcpl.job.cards import concept_cards
from mcpl.method.checkpoint import list_checkpoints
from mcpl.pipeline.data.jobs import JobSpec
from mcpl.pipeline.report import BatchSummary


@dataclass
class BatchContext:
    """What observers learn when a batch starts."""

    out_root: Path
    jobs: list[JobSpec]
    model: str = ""
    base_config: TrainConfig | None = None
    rejected: list[dict] = field(default_factory=list)
    merged: list[dict] = field(default_factory=list)  # rows that are the same work as another row
    manifest: str = ""
    params: dict = field(default_factory=dict)  # how the batch was started (for its MLflow run)


@dataclass
class JobContext:
    """What observers learn when a job starts."""

    spec: JobSpec
    bundle: Bundle
    resumed_from: int  # newest checkpoint step (0: a fresh start)
    device: str
    index: int = 0  # 1-based position in the batch (0: a lone job)
    total: int = 0


class Observer:
    """Hooks of the runner, all optional. `job_started` may return TrainCallbacks for the engine."""

    def batch_started(self, batch: BatchContext) -> None:
        pass

    def job_started(self, job: JobContext) -> Sequence:
        return ()

    def job_finished(self, job: JobContext, outcome: JobOutcome) -> None:
        pass

    def batch_finished(self, summary: BatchSummary) -> None:
        pass


def worker_name() -> str:
    return os.environ.get("MCPL_WORKER_NAME") or socket.gethostname()


def new_outcome(spec: JobSpec, out_root: str | Path) -> JobOutcome:
    """A job's outcome record, 'failed' until the job proves otherwise."""
    return JobOutcome(spec.job_id, JobStatus.FAILED, list(spec.rows), list(spec.images), spec.group,
                      str(Bundle.of(out_root, spec.job_id).path.relative_to(out_root)))


def run_one(spec: JobSpec, out_root: str | Path, options: RunOptions | None = None,
            observers: Sequence[Observer] = (), *, components=None, index: int = 0, total: int = 0) -> JobOutcome:
    """Run one job into `<out_root>/jobs/<job_id>/`; never raises for the job's own failure.

    Skips finished work, resumes from checkpoints, writes spec.json, the engine's bundle,
    the concept cards and outcome.json (so a parent that ran it in another process can
    read it back). `components`: a model already loaded in this process, to share.
    """
    return run_pack([spec], out_root, options, observers, components=components, positions=[(index, total)])[0]


def run_pack(specs: Sequence[JobSpec], out_root: str | Path, options: RunOptions | None = None,
             observers: Sequence[Observer] = (), *, components=None,
             positions: Sequence[tuple[int, int]] | None = None) -> list[JobOutcome]:
    """Run compatible jobs (same model and latent size) together: one UNet call per step for all
    of them (mcpl.method.packing), each with its own bundle, outcome and observers' hooks. One
    job is just a pack of one. Never raises for the jobs' own failures."""
    from mcpl.job.run import JobWork, run_jobs

    options = options or RunOptions()
    out_root = Path(out_root)
    positions = list(positions or [(0, 0)] * len(specs))
    outcomes: dict[int, JobOutcome] = {}
    live: list[tuple[int, JobContext, JobOutcome, JobWork]] = []
    for k, spec in enumerate(specs):
        bundle = Bundle.of(out_root, spec.job_id)
        outcome = new_outcome(spec, out_root)
        outcome.device, outcome.worker, outcome.pid = options.device or "", worker_name(), os.getpid()
        record = bundle.is_done(spec.job_id) if options.skip_done else None
        checkpoints = list_checkpoints(bundle.checkpoints)
        job = JobContext(spec, bundle, int(checkpoints[-1].name.split("_")[1]) if checkpoints and record is None
                         else 0, options.device or "", *positions[k])
        outcome.resumed_from = job.resumed_from
        if record is not None:
            outcome.status = JobStatus.SKIPPED
            outcome.fill(record)
            outcomes[k] = _finish(job, outcome, observers)
            continue
        callbacks = [cb for o in observers for cb in o.job_started(job)]
        try:
            bundle.path.mkdir(parents=True, exist_ok=True)
            bundle.write_spec(spec.to_dict())
            live.append((k, job, outcome, JobWork(spec.load_inputs(), spec.config, bundle.path, callbacks)))
        except Exception as err:  # the job boundary: a job whose inputs do not load fails alone
            outcomes[k] = _finish(job, _failed(job, outcome, err), observers)
    if live:
        started = time.time()
        model = components if components is not None else live[0][1].spec.model
        try:
            results = run_jobs(model, [w for *_, w in live], options)
        except Exception as err:  # the whole pack failed (the model did not load, one job alone raised, ...)
            results = [err] * len(live)
        seconds = round(time.time() - started, 2)
        for (k, job, outcome, _), result in zip(live, results, strict=True):
            outcome.seconds = seconds
            outcomes[k] = _finish(job, _completed(job, outcome, result, options), observers)
    return [outcomes[k] for k in range(len(specs))]


def _completed(job: JobContext, outcome: JobOutcome, result, options: RunOptions) -> JobOutcome:
    """The outcome of a job the engine ran: done with its record, or failed with its error."""
    if isinstance(result, BaseException):
        return _failed(job, outcome, result)
    try:
        if result.record.job_id != job.spec.job_id:
            raise BundleError(f"the engine recorded job id {result.record.job_id} for job {job.spec.job_id}; "
                              "its inputs differ from the manifest (validate again)")
        concept_cards(job.bundle)
    except Exception as err:  # the job boundary, as above
        return _failed(job, outcome, err)
    job.bundle.clear_error()
    outcome.status = JobStatus.DONE
    outcome.fill(result.record)
    outcome.first_step = job.resumed_from + 1 if result.record.steps > job.resumed_from else None
    if not options.keep_checkpoints:
        shutil.rmtree(job.bundle.checkpoints, ignore_errors=True)
    return outcome


def _failed(job: JobContext, outcome: JobOutcome, err: BaseException) -> JobOutcome:
    spec = job.spec
    outcome.status = JobStatus.FAILED
    outcome.error = f"{type(err).__name__}: {err}"
    if not any(Path(i).name in str(err) for i in spec.images):  # say which input, if the error does not
        outcome.error += f" [{spec.label}: {', '.join(spec.images)}]"
    job.bundle.write_error("".join(traceback.format_exception(err)))
    return outcome


def _finish(job: JobContext, outcome: JobOutcome, observers: Sequence[Observer]) -> JobOutcome:
    job.bundle.write_outcome(outcome)
    for o in observers:
        o.job_finished(job, outcome)
    return outcome


class BatchRun:
    """One batch: `start`, then `run_one` per job (here, in a Prefect task or a worker), then `finish`."""

    def __init__(self, jobs: Sequence[JobSpec], out_root: str | Path, options: RunOptions | None = None,
                 observers: Sequence[Observer] = (), *, rejected: Sequence[dict] = (), merged: Sequence[dict] = (),
                 model: str = "", base_config: TrainConfig | None = None, manifest: str = "",
                 params: dict | None = None) -> None:
        self.options = options or RunOptions()
        self.observers = list(observers)
        self.context = BatchContext(Path(out_root).resolve(), list(jobs), model, base_config, list(rejected),
                                    list(merged), manifest, dict(params or {}))
        self.summary = BatchSummary(str(self.context.out_root), [], list(rejected), list(merged),
                                    started=time.time())
        self._lock = threading.Lock()

    def start(self) -> BatchRun:
        self.context.out_root.mkdir(parents=True, exist_ok=True)
        for o in self.observers:
            o.batch_started(self.context)
        return self

    def position(self, spec: JobSpec) -> tuple[int, int]:
        """(1-based place in the batch, number of jobs), for progress lines."""
        index = next((i for i, j in enumerate(self.context.jobs, start=1) if j.job_id == spec.job_id), 0)
        return index, len(self.context.jobs)

    def run_one(self, spec: JobSpec, components=None) -> JobOutcome:
        return self.run_pack([spec], components)[0]

    def run_pack(self, specs: Sequence[JobSpec], components=None) -> list[JobOutcome]:
        """Jobs of one model and size together in this process, with the batch's observers."""
        outcomes = run_pack(specs, self.context.out_root, self.options, self.observers, components=components,
                            positions=[self.position(s) for s in specs])
        for outcome in outcomes:
            self.record(outcome)
        return outcomes

    def record(self, outcome: JobOutcome) -> None:
        """Add (or replace) a job's outcome in the summary, which is rewritten after every job (thread-safe:
        a flow runs jobs from several threads)."""
        with self._lock:
            self.summary.jobs = [j for j in self.summary.jobs if j.job_id != outcome.job_id] + [outcome]
            self.summary.write()

    def finish(self) -> BatchSummary:
        order = {j.job_id: i for i, j in enumerate(self.context.jobs)}
        self.summary.jobs.sort(key=lambda o: order.get(o.job_id, len(order)))
        self.summary.finished = time.time()
        for o in self.observers:
            o.batch_finished(self.summary)
        self.summary.write()
        return self.summary
