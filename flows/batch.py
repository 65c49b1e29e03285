"""Flow `mcpl` (deployment `mcpl/batch`): one Prefect task per job (or pack of jobs) of a manifest.

Only wiring: what a batch and a job do is mcpl.pipeline's (`BatchRun` and its observers:
progress lines, MLflow runs, the registry). Here are the fan-out, device pinning, process
isolation and retries.

- Local fan-out (`executor="local"`): at most one task per device at a time; with K GPUs
  visible each worker is pinned to its own `cuda:i`, on CPU `cpu_concurrency` tasks run side
  by side, on long-lived worker processes that load the model once (mcpl.pipeline.workers);
  `pack` > 1 trains that many compatible jobs per task in one UNet call per step. A sliding
  window submits a task only when a device is free.
- Distributed (`executor="workers"`): each job is a child flow run of the per-job
  deployment `mcpl-job/job` in a Prefect work pool; the workers (one per GPU) run them.
- A task retry re-enters `run_pack`, which resumes each job from its newest checkpoint;
  finished jobs are skipped (job id = images + sentences + config + model).
"""

# No `from __future__ import annotations` here: Prefect builds its parameter model from the
# flow signature at run time, and string annotations (Literal...) fail to resolve there.
import sys
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

if not __package__:  # loaded by file path (Prefect entrypoint, `python flows/batch.py`): make `flows` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcpl.config import FULL_MCPL, ConfigSource, RunOptions, TrainConfig, load_config_file  # noqa: E402
from mcpl.pipeline.faults import FaultObserver  # noqa: E402

JOB_DEPLOYMENT = "mcpl-job/job"
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_THREADS = 32  # the task runner's ceiling; the sliding window below is the real limit
# The DVC pipeline's knobs are the served deployment's defaults too: one source (its `train` and `batch` sections).
PIPELINE_PARAMS = REPO_ROOT / "params.yaml"


def pipeline_defaults(section: str, path: Path = PIPELINE_PARAMS) -> dict:
    """A section of params.yaml (`train`: TrainConfig fields; `batch`: samples, sample_steps); {} without the file."""
    return dict(load_config_file(f"{path}:{section}")) if path.is_file() else {}


def batch_source(config: TrainConfig | None = None, strategy: str | None = None, steps: int | None = None,
                 full: bool | None = None, overrides: dict | None = None) -> ConfigSource:
    """The batch's training settings: `config`, else params.yaml's train section (what `dvc repro` trains);
    then strategy/steps, `full` (True: AttnMask + PromptCL + Bind adj on; False: all three off; None: as
    the base says) and `overrides` on top."""
    switches = {} if full is None else FULL_MCPL if full else {k: False for k in FULL_MCPL}
    fields = {"strategy": strategy, "steps": steps, **switches, **(overrides or {})}
    return ConfigSource(file=config.model_dump() if config else pipeline_defaults("train"),
                        fields={k: v for k, v in fields.items() if v is not None})


def visible_devices(devices: list[str] | None, cpu_concurrency: int) -> list[str]:
    """The device slots: given ones, else every visible GPU once, else `cpu_concurrency` x cpu."""
    if devices:
        return list(devices)
    import torch

    gpus = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(gpus)] if gpus else ["cpu"] * max(1, cpu_concurrency)


def _run_options(device: str, samples: int, sample_steps: int, threads: int) -> RunOptions:
    return RunOptions(device=device, threads=threads, samples=samples, sample_steps=sample_steps, progress=False)


# ------------------------------------------------------------------------------ tasks
@task(name="train-job", cache_policy=NONE, retry_delay_seconds=2, task_run_name="job-{label}")
def train_job(specs: list[dict], out: str, device: str, tracking: dict, label: str = "", samples: int = 2,
              sample_steps: int = 25, threads: int = 1, batch: Any = None, pool: Any = None) -> list[dict]:
    """Train one job, or a pack of jobs sharing one UNet call per step, on `device`: on a warm worker of
    `pool` (side by side, pinned, isolated), else in this process. Raises if a job failed so Prefect
    retries the task; a retry resumes every job from its newest checkpoint and skips finished ones."""
    from mcpl.pipeline.data import JobSpec
    from mcpl.pipeline.progress import LogObserver
    from mcpl.pipeline.runner import run_pack
    from mcpl.pipeline.tracking.observer import MlflowObserver, TrackingSettings

    jobs = [JobSpec.from_dict(s) for s in specs]
    if pool is not None:
        outcomes = pool.run(jobs, [batch.position(j) for j in jobs])
        for outcome in outcomes:
            batch.record(outcome)
    elif batch is not None:  # the batch in this process: its observers and summary
        if threads:
            import torch

            torch.set_num_threads(threads)
        outcomes = batch.run_pack(jobs)
    else:  # a per-job deployment's worker: it tracks into the batch's parent run
        options = _run_options(device, samples, sample_steps, threads)
        observers = [LogObserver(get_run_logger().info), FaultObserver(),
                     MlflowObserver.joining(TrackingSettings.from_dict(tracking))]
        outcomes = run_pack(jobs, out, options, observers)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("; ".join(o.error or "failed" for o in failed))
    return [o.to_dict() for o in outcomes]


def _label(specs: list[dict], slot: str) -> str:
    extra = f"+{len(specs) - 1}" if len(specs) > 1 else ""
    return f"{specs[0]['job_id'][:8]}{extra} on {slot}"


@task(name="job-deployment", cache_policy=NONE, task_run_name="job-{spec[job_id]:.8} via {deployment}")
def job_via_deployment(spec: dict, out: str, tracking: dict, deployment: str, retries: int, samples: int,
                       sample_steps: int, threads: int = 1, batch: Any = None) -> dict:
    """Run one job as a child flow run of the per-job deployment (a worker picks it up)."""
    from prefect.deployments import run_deployment

    from mcpl.job.bundle import Bundle

    params = {"spec": spec, "out": out, "tracking": tracking, "retries": retries, "samples": samples,
              "sample_steps": sample_steps, "threads": threads}
    run = run_deployment(deployment, parameters=params, timeout=None, poll_interval=2,
                         flow_run_name=f"job-{spec['job_id'][:8]}")
    outcome = Bundle.of(out, spec["job_id"]).outcome()
    if outcome is not None and batch is not None:
        batch.record(outcome)
    if not run.state or not run.state.is_completed():
        message = (outcome.error if outcome else None) or (run.state.message if run.state else "no state")
        raise RuntimeError(f"child flow run {run.name} ended {run.state.type.value if run.state else '?'}: {message}")
    if outcome is None:
        raise RuntimeError(f"child flow run {run.name} completed but its outcome is not visible here: `out` must "
                           "be on storage shared by the batch and the workers")
    return outcome.to_dict()


# ------------------------------------------------------------------------------ flows
@flow(name="mcpl-job", log_prints=True)
def job_flow(spec: dict, out: str, tracking: dict, retries: int = 1, device: str | None = None,
             samples: int = 2, sample_steps: int = 25, threads: int = 1) -> dict:
    """One job (deployment `mcpl-job/job`): a worker on a GPU machine runs it where it sits.

    Pin a worker to a GPU with CUDA_VISIBLE_DEVICES; `device` None means its first GPU, or CPU.
    """
    device = device or visible_devices(None, 1)[0]
    return train_job.with_options(retries=retries)([spec], out, device, tracking, _label([spec], device), samples,
                                                   sample_steps, threads)[0]


@flow(name="mcpl", task_runner=ThreadPoolTaskRunner(max_workers=MAX_THREADS), log_prints=True)
def batch(
    dataset: str = "data/example",
    manifest: str | None = None,
    model: str | None = None,
    out: str = "runs/batch",
    strategy: Literal["one", "all", "diverse"] | None = None,
    steps: int | None = None,
    full: bool | None = None,
    overrides: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    devices: list[str] | None = None,
    cpu_concurrency: int = 1,
    threads: int = 1,
    retries: int = 1,
    samples: int | None = None,
    sample_steps: int | None = None,
    executor: Literal["local", "workers"] = "local",
    job_deployment: str = JOB_DEPLOYMENT,
    max_parallel: int | None = None,
    pack: int = 1,
    tracking_uri: str | None = None,
    experiment: str = "mcpl",
    publish: bool = True,
) -> dict:
    """Train every job of a dataset and publish the learned concepts to the registry.

    Unset settings are the DVC pipeline's (params.yaml `train` and `batch`: full MCPL, the same
    steps and samples as `dvc repro`).

    Args:
        dataset: dataset folder (validated here; the manifest goes to OUT/manifest.parquet).
        manifest: an existing manifest.parquet (then `dataset` is ignored).
        model: diffusers model folder or hub id (default: the embedded toy-world model).
        out: batch folder (jobs/<job_id>/ bundles, summary.json), relative to the served folder.
        strategy: one / all (diverse: groups, always); unset: params.yaml train.strategy.
        steps: optimisation steps per job; unset: params.yaml train.steps.
        full: AttnMask + PromptCL + Bind adj all on (true) or all off (false); unset: as params.yaml.
        overrides: any TrainConfig fields, over the rest; a row's own overrides win.
        config: a whole TrainConfig instead of params.yaml's train section.
        devices: e.g. ["cuda:0", "cuda:1"]; unset: every visible GPU, else `cpu_concurrency` CPU slots.
        cpu_concurrency: CPU jobs side by side (each in a process of its own when > 1).
        threads: torch threads per job process.
        retries: per job; a retry resumes from the job's newest checkpoint.
        samples: generations per concept after training; unset: params.yaml batch.samples.
        sample_steps: DDIM steps of those generations; unset: params.yaml batch.sample_steps.
        executor: local (this machine) or workers (child flow runs of `job_deployment` in a work pool).
        job_deployment: the per-job deployment the workers run.
        max_parallel: bound on tasks in flight.
        pack: jobs of one model and size trained together in one UNet call per step (one task per pack).
        tracking_uri: MLflow; unset: $MLFLOW_TRACKING_URI (serve.sh sets it), else ./mlflow.db.
        experiment: MLflow experiment of the batch's runs.
        publish: publish the concepts to the registry after the batch.
    """
    import torch
    from prefect.runtime import flow_run

    from mcpl.method.model_files import default_model, model_hash
    from mcpl.pipeline.data import plan_jobs, validate_dataset
    from mcpl.pipeline.progress import LogObserver
    from mcpl.pipeline.registry.publish import RegistryObserver
    from mcpl.pipeline.runner import BatchRun
    from mcpl.pipeline.tracking.observer import MlflowObserver
    from mcpl.pipeline.workers import WorkerPool, WorkerSetup, plan_packs

    logger = get_run_logger()
    torch.set_num_threads(max(1, threads))
    out_root = Path(out).resolve()
    model = model or default_model()
    source = batch_source(config, strategy, steps, full, overrides)
    knobs = pipeline_defaults("batch")
    samples = knobs.get("samples", 2) if samples is None else samples
    sample_steps = knobs.get("sample_steps", 25) if sample_steps is None else sample_steps
    if manifest is None:
        out_root.mkdir(parents=True, exist_ok=True)
        report = validate_dataset(dataset, out_root / "manifest.parquet", model)
        logger.info(report.render())
        manifest = str(report.manifest)
    plan = plan_jobs(manifest, source, model)

    mlflow = MlflowObserver.for_batch(out_root, tracking_uri, experiment, f"batch-{(flow_run.id or 'local')[:8]}")
    observers = [LogObserver(logger.info), FaultObserver(), *([RegistryObserver(mlflow)] if publish else []), mlflow]
    params = {"executor": executor, "devices": ",".join(devices or []),
              "mcpl.prefect_flow_run_id": str(flow_run.id or "")}
    run = BatchRun(plan.jobs, out_root, _run_options("", samples, sample_steps, threads), observers,
                   rejected=plan.rejected, merged=plan.merged, model=model, base_config=source.base(),
                   manifest=manifest, params=params).start()
    tracking = mlflow.settings().to_dict()
    pool = None
    if executor == "workers":
        slots = [job_deployment] * (max_parallel or 8)
        groups = [[j.to_dict()] for j in plan.jobs]

        def submit(specs: list[dict], slot: str):
            return job_via_deployment.submit(specs[0], str(out_root), tracking, slot, retries, samples, sample_steps,
                                             threads, run)
    else:
        slots = visible_devices(devices, cpu_concurrency)[: max_parallel or None]
        groups = [[j.to_dict() for j in group] for group in plan_packs(plan.jobs, pack)]
        # Side by side, jobs go to long-lived worker processes (pinned, isolated, the model loaded once per
        # worker, no racing model loads); alone, they run in this process with the batch's observers.
        if len(slots) > 1 or any(s.startswith("cuda") for s in slots):
            pool = WorkerPool(len(slots), WorkerSetup(str(out_root), run.options.model_dump(), slots, tracking,
                                                      {model: model_hash(model)}, threads=threads),
                              on_line=logger.info)
        job_task = train_job.with_options(retries=retries)

        def submit(specs: list[dict], slot: str):
            return job_task.submit(specs, str(out_root), slot, tracking, _label(specs, slot), samples, sample_steps,
                                   threads, run, pool)

    logger.info("%d job(s) in %d task(s) from %s on %s; %d row(s) rejected at validation; slots: %s", len(plan.jobs),
                len(groups), manifest, model, len(plan.rejected), ", ".join(slots))
    try:
        _fan_out(groups, slots, submit)
    finally:
        if pool is not None:
            pool.close()
    summary = run.finish()
    _prefect_artifact(summary)
    text = summary.render()
    logger.info(text)
    return (Failed if summary.failed else Completed)(message=text, data=summary.to_dict())


def _fan_out(groups: list[list[dict]], slots: list[str], submit) -> None:
    """Submit a task (one job or a pack) whenever a slot is free; wait for all (each task records its outcomes)."""
    free, running = list(slots), {}
    queue = list(groups)
    while queue or running:
        while queue and free:
            spec, slot = queue.pop(0), free.pop(0)
            running[submit(spec, slot)] = slot
        future = next(as_completed(list(running)))
        free.append(running.pop(future))
        future.wait()


def _prefect_artifact(summary) -> None:
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(summary.markdown(), key="mcpl-batch-summary", description="mcpl batch outcome")
    except Exception as err:  # noqa: BLE001 - a UI nicety must not fail the batch
        get_run_logger().warning("could not create the Prefect artifact: %s", err)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the mcpl batch flow once, here (an ephemeral Prefect "
                                                 "server starts if PREFECT_API_URL is not set).")
    parser.add_argument("--dataset", default="data/example")
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="runs/batch")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cpu-concurrency", type=int, default=1)
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    final = batch(dataset=args.dataset, manifest=args.manifest, model=args.model, out=args.out, steps=args.steps,
                  cpu_concurrency=args.cpu_concurrency, tracking_uri=args.tracking_uri, return_state=True)
    print(final.message)
    sys.exit(0 if final.is_completed() else 1)
