"""The Prefect flow against real Prefect and MLflow servers on 127.0.0.1.

Proves: `prefect deployment run mcpl/batch` on a served deployment trains every job and
fills MLflow (parent + nested runs, curves, images, lineage) and the registry; a re-run
adds no versions; a job crashed mid-training resumes from its checkpoint on retry; a bad
row fails only its job; MLflow dying mid-batch loses nothing; two work-pool workers share
a batch's jobs (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.servers import BIN, REPO, stop_process, write_dataset

pytest_plugins = ("helpers.server_fixtures",)

FAST_PARAMS = {"steps": 4, "samples": 1, "sample_steps": 2, "threads": 1,
               "overrides": {"batch_size": 2, "checkpoint_every": 2, "map_timesteps": 2}}
SENTENCE = "a photo of a red <dog|dog|red> on a <board|board>"


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(client, batch_run_id: str) -> list:
    exp = client.get_run(batch_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{batch_run_id}'")


def versions(client) -> dict[str, int]:
    return {m.name: len(client.search_model_versions(f"name = '{m.name}'")) for m in client.search_registered_models()}


def run_flow(**params):
    """The flow in this process (against the test Prefect server); returns (state, summary)."""
    from flows.batch import batch

    state = batch(**{**FAST_PARAMS, **params}, return_state=True)
    return state, state.result(raise_on_failure=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two single images and one MCPL-diverse group of two: three jobs."""
    return write_dataset(tmp_path_factory.mktemp("flowdata") / "toy", [
        {"image": "a.png", "colours": ("red", "blue"), "sentence": SENTENCE},
        {"image": "b.png", "colours": ("red", "green"), "sentence": SENTENCE},
        {"image": "g1.png", "colours": ("yellow", "blue"), "sentence": "a <cat|cat> and a <dog|dog>", "group": "pair"},
        {"image": "g2.png", "colours": ("yellow", "green"), "sentence": "a <cat|cat> on a <board|board>",
         "group": "pair"}])


@pytest.fixture(scope="module")
def served(servers, tmp_path_factory):
    """`python -m flows.serve`: the deployment mcpl/batch, served from a child process."""
    prefect, mlflow = servers
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, **prefect.client_env, "MLFLOW_TRACKING_URI": mlflow.uri}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=str(REPO), env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "is being served" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield env
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def first_batch(served, dataset, tmp_path_factory, tiny_model, mlflow_server):
    """What a user types: `prefect deployment run mcpl/batch --params ... --watch`."""
    out = tmp_path_factory.mktemp("batch") / "out"
    params = {**FAST_PARAMS, "dataset": str(dataset), "model": tiny_model, "out": str(out)}
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "mcpl/batch", "--params", json.dumps(params),
                           "--watch", "--watch-timeout", "400"], env=served, capture_output=True, text=True,
                          timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Completed" in done.stdout
    return {"out": out, "summary": json.loads((out / "summary.json").read_text()), "model": tiny_model,
            "dataset": dataset}


def test_deployment_run_trains_tracks_and_registers(first_batch, mlflow_server):
    summary = first_batch["summary"]
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 0, "jobs": 3, "rejected_rows": 0}
    assert summary["tracking"]["pending"] == 0 and summary["registry"]["snapshot_changed"]
    client = mlflow_client(mlflow_server.uri)

    batch_run = client.get_run(summary["mlflow_run_id"])
    tags = batch_run.data.tags
    assert tags["mcpl.kind"] == "batch" and tags["mcpl.dataset"] == "toy" and tags["mcpl.strategy"] == "one"
    assert len(tags["mcpl.dataset_hash"]) == 16 and tags["mcpl.base_model_hash"] and tags["mcpl.git_rev"]
    assert batch_run.data.metrics["jobs_done"] == 3 and batch_run.info.status == "FINISHED"
    assert "summary.json" in {f.path for f in client.list_artifacts(batch_run.info.run_id)}

    jobs = runs_of(client, batch_run.info.run_id)
    assert len(jobs) == 3 and all(r.info.status == "FINISHED" for r in jobs)
    for run in jobs:
        assert run.data.tags["mcpl.kind"] == "job" and run.data.params["config.steps"] == "4"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
        assert {"train_seconds", "wall_seconds", "final_loss"} <= set(run.data.metrics)
        files = {f.path for f in client.list_artifacts(run.info.run_id, "attention")}
        assert "attention/image_0.png" in files
        assert any(f.path.endswith(".png") for f in client.list_artifacts(run.info.run_id, "samples"))
    diverse = next(r for r in jobs if r.data.tags["mcpl.group"] == "pair")
    assert diverse.data.params["config.strategy"] == "diverse"

    registered = versions(client)
    expected = {"toy.images-a.dog", "toy.images-a.board", "toy.images-b.dog", "toy.images-b.board",
                "toy.pair.cat", "toy.pair.dog", "toy.pair.board", "mcpl-registry"}
    assert expected <= set(registered) and all(registered[n] == 1 for n in expected)
    version = client.get_model_version("toy.images-a.dog", "1")
    assert version.tags["adjective"] == "red" and version.tags["token"] == "<dog>"
    assert version.run_id in {r.info.run_id for r in jobs}
    run_files = {f.path for f in client.list_artifacts(version.run_id, "concepts/dog")}
    assert {"concepts/dog/overlay.png", "concepts/dog/sample.png"} <= run_files


def test_rerun_skips_jobs_and_adds_no_versions(first_batch, prefect_api, mlflow_server):
    client = mlflow_client(mlflow_server.uri)
    before = versions(client)
    state, summary = run_flow(dataset=str(first_batch["dataset"]), model=first_batch["model"],
                              out=str(first_batch["out"]), tracking_uri=mlflow_server.uri)
    assert state.is_completed(), state.message
    assert summary["counts"]["skipped"] == 3 and summary["counts"]["done"] == 0
    assert summary["registry"]["created"] == [] and not summary["registry"]["snapshot_changed"]
    assert versions(client) == before


def read_task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_crashed_job_retry_resumes_from_checkpoint(tmp_path, tiny_model, prefect_api, mlflow_server, monkeypatch):
    data = write_dataset(tmp_path / "one", [{"image": "r.png", "colours": ("blue", "red"), "sentence": SENTENCE}])
    monkeypatch.setenv("MCPL_FAULT_AT_STEP", "3")  # crash once at step 3; checkpoints every 2 steps
    state, summary = run_flow(dataset=str(data), model=tiny_model, out=str(tmp_path / "out"), retries=1,
                              tracking_uri=mlflow_server.uri)
    assert state.is_completed(), state.message
    job = summary["jobs"][0]
    assert job["status"] == "done" and job["resumed_from"] == 2 and job["first_step"] == 3
    task_runs = [t for t in read_task_runs(state.state_details.flow_run_id) if t.name.startswith("job-")]
    assert len(task_runs) == 1 and task_runs[0].run_count == 2  # one task, two attempts
    run = mlflow_client(mlflow_server.uri).get_run(job["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mcpl.resumed_from_step"] == "2"


def test_bad_row_fails_only_its_job(tmp_path, tiny_model, prefect_api, mlflow_server):
    from mcpl.pipeline.data import validate_dataset

    data = write_dataset(tmp_path / "mixed", [
        {"image": "good.png", "colours": ("green", "red"), "sentence": SENTENCE},
        {"image": "bad.png", "colours": ("blue", "yellow"), "sentence": SENTENCE}])
    manifest = validate_dataset(data, tmp_path / "manifest.parquet", tiny_model).manifest
    (data / "images" / "bad.png").write_bytes(b"not an image any more")  # broken after validation
    state, summary = run_flow(manifest=str(manifest), model=tiny_model, out=str(tmp_path / "out"), retries=1,
                              tracking_uri=mlflow_server.uri)
    assert state.is_failed() and "1 failed" in state.message
    by_image = {j["images"][0]: j for j in summary["jobs"]}
    assert by_image["images/good.png"]["status"] == "done"
    assert by_image["images/bad.png"]["status"] == "failed" and "bad.png" in by_image["images/bad.png"]["error"]
    client = mlflow_client(mlflow_server.uri)
    assert client.get_registered_model("mixed.images-good.dog")
    failed = client.get_run(by_image["images/bad.png"]["run_id"])
    assert failed.info.status == "FAILED" and "bad.png" in failed.data.tags["mcpl.error"]


def test_mlflow_down_mid_batch_loses_nothing(tmp_path, dataset, tiny_model, prefect_api, mlflow_server):
    out = tmp_path / "out"

    def kill_after_first_job():
        deadline = time.time() + 300
        while time.time() < deadline and not list((out / "jobs").glob("*/job.json")):
            time.sleep(0.05)
        mlflow_server.kill()

    killer = threading.Thread(target=kill_after_first_job, daemon=True)
    killer.start()
    try:
        state, summary = run_flow(dataset=str(dataset), model=tiny_model, out=str(out),
                                  tracking_uri=mlflow_server.uri, overrides={**FAST_PARAMS["overrides"], "seed": 7})
        killer.join(10)
        assert state.is_completed(), state.message  # training is unaffected
        assert summary["counts"]["done"] == 3
        tracking = summary["tracking"]
        assert not tracking["online"] and tracking["pending"] > 0 and "unreachable" in tracking["message"]
        assert summary["registry"].get("pending") and "mcpl registry build" in summary["registry"]["message"]
        assert "unreachable" in state.message
    finally:
        if mlflow_server.proc is None:
            mlflow_server.start()

    from mcpl.cli import main

    assert main(["registry", "--tracking-uri", mlflow_server.uri, "build", str(out)]) == 0
    assert not list((out / "mlflow-spool" / "ops").glob("*.jsonl"))
    client = mlflow_client(mlflow_server.uri)
    batch_run = client.get_run(summary["mlflow_run_id"] or _id(out, summary["batch_key"]))
    assert batch_run.info.status == "FINISHED" and batch_run.data.metrics["jobs_done"] == 3
    jobs = runs_of(client, batch_run.info.run_id)
    assert len(jobs) == 3 and all(r.info.status == "FINISHED" for r in jobs)
    for run in jobs:
        assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == [1, 2, 3, 4]
        assert "attention/image_0.png" in {f.path for f in client.list_artifacts(run.info.run_id, "attention")}
    seeded = {v.run_id for name in versions(client) for v in client.search_model_versions(f"name = '{name}'")}
    assert {r.info.run_id for r in jobs} <= seeded  # every job's concepts got a registry version


def _id(out: Path, key: str) -> str:
    return (out / "mlflow-spool" / "ids" / key).read_text().strip()


@pytest.mark.slow
def test_killed_job_process_resumes(tmp_path, tiny_model, prefect_api, mlflow_server, monkeypatch):
    """Side by side (2 CPU slots), each job runs on a worker process; SIGKILL one mid-training."""
    from mcpl.pipeline.data import load_jobs, validate_dataset

    data = write_dataset(tmp_path / "two", [
        {"image": "p.png", "colours": ("red", "yellow"), "sentence": SENTENCE},
        {"image": "q.png", "colours": ("green", "blue"), "sentence": SENTENCE}])
    manifest = validate_dataset(data, tmp_path / "manifest.parquet", tiny_model).manifest
    from flows.batch import batch_source

    base = batch_source(steps=4, overrides=FAST_PARAMS["overrides"]).base()  # what the flow will train
    victim = next(j for j in load_jobs(manifest, base, tiny_model) if j.images == ["images/p.png"])
    monkeypatch.setenv("MCPL_FAULT_AT_STEP", "3")
    monkeypatch.setenv("MCPL_FAULT_MODE", "kill")
    monkeypatch.setenv("MCPL_FAULT_JOBS", victim.job_id)
    state, summary = run_flow(manifest=str(manifest), model=tiny_model, out=str(tmp_path / "out"), retries=1,
                              cpu_concurrency=2, tracking_uri=mlflow_server.uri)
    assert state.is_completed(), state.message
    jobs = {j["job_id"]: j for j in summary["jobs"]}
    assert jobs[victim.job_id]["resumed_from"] == 2 and jobs[victim.job_id]["first_step"] == 3
    assert len({j["pid"] for j in jobs.values()}) == 2  # two processes
    assert (tmp_path / "out" / "jobs" / victim.job_id / ".fault-injected").exists()


@pytest.mark.slow
def test_two_workers_share_a_batch(tmp_path, dataset, tiny_model, prefect_server, prefect_api, mlflow_server):
    """executor='workers': each job is a child flow run of mcpl-job/job in a process work pool."""
    from flows.serve import register_job_deployment

    pool = "mcpl-test-pool"
    register_job_deployment(pool, {"HF_HUB_OFFLINE": "1"})
    workers = []
    for name in ("w1", "w2"):
        log = open(tmp_path / f"{name}.log", "w")
        env = {**os.environ, **prefect_server.client_env, "MCPL_WORKER_NAME": name,
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
        workers.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1",
                                         "--name", name], env=env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=str(REPO), start_new_session=True))
    try:
        state, summary = run_flow(dataset=str(dataset), model=tiny_model, out=str(tmp_path / "out"),
                                  executor="workers", job_deployment="mcpl-job/job", tracking_uri=mlflow_server.uri)
        assert state.is_completed(), state.message
        assert summary["counts"]["done"] == 3
        assert {j["worker"] for j in summary["jobs"]} == {"w1", "w2"}
    finally:
        for proc in workers:
            stop_process(proc)
