"""Progress a person can follow: one line per job event, and a training line at a sane interval.

    [2/5] 480c5feb (row 2): training 200 steps, strategy one, full
    [2/5] 480c5feb: step 80/200 loss 0.1432, 3.1 steps/s, ETA 39 s
    [2/5] 480c5feb: done in 65 s (2 concepts)

`say` decides where lines go (stderr for the CLI, the Prefect run logger for a flow).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mcpl.job.bundle import JobOutcome, JobStatus
from mcpl.job.cards import method_label
from mcpl.pipeline.runner import JobContext, Observer


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    """One line when a job starts and ends (with its error), progress lines while it trains."""

    def __init__(self, say: Callable[[str], None] = stderr_line, every: float = 15.0) -> None:
        self.say = say
        self.every = every

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
