"""Run one job in a process of its own: `python -m flows.job_process ARGS.json`.

The batch flow starts one of these per job when jobs run side by side: each is pinned to
its device (CUDA_VISIBLE_DEVICES set by the parent), a crash or CUDA OOM takes down only
its own job, and model loading (not thread-safe in diffusers/transformers) never races.
It runs `mcpl.pipeline.runner.run_one` with the batch's MLflow settings; its progress lines
go to stdout (the parent forwards them to the flow's log). Exit code 0: done; 1: the job
failed (outcome.json has the error either way). No Prefect import here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(args_file: str) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = json.loads(Path(args_file).read_text())
    import torch

    from mcpl.config import RunOptions
    from mcpl.pipeline.data import JobSpec
    from mcpl.pipeline.faults import FaultObserver
    from mcpl.pipeline.progress import LogObserver
    from mcpl.pipeline.runner import run_one
    from mcpl.pipeline.tracking.observer import MlflowObserver, TrackingSettings

    options = RunOptions(**args["options"])
    torch.set_num_threads(max(1, options.threads or 1))
    observers = [LogObserver(lambda line: print(line, flush=True)), FaultObserver(allow_kill=True),
                 MlflowObserver.joining(TrackingSettings.from_dict(args["tracking"]))]
    outcome = run_one(JobSpec.from_dict(args["spec"]), args["out"], options, observers)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
