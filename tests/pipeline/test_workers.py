"""Long-lived workers and packs: many jobs, each trained exactly once, the same results as one by one."""

from __future__ import annotations

import pytest
import torch
from helpers.servers import jobs_for, write_dataset
from safetensors.torch import load_file

from mcpl.config import RunOptions
from mcpl.pipeline.workers import plan_packs, run_batch

SENTENCE = "a photo of a red <dog|dog|red> on a <board|board>"
COLOURS = (("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green"))


@pytest.fixture(scope="module")
def four_jobs(tmp_path_factory, tiny_model):
    root = write_dataset(tmp_path_factory.mktemp("ds") / "four", [
        {"image": f"{i}.png", "colours": c, "sentence": SENTENCE} for i, c in enumerate(COLOURS)])
    return jobs_for(root, tiny_model)


def embeddings(out, job) -> dict:
    return load_file(str(out / "jobs" / job.job_id / "embeddings.safetensors"))


def test_packs_group_compatible_jobs_in_batch_order(four_jobs):
    odd = four_jobs[1].config.model_copy(update={"resolution": 24})
    mixed = [four_jobs[0], type(four_jobs[1])(**{**four_jobs[1].__dict__, "config": odd}), *four_jobs[2:]]
    packs = plan_packs(mixed, 2)
    assert [[s.job_id for s in p] for p in packs] == [[mixed[0].job_id, mixed[2].job_id], [mixed[1].job_id],
                                                       [mixed[3].job_id]]


@pytest.fixture(scope="module")
def one_by_one(four_jobs, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    summary = run_batch(four_jobs, out, RunOptions(samples=0, progress=False, threads=1), pack=1, log=False)
    assert summary.count("done") == 4
    return out


def test_two_workers_train_every_job_once_with_the_same_results(four_jobs, one_by_one, tmp_path):
    summary = run_batch(four_jobs, tmp_path, RunOptions(samples=0, progress=False, threads=1), workers=2, pack=1)
    assert summary.count("done") == 4 and not summary.failed
    assert len({o.pid for o in summary.jobs}) == 2  # two long-lived processes took the four jobs
    for job in four_jobs:
        a, b = embeddings(one_by_one, job), embeddings(tmp_path, job)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_batch(four_jobs, tmp_path, RunOptions(samples=0, progress=False), workers=2, pack=1)
    assert again.count("skipped") == 4


def test_packed_jobs_match_the_jobs_trained_one_by_one(four_jobs, one_by_one, tmp_path):
    summary = run_batch(four_jobs, tmp_path, RunOptions(samples=0, progress=False, threads=1), pack=4, log=False)
    assert summary.count("done") == 4
    for job in four_jobs:
        a, b = embeddings(one_by_one, job), embeddings(tmp_path, job)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_its_job_resumes(four_jobs, tmp_path, monkeypatch):
    victim = four_jobs[1]
    monkeypatch.setenv("MCPL_FAULT_AT_STEP", "3")
    monkeypatch.setenv("MCPL_FAULT_MODE", "kill")
    monkeypatch.setenv("MCPL_FAULT_JOBS", victim.job_id)
    summary = run_batch(four_jobs, tmp_path, RunOptions(samples=0, progress=False, threads=1), workers=2, pack=1,
                        log=False)
    assert summary.count("done") == 4, summary.render()
    outcome = next(o for o in summary.jobs if o.job_id == victim.job_id)
    assert outcome.resumed_from == 2 and outcome.first_step == 3
    assert (tmp_path / "jobs" / victim.job_id / ".fault-injected").exists()


def test_worker_lines_reach_the_parent_and_library_noise_does_not(four_jobs, tmp_path):
    """What a flow shows while a job trains on a worker: its start, step and end lines, nothing else."""
    from mcpl.pipeline.workers import WorkerPool, WorkerSetup

    lines: list[str] = []
    setup = WorkerSetup(str(tmp_path), RunOptions(samples=0, progress=False, threads=1).model_dump(), ["cpu"])
    with WorkerPool(1, setup, on_line=lines.append) as pool:
        outcomes = pool.run(four_jobs[:1], [(1, 4)])
    assert outcomes[0].status == "done"
    ours = four_jobs[0].job_id[:8]
    assert lines[0].startswith(f"[1/4] {ours} (row 1): training") and lines[-1].startswith(f"[1/4] {ours}: done in")
    assert all(ours in line for line in lines), lines


def test_default_packs_leave_no_worker_idle():
    from mcpl.pipeline.workers import pack_size

    assert pack_size(5, 1, None, "cpu") == 4  # one process: the CPU default
    assert pack_size(5, 2, None, "cpu") == 3  # two workers: 3 + 2, not 4 + 1
    assert pack_size(2, 2, None, "cpu") == 1
    assert pack_size(5, 2, 4, "cpu") == 4  # what the user asked for wins


def test_a_stale_restart_leaves_the_fresh_pool_alone(tmp_path):
    """Two flow tasks see the same broken pool; the second restart must not shut down the pool the
    first one just made (both packs then 'died twice' without ever running)."""
    from mcpl.pipeline.workers import WorkerPool, WorkerSetup

    pool = WorkerPool(2, WorkerSetup(str(tmp_path), RunOptions().model_dump(), ["cpu"]))
    broken = pool._pool()
    pool.restart(broken)  # the first task replaces it
    fresh = pool._pool()
    pool.restart(broken)  # the second task, late, with the same broken pool
    assert pool._pool() is fresh and fresh is not broken
    pool.close()
