"""Flow `mcpl` (deployment `mcpl/batch`): one Prefect task per job of a dataset's manifest.

- Local fan-out (`executor="local"`): at most one job per device at a time; with K GPUs
  visible each job is pinned to its own `cuda:i`, on CPU `cpu_concurrency` jobs run side
  by side. A sliding window submits a job only when a device is free.
- Distributed (`executor="workers"`): each job is a child flow run of the per-job
  deployment `mcpl-job/job` in a Prefect work pool; the workers (one per GPU) run them.
- A task retry re-enters `run_job`, which resumes from the job's newest checkpoint.
- Finished jobs are skipped: a job's id hashes its images, sentences, config and model, and
  its bundle's job.json marks it done (`mcpl.batch.is_done`).
- MLflow: a parent run per batch, a nested run per job (mcpl.pipeline.tracking.tracker, spooled when MLflow
  is down); afterwards the concepts go into the registry (mcpl.pipeline.registry.publish).
"""

# No `from __future__ import annotations` here: Prefect builds its parameter model from the
# flow signature at run time, and string annotations (Literal...) fail to resolve there.
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

if not __package__:  # loaded by file path (Prefect entrypoint, `python flows/batch.py`): make `flows` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.faults import FaultInjector  # noqa: E402
from mcpl.config import TrainConfig  # noqa: E402

JOB_DEPLOYMENT = "mcpl-job/job"
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_THREADS = 32  # the task runner's ceiling; the sliding window below is the real limit


# ---------------------------------------------------------------------------- helpers
def visible_devices(devices: list[str] | None, cpu_concurrency: int) -> list[str]:
    """The device slots: given ones, else every visible GPU once, else `cpu_concurrency` x cpu."""
    if devices:
        return list(devices)
    import torch

    gpus = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(gpus)] if gpus else ["cpu"] * max(1, cpu_concurrency)


def _tracker(tracking: dict):
    from mcpl.pipeline.tracking.tracker import Tracker

    tracker = Tracker(tracking.get("uri"), tracking["spool_dir"], tracking.get("experiment", "mcpl"))
    if tracking.get("parent_key") and tracking.get("parent_run_id") and not tracker.run_id(tracking["parent_key"]):
        tracker.spool.set_run_id(tracking["parent_key"], tracking["parent_run_id"])
    return tracker


# ------------------------------------------------------------------------------ tasks
@task(name="train-job", cache_policy=NONE, retry_delay_seconds=2, task_run_name="job-{spec[job_id]:.8} on {device}")
def train_job(spec: dict, out: str, device: str, tracking: dict, isolate: bool = False, samples: int = 2,
              sample_steps: int = 25, threads: int = 1, tracker: Any = None) -> dict:
    """Train one job on `device` (in a process of its own if `isolate`); raises on failure so
    Prefect retries it, and a retry resumes from the job's newest checkpoint."""
    from mcpl.pipeline.data import JobSpec
    from mcpl.pipeline.runner import job_dir
    from mcpl.pipeline.tracking.tracker import run_tracked_job

    logger = get_run_logger()
    folder = job_dir(out, spec["job_id"])
    if threads and not isolate:
        import torch

        torch.set_num_threads(threads)
    if isolate:
        outcome = _run_in_process(spec, out, device, tracking, samples, sample_steps, threads, folder)
    else:
        job = JobSpec.from_dict(spec)
        outcome = run_tracked_job(job, out, tracker or _tracker(tracking), tracking.get("parent_key"), device=device,
                                  samples=samples, sample_steps=sample_steps,
                                  callbacks=[FaultInjector(folder, job.job_id)], extra_tags=tracking.get("tags"))
    logger.info("job %s %s on %s (resumed from step %s)", spec["job_id"], outcome["status"], device,
                outcome.get("resumed_from", 0))
    return outcome


def _run_in_process(spec: dict, out: str, device: str, tracking: dict, samples: int, sample_steps: int,
                    threads: int, folder: Path) -> dict:
    """`python -m flows.job_process`, pinned to its GPU through CUDA_VISIBLE_DEVICES."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        env["CUDA_VISIBLE_DEVICES"], device = index, "cuda:0"
    args = folder / ".job-args.json"
    args.write_text(json.dumps({"spec": spec, "out": out, "device": device, "tracking": tracking, "samples": samples,
                                "sample_steps": sample_steps, "threads": threads}))
    (folder / "outcome.json").unlink(missing_ok=True)
    with open(folder / "job.log", "a") as log:
        proc = subprocess.run([sys.executable, "-m", "flows.job_process", str(args)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
    outcome_file = folder / "outcome.json"
    outcome = json.loads(outcome_file.read_text()) if outcome_file.exists() else {}
    if proc.returncode != 0 or outcome.get("status") == "failed":
        tail = "".join((folder / "job.log").read_text().splitlines(keepends=True)[-15:])
        get_run_logger().warning("job process for %s exited with %s; log tail:\n%s", spec["job_id"],
                                 proc.returncode, tail)
        raise RuntimeError(outcome.get("error") or f"job process exited with code {proc.returncode} "
                           f"(killed?); see {folder / 'job.log'}")
    return outcome


@task(name="job-deployment", cache_policy=NONE, task_run_name="job-{spec[job_id]:.8} via {deployment}")
def job_via_deployment(spec: dict, out: str, tracking: dict, deployment: str, retries: int, samples: int,
                       sample_steps: int, threads: int = 1) -> dict:
    """Run one job as a child flow run of the per-job deployment (a worker picks it up)."""
    from prefect.deployments import run_deployment

    from mcpl.pipeline.runner import job_dir

    params = {"spec": spec, "out": out, "tracking": tracking, "retries": retries, "samples": samples,
              "sample_steps": sample_steps, "threads": threads}
    run = run_deployment(deployment, parameters=params, timeout=None, poll_interval=2,
                         flow_run_name=f"job-{spec['job_id'][:8]}")
    path = job_dir(out, spec["job_id"]) / "outcome.json"
    outcome = json.loads(path.read_text()) if path.exists() else None
    if not run.state or not run.state.is_completed():
        message = (outcome or {}).get("error") or (run.state.message if run.state else "no state")
        raise RuntimeError(f"child flow run {run.name} ended {run.state.type.value if run.state else '?'}: {message}")
    if outcome is None:
        raise RuntimeError(f"child flow run {run.name} completed but {path} is not visible here: `out` must be on "
                           "storage shared by the batch and the workers")
    return outcome


# ------------------------------------------------------------------------------ flows
@flow(name="mcpl-job", log_prints=True)
def job_flow(spec: dict, out: str, tracking: dict, retries: int = 1, device: str | None = None,
             samples: int = 2, sample_steps: int = 25, threads: int = 1) -> dict:
    """One job (deployment `mcpl-job/job`): a worker on a GPU machine runs it where it sits.

    Pin a worker to a GPU with CUDA_VISIBLE_DEVICES; `device` None means its first GPU, or CPU.
    """
    device = device or visible_devices(None, 1)[0]
    return train_job.with_options(retries=retries)(spec, out, device, tracking, False, samples, sample_steps,
                                                   threads)


@flow(name="mcpl", task_runner=ThreadPoolTaskRunner(max_workers=MAX_THREADS), log_prints=True)
def batch(
    dataset: str = "data/example",
    manifest: str | None = None,
    model: str | None = None,
    out: str = "runs/batch",
    strategy: Literal["one", "all", "diverse"] | None = None,
    steps: int | None = None,
    full: bool = False,
    overrides: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    devices: list[str] | None = None,
    cpu_concurrency: int = 1,
    threads: int = 1,
    retries: int = 1,
    samples: int = 2,
    sample_steps: int = 25,
    executor: Literal["local", "workers"] = "local",
    job_deployment: str = JOB_DEPLOYMENT,
    max_parallel: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = "mcpl",
    publish: bool = True,
) -> dict:
    """Train every job of a dataset and publish the learned concepts to the registry.

    dataset: dataset folder (validated here; the manifest goes to OUT/manifest.parquet),
    or manifest: an existing manifest.parquet (then `dataset` is ignored).
    model: diffusers SD folder or hub id (default: the embedded toy-world model).
    strategy/steps/full/overrides/config: the base TrainConfig (`config`, then the rest on
    top; `full` = AttnMask + PromptCL + Bind adj); a row's own overrides win; groups train
    MCPL-diverse. devices: e.g. ["cuda:0", "cuda:1"] (default: every visible GPU, else
    `cpu_concurrency` CPU slots). threads: torch threads per process. retries: per job;
    a retry resumes from the job's checkpoint. executor "workers": each job is a child run
    of `job_deployment` in a work pool. tracking_uri: MLflow (default $MLFLOW_TRACKING_URI,
    else sqlite ./mlflow.db).
    """
    import torch

    from mcpl.method.models import default_model
    from mcpl.pipeline.data import load_jobs, rejected_rows, validate_dataset

    logger = get_run_logger()
    started = time.time()
    torch.set_num_threads(max(1, threads))
    out_root = Path(out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    model = model or default_model()
    base = _base_config(config, strategy, steps, full, overrides)
    if manifest is None:
        report = validate_dataset(dataset, out_root / "manifest.parquet", model)
        logger.info(report.render())
        manifest = str(report.manifest)
    jobs = load_jobs(manifest, base, model)
    rejected = rejected_rows(manifest)

    tracker, batch_key, tracking = _open_batch_run(out_root, tracking_uri, experiment, jobs, model, base, {
        "manifest": manifest, "model": model, "executor": executor, "jobs": len(jobs),
        "rejected_rows": len(rejected), "devices": ",".join(devices or [])})
    if executor == "workers":
        slots = [job_deployment] * (max_parallel or 8)

        def submit(spec: dict, slot: str):
            return job_via_deployment.submit(spec, str(out_root), tracking, slot, retries, samples, sample_steps,
                                             threads)
    else:
        slots = visible_devices(devices, cpu_concurrency)[: max_parallel or None]
        # Side by side, each job gets a process of its own (pinning, isolation); alone, it
        # runs in this process and shares the tracker.
        isolate = len(slots) > 1 or any(s.startswith("cuda") for s in slots)
        job_task = train_job.with_options(retries=retries)

        def submit(spec: dict, slot: str):
            return job_task.submit(spec, str(out_root), slot, tracking, isolate, samples, sample_steps, threads,
                                   None if isolate else tracker)

    logger.info("%d job(s) from %s on %s; %d row(s) rejected at validation; slots: %s", len(jobs), manifest,
                model, len(rejected), ", ".join(slots))
    outcomes = _fan_out([j.to_dict() for j in jobs], slots, submit, out_root)

    status = tracker.finish()
    registry: dict = {"message": "registry not published (publish=False)"}
    done = [o for o in outcomes if o["status"] in ("done", "skipped")]
    if publish and done:
        registry = _publish(out_root, done, tracker, batch_key, experiment, status.pending)
    summary = _summary(out_root, outcomes, rejected, status.to_dict(), registry, started, batch_key,
                       tracker.run_id(batch_key))
    _log_summary(tracker, batch_key, summary, out_root, manifest)
    summary["tracking"] = tracker.finish().to_dict()
    _write_json(out_root / "summary.json", summary)
    _prefect_artifact(summary)
    text = _render(summary)
    logger.info(text)
    failed = [o for o in outcomes if o["status"] == "failed"]
    if failed:
        return Failed(message=text, data=summary)
    return Completed(message=text, data=summary)


# ---------------------------------------------------------------------- flow pieces
def _base_config(config: TrainConfig | None, strategy: str | None, steps: int | None, full: bool,
                 overrides: dict[str, Any] | None) -> TrainConfig:
    fields = (config or TrainConfig()).model_dump()
    if strategy:
        fields["strategy"] = strategy
    if steps:
        fields["steps"] = steps
    if full:
        fields.update(attn_mask=True, prompt_cl=True, bind_adj=True)
    fields.update(overrides or {})
    return TrainConfig(**fields)


def _open_batch_run(out_root: Path, tracking_uri: str | None, experiment: str, jobs: list, model: str,
                    base: TrainConfig, params: dict) -> tuple[Any, str, dict]:
    """The batch's tracker and parent run (lineage tags, base config); what each job needs to join it."""
    from prefect.runtime import flow_run

    from mcpl.method.models import model_hash
    from mcpl.pipeline.tracking.tracker import Tracker, dataset_hash, git_revision, resolve_tracking_uri

    batch_key = f"batch-{(flow_run.id or uuid.uuid4().hex)[:8]}"
    uri = resolve_tracking_uri(tracking_uri)
    tracker = Tracker(uri, out_root / "mlflow-spool", experiment)
    if tracker.spool.keys():
        get_run_logger().info("replaying %d MLflow call(s) spooled by an earlier batch", tracker.spool.count())
        tracker.replay()
    dataset_name = Path(jobs[0].dataset).name if jobs else ""
    lineage = {"mcpl.kind": "batch", "mcpl.git_rev": git_revision(), "mcpl.dataset": dataset_name,
               "mcpl.dataset_hash": dataset_hash(jobs), "mcpl.base_model": model,
               "mcpl.base_model_hash": model_hash(model), "mcpl.strategy": base.strategy,
               "mcpl.prefect_flow_run_id": str(flow_run.id or ""), "mcpl.out": str(out_root)}
    tracker.start_run(batch_key, f"batch {dataset_name} {time.strftime('%Y-%m-%d %H:%M:%S')}", lineage)
    tracker.log_params(batch_key, {**params, **{f"config.{k}": v for k, v in base.model_dump().items()}})
    tracking = {"uri": uri, "experiment": experiment, "spool_dir": str(tracker.spool.root), "parent_key": batch_key,
                "parent_run_id": tracker.run_id(batch_key),
                "tags": {k: lineage[k] for k in ("mcpl.git_rev", "mcpl.base_model_hash", "mcpl.dataset_hash")}}
    return tracker, batch_key, tracking


def _fan_out(specs: list[dict], slots: list[str], submit, out_root: Path) -> list[dict]:
    """Submit a job whenever a slot is free; collect every outcome, failures included."""
    free, running, results = list(slots), {}, {}
    queue = list(specs)
    while queue or running:
        while queue and free:
            spec, slot = queue.pop(0), free.pop(0)
            running[submit(spec, slot)] = (spec, slot)
        future = next(as_completed(list(running)))
        spec, slot = running.pop(future)
        free.append(slot)
        results[spec["job_id"]] = _outcome(future, spec, out_root)
    return [results[s["job_id"]] for s in specs]


def _outcome(future, spec: dict, out_root: Path) -> dict:
    """The task's outcome dict, or a failed outcome carrying the error."""
    from mcpl.pipeline.runner import job_dir

    future.wait()
    result = future.result(raise_on_failure=False)
    if isinstance(result, dict) and result.get("status") in ("done", "skipped"):
        return result
    path = job_dir(out_root, spec["job_id"]) / "outcome.json"
    outcome = json.loads(path.read_text()) if path.exists() else {}
    error = f"{type(result).__name__}: {result}" if isinstance(result, BaseException) else str(result)
    return {"job_id": spec["job_id"], "rows": spec["rows"], "images": spec["images"], "group": spec["group"],
            "out_dir": str(job_dir(out_root, spec["job_id"]).relative_to(out_root)), "concepts": [], "metrics": {},
            **outcome, "status": "failed", "error": outcome.get("error") or error}


def _publish(out_root: Path, done: list[dict], tracker, batch_key: str, experiment: str, pending: int) -> dict:
    from mcpl.pipeline.registry.publish import concept_cards, publish
    from mcpl.pipeline.tracking.tracker import job_key

    logger = get_run_logger()
    if pending:
        return {"message": f"registry not published: MLflow unreachable ({pending} call(s) spooled); "
                           f"run `mcpl registry build {out_root}` when it is back", "pending": True}
    run_ids = {o["job_id"]: tracker.run_id(job_key(batch_key, o["job_id"])) for o in done}
    cards = [c for o in done for c in concept_cards(out_root / o["out_dir"])]
    try:
        report = publish(cards, tracker.uri, experiment, {k: v for k, v in run_ids.items() if v})
    except Exception as err:  # noqa: BLE001 - the bundles are safe; say how to publish later
        logger.warning("registry publish failed: %s", err)
        return {"message": f"registry not published ({type(err).__name__}: {str(err)[:300]}); run "
                           f"`mcpl registry build {out_root}` to publish", "pending": True}
    return report.to_dict()


def _summary(out_root: Path, outcomes: list[dict], rejected: list[dict], tracking: dict, registry: dict,
             started: float, batch_key: str, batch_run_id: str | None) -> dict:
    counts = {s: sum(1 for o in outcomes if o["status"] == s) for s in ("done", "skipped", "failed")}
    return {"out_root": str(out_root), "batch_key": batch_key, "mlflow_run_id": batch_run_id, "started": started,
            "finished": time.time(), "counts": {**counts, "jobs": len(outcomes), "rejected_rows": len(rejected)},
            "jobs": outcomes, "rejected": rejected, "tracking": tracking, "registry": registry}


def _render(summary: dict) -> str:
    c = summary["counts"]
    lines = [f"{c['jobs']} job(s): {c['done']} trained, {c['skipped']} already done, {c['failed']} failed; "
             f"{c['rejected_rows']} row(s) rejected at validation"]
    for o in summary["jobs"]:
        extra = f": {o.get('error')}" if o["status"] == "failed" else f" ({', '.join(o.get('concepts', []))})"
        lines.append(f"  {o['status']:<8} {o['job_id']} {','.join(o['images'])}{extra}")
    lines.append(summary["tracking"]["message"])
    lines.append(summary["registry"].get("message", ""))
    return "\n".join(lines)


def _log_summary(tracker, batch_key: str, summary: dict, out_root: Path, manifest: str) -> None:
    c = summary["counts"]
    tracker.log_metrics(batch_key, {"jobs_done": c["done"], "jobs_skipped": c["skipped"], "jobs_failed": c["failed"],
                                    "rows_rejected": c["rejected_rows"],
                                    "wall_seconds": summary["finished"] - summary["started"]})
    tracker.set_tags(batch_key, {"mcpl.outcome": "failed" if c["failed"] else "ok"})
    path = _write_json(out_root / "summary.json", summary)
    tracker.log_artifacts(batch_key, path)
    if Path(manifest).exists():
        tracker.log_artifacts(batch_key, manifest)
    tracker.end_run(batch_key, "FAILED" if c["failed"] else "FINISHED")


def _write_json(path: Path, data: dict) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path


def _prefect_artifact(summary: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    rows = ["| job | status | images | concepts / error |", "|---|---|---|---|"]
    for o in summary["jobs"]:
        detail = o.get("error") if o["status"] == "failed" else ", ".join(o.get("concepts", []))
        rows.append(f"| {o['job_id']} | {o['status']} | {', '.join(o['images'])} | {str(detail).replace('|', '/')} |")
    body = "\n".join(rows + ["", summary["tracking"]["message"], "", summary["registry"].get("message", "")])
    try:
        create_markdown_artifact(body, key="mcpl-batch-summary", description="mcpl batch outcome")
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
