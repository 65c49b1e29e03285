"""Progress a person can follow: one line per job event, and a training line at a sane interval.

    [2/5] 480c5feb (row 2): training 200 steps, strategy one, full
    [2/5] 480c5feb: step 80/200 loss 0.1432, 3.1 steps/s, ETA 39 s
    [2/5] 480c5feb: done in 65 s (2 concepts)

`say` decides where lines go (stderr for the CLI, the Prefect run logger for a flow). Where a
LogObserver reports, the libraries stay quiet (`quiet_libraries`): no weight-loading or download
bars, no advisory notices, no MLflow "View run" / "Waiting up to 300 seconds" lines; progress bars
are for a person watching one job (`mcpl train`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mcpl.job.bundle import JobOutcome, JobStatus
from mcpl.job.cards import method_label
from mcpl.pipeline.runner import JobContext, Observer


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Read by the libraries when they start a bar or print a run link; set before they load, where possible.
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def quiet_libraries() -> None:
    """One line per event: no bars or notices from transformers, diffusers, huggingface_hub and MLflow
    (idempotent; a variable the user set is kept)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # MLflow's client logs one INFO line per registered version (it is READY at once on an OSS server).
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    import transformers
    from diffusers.utils import logging as diffusers_logging

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


class StepProgress:
    """A TrainCallback that reports step/total, loss, speed and ETA at most every `every` seconds."""

    def __init__(self, prefix: str, total: int, say: Callable[[str], None], every: float = 15.0) -> None:
        self.prefix, self.total, self.say, self.every = prefix, total, say, every
        self.started = time.time()
        self.first: int | None = None
        self.last_said = self.started

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        now = time.time()
        if self.first is None:
            self.first = step - 1
            self.started = now
            return
        if now - self.last_said < self.every and step < self.total:
            return
        self.last_said = now
        rate = (step - self.first) / max(now - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        loss = logs.get("loss")
        self.say(f"{self.prefix}: step {step}/{self.total}" + (f" loss {loss:.4f}" if loss is not None else "")
                 + f", {rate:.1f} steps/s, ETA {eta:.0f} s")

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


class LogObserver(Observer):
    """One line when a job starts and ends (with its error), progress lines while it trains.

    `quiet`: the libraries' own bars and notices are switched off in this process (`quiet_libraries`).
    """

    def __init__(self, say: Callable[[str], None] = stderr_line, every: float = 15.0, quiet: bool = True) -> None:
        self.say = say
        self.every = every
        if quiet:
            quiet_libraries()

    @staticmethod
    def prefix(job: JobContext) -> str:
        where = f"[{job.index}/{job.total}] " if job.total else ""
        return f"{where}{job.spec.job_id[:8]}"

    def job_started(self, job: JobContext) -> Sequence:
        config = job.spec.config
        resumed = f", resuming from step {job.resumed_from}" if job.resumed_from else ""
        self.say(f"{self.prefix(job)} ({job.spec.label}): training {config.steps} steps, strategy {config.strategy}, "
                 f"{method_label(config.model_dump())}{resumed}")
        return [StepProgress(self.prefix(job), config.steps, self.say, self.every)]

    def job_finished(self, job: JobContext, outcome: JobOutcome) -> None:
        if outcome.status is JobStatus.SKIPPED:
            self.say(f"{self.prefix(job)} ({job.spec.label}): done before, skipped")
        elif outcome.status is JobStatus.DONE:
            self.say(f"{self.prefix(job)}: done in {outcome.seconds:.0f} s ({len(outcome.concepts)} concepts)")
        else:
            self.say(f"{self.prefix(job)} FAILED: {outcome.error} (traceback: {job.bundle.error_log})")
