"""Fault injection for the resume tests (inactive unless MCPL_FAULT_AT_STEP is set).

MCPL_FAULT_AT_STEP=N: a job crashes once when it reaches training step N (after the
checkpoints written so far), so its retry must resume from the checkpoint.
MCPL_FAULT_JOBS=prefix,...: only jobs whose id starts with one of these.
MCPL_FAULT_MODE=raise (default) or kill: kill = SIGKILL of the job's own process, honoured
only where the job runs in a process of its own (a worker).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from mcpl.pipeline.runner import JobContext, Observer


class FaultInjector:
    """A TrainCallback that fails a job once, at a chosen step, marking that it did."""

    def __init__(self, out_dir: str | Path, job_id: str, allow_kill: bool = False) -> None:
        self.step = int(os.environ.get("MCPL_FAULT_AT_STEP", "0") or 0)
        prefixes = [p for p in os.environ.get("MCPL_FAULT_JOBS", "").split(",") if p]
        self.active = self.step > 0 and (not prefixes or any(job_id.startswith(p) for p in prefixes))
        self.kill = allow_kill and os.environ.get("MCPL_FAULT_MODE", "raise") == "kill"
        self.marker = Path(out_dir) / ".fault-injected"

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if self.active and step >= self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(str(step))
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {step} (MCPL_FAULT_AT_STEP)")

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


class FaultObserver(Observer):
    """Hands every job a FaultInjector (a no-op unless MCPL_FAULT_AT_STEP is set)."""

    def __init__(self, allow_kill: bool = False) -> None:
        self.allow_kill = allow_kill

    def job_started(self, job: JobContext) -> list:
        injector = FaultInjector(job.bundle.path, job.spec.job_id, self.allow_kill)
        return [injector] if injector.active else []
