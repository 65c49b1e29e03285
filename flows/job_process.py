"""Run one job in a process of its own: `python -m flows.job_process ARGS.json`.

The batch flow starts one of these per job when jobs run side by side: each is pinned to
its device (CUDA_VISIBLE_DEVICES set by the parent), a crash or CUDA OOM takes down only
its own job, and model loading (not thread-safe in diffusers/transformers) never races.
Exit code 0: done (outcome.json written); 1: the job failed (outcome.json has the error).
No Prefect import here: the parent task reports to Prefect.
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

    torch.set_num_threads(max(1, int(args.get("threads") or 1)))
    from flows.faults import FaultInjector
    from mcpl.pipeline.data import JobSpec
    from mcpl.pipeline.runner import job_dir
    from mcpl.pipeline.tracking.tracker import Tracker, run_tracked_job

    spec = JobSpec.from_dict(args["spec"])
    tracking = args["tracking"]
    tracker = Tracker(tracking.get("uri"), tracking["spool_dir"], tracking.get("experiment", "mcpl"))
    if tracking.get("parent_run_id") and not tracker.run_id(tracking["parent_key"]):
        tracker.spool.set_run_id(tracking["parent_key"], tracking["parent_run_id"])
    fault = FaultInjector(job_dir(args["out"], spec.job_id), spec.job_id, allow_kill=True)
    try:
        run_tracked_job(spec, args["out"], tracker, tracking.get("parent_key"), device=args["device"],
                        samples=args["samples"], sample_steps=args["sample_steps"], callbacks=[fault],
                        extra_tags=tracking.get("tags"))
    except Exception as err:  # noqa: BLE001 - reported through outcome.json and the exit code
        print(f"job {spec.job_id} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
