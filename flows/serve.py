"""Register and serve the deployments (needs PREFECT_API_URL pointing at a Prefect server).

    python -m flows.serve                      serve `mcpl/batch` from this process
    python -m flows.serve --job-pool mcpl-gpu  also register `mcpl-job/job` in a process work
                                               pool, for `executor="workers"` batches; start
                                               one worker per GPU (see docs/ORCHESTRATION.md)
    python -m flows.serve --job-pool mcpl-gpu --register-only
                                               register mcpl-job/job and exit

`prefect deployment run mcpl/batch` then starts a batch; flow runs execute in child
processes of this server process, with this process's environment (MLFLOW_TRACKING_URI...).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_POOL = "mcpl-gpu"


def ensure_process_pool(name: str, concurrency: int | None = None) -> None:
    """Create a `process` work pool if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=concurrency))
        except ObjectAlreadyExists:
            pass


def register_job_deployment(pool: str = JOB_POOL, env: dict[str, str] | None = None) -> str:
    """`mcpl-job/job` in work pool `pool`, code loaded from this checkout (shared path on workers)."""
    from prefect import flow

    ensure_process_pool(pool)
    source = flow.from_source(source=str(REPO_ROOT), entrypoint="flows/batch.py:job_flow")
    variables = {"env": {"PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
                 "working_dir": str(REPO_ROOT)}
    source.deploy(name="job", work_pool_name=pool, job_variables=variables, build=False, push=False,
                  print_next_steps=False, ignore_warnings=True, description="One mcpl job (a child run of mcpl/batch); "
                  "workers pinned to one GPU each run it")
    return "mcpl-job/job"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-pool", default=None, help=f"also register mcpl-job/job in this process work "
                                                          f"pool (e.g. {JOB_POOL})")
    parser.add_argument("--limit", type=int, default=None, help="max concurrent batch flow runs served here")
    parser.add_argument("--register-only", action="store_true",
                        help="only register mcpl-job/job (with --job-pool), do not serve mcpl/batch")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))

    from flows.batch import batch

    if args.job_pool:
        passed = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE") if k in os.environ}
        print(f"registered {register_job_deployment(args.job_pool, passed)} in work pool {args.job_pool}")
    if args.register_only:
        return
    batch.serve(name="batch", limit=args.limit, description="Train every job of a dataset on a frozen "
                "Stable Diffusion and publish the concepts to the MLflow registry")


if __name__ == "__main__":
    main()
