"""Many jobs: packs of compatible jobs, run here or on long-lived worker processes.

`run_batch` is what `mcpl batch`, the DVC train stage and the Prefect flow run. It groups
the jobs into packs (jobs of one model and latent size share one UNet call per step, up
to `pack` of them) and runs them in this process, or on `workers` processes. A worker is
started once: it loads the model once and takes pack after pack (not a cold process per
job: imports and model loading cost more than training a toy job). On CPU each worker uses
one thread; with GPUs each worker is pinned to its own (CUDA_VISIBLE_DEVICES). A crash of
a worker (killed, out of memory) fails only the packs it held; the pool starts a new one.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from mcpl.config import RunOptions
from mcpl.job.bundle import JobOutcome
from mcpl.pipeline.data.jobs import JobSpec
from mcpl.pipeline.faults import FaultObserver
from mcpl.pipeline.progress import LogObserver
from mcpl.pipeline.report import BatchSummary
from mcpl.pipeline.runner import BatchRun, Observer, new_outcome, run_pack
from mcpl.pipeline.tracking.observer import MlflowObserver, TrackingSettings


def pack_key(spec: JobSpec) -> tuple:
    """Jobs with equal keys can share one UNet call: same model, latent size and attention layers."""
    c = spec.config
    return spec.model, c.resolution, tuple(c.attention_layers or ()), c.attention_downscale


def plan_packs(jobs: Sequence[JobSpec], pack: int) -> list[list[JobSpec]]:
    """Consecutive packs of at most `pack` compatible jobs, in the batch's order of first appearance."""
    groups: dict[tuple, list[JobSpec]] = {}
    for spec in jobs:
        groups.setdefault(pack_key(spec), []).append(spec)
    packs = [members[i:i + max(1, pack)] for members in groups.values() for i in range(0, len(members), max(1, pack))]
    order = {spec.job_id: i for i, spec in enumerate(jobs)}
    return sorted(packs, key=lambda p: order[p[0].job_id])


def default_pack(device: str | None) -> int:
    """How many jobs share a UNet call when the user does not say: 4 on CPU (a small gain there: a CPU step
    is mostly convolutions and matmuls that grow with the batch; benchmarks/results/throughput.json), and on
    a GPU as many as the memory budget allows (`pack_for_memory`), where one call per step pays most."""
    if device and device.startswith("cuda"):
        return pack_for_memory(device)
    return 4


def pack_size(jobs: int, workers: int, pack: int | None, device: str | None) -> int:
    """Jobs per pack: the user's `pack`, else `default_pack`, cut so that every worker gets work
    (5 jobs on 2 workers are packs of 3 + 2, not 4 + 1 with one worker idle half the time)."""
    if pack:
        return pack
    size = default_pack(device)
    return max(1, min(size, math.ceil(jobs / workers))) if workers > 1 else size


def pack_for_memory(device: str, per_job_gib: float | None = None, budget: float = 0.8) -> int:
    """Jobs per device from free memory: `budget` of the free memory over one job's peak (MCPL_JOB_GIB, else
    an estimate of 6 GiB: SD 1.5 at 512 px, batch 4, bf16 frozen parts); between 1 and 16."""
    import torch

    per_job = per_job_gib or float(os.environ.get("MCPL_JOB_GIB", "6"))
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, min(16, int(budget * free / 2**30 / per_job)))


# --------------------------------------------------------------------------- workers
@dataclass
class WorkerSetup:
    """What every worker process needs (picklable): where results go, how jobs run, how they are tracked."""

    out_root: str
    options: dict
    devices: list[str]
    tracking: dict | None = None
    model_hashes: dict[str, str] = field(default_factory=dict)  # computed once per batch, by the parent
    threads: int = 1
    log: bool = True
    messages: object = None  # a queue: progress lines go to the parent (e.g. a flow's log) instead of stderr


_WORKER: dict = {}


def _start_worker(setup: WorkerSetup, counter) -> None:
    """Initializer of a worker process: pin its device, set threads, note the batch's model hashes.
    A failure here breaks the pool without a reason of its own, so the reason is printed first."""
    try:
        _init_worker(setup, counter)
    except BaseException:
        import traceback

        print(f"mcpl worker {os.getpid()} failed to start:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise


def _init_worker(setup: WorkerSetup, counter) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    device = setup.devices[index % len(setup.devices)]
    if device.startswith("cuda"):
        os.environ["CUDA_VISIBLE_DEVICES"], device = device.partition(":")[2] or "0", "cuda:0"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["MCPL_WORKER_NAME"] = f"{os.environ.get('MCPL_WORKER_NAME') or socket.gethostname()}-w{index}"
    import torch

    torch.set_num_threads(max(1, setup.threads))
    from mcpl.method import model_files

    for model, digest in setup.model_hashes.items():
        model_files.remember_hash(model, digest)
    _WORKER.update(setup=setup, device=device, components={})


def _say(line: str) -> None:
    messages = _WORKER["setup"].messages
    if messages is not None:
        messages.put(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _run_in_worker(specs: list[dict], positions: list[tuple[int, int]]) -> list[dict]:
    """One pack on this worker's model (loaded on first use, then kept)."""
    from mcpl.method.models import load_components

    setup: WorkerSetup = _WORKER["setup"]
    device = _WORKER["device"]
    jobs = [JobSpec.from_dict(s) for s in specs]
    model = jobs[0].model
    observers: list[Observer] = [FaultObserver(allow_kill=True)]
    if setup.log:
        observers.insert(0, LogObserver(_say))
    if setup.tracking:
        observers.append(MlflowObserver.joining(TrackingSettings.from_dict(setup.tracking)))
    options = RunOptions(**{**setup.options, "device": device})
    try:
        if model not in _WORKER["components"]:
            _WORKER["components"][model] = load_components(model, device)
        components = _WORKER["components"][model]
    except Exception as err:  # the model does not load here: every job of the pack fails with the reason
        return [_model_failure(spec, setup.out_root, err).to_dict() for spec in jobs]
    return [o.to_dict() for o in run_pack(jobs, setup.out_root, options, observers, components=components,
                                          positions=positions)]


def _model_failure(spec: JobSpec, out_root: str, err: Exception) -> JobOutcome:
    outcome = new_outcome(spec, out_root)
    outcome.error = f"{type(err).__name__}: {err}"
    return outcome


class WorkerPool:
    """`workers` long-lived processes; `submit(pack)` returns a future of the pack's outcomes.

    `on_line`: where the workers' progress lines go (e.g. a Prefect run logger); default stderr.
    """

    def __init__(self, workers: int, setup: WorkerSetup, on_line: Callable[[str], None] | None = None) -> None:
        self.workers, self.setup = max(1, workers), setup
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._counters: list = []  # one worker counter per pool made (see _pool)
        self._manager = self._listener = None
        if on_line is not None:
            self._manager = multiprocessing.get_context("spawn").Manager()
            self.setup.messages = self._manager.Queue()
            self._listener = threading.Thread(target=self._forward, args=(self.setup.messages, on_line), daemon=True)
            self._listener.start()

    @staticmethod
    def _forward(messages, on_line: Callable[[str], None]) -> None:
        while (line := messages.get()) is not None:
            on_line(line)

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                context = multiprocessing.get_context("spawn")  # no fork of a process holding threads or CUDA
                # Kept for the pool object's life: a worker spawned late (or after a restart elsewhere) must still
                # find the counter's semaphore (a collected Value unlinks it: FileNotFoundError in the child).
                self._counters.append(context.Value("i", 0))
                self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                                     initargs=(self.setup, self._counters[-1]))
            return self._executor

    def submit(self, pack: Sequence[JobSpec], positions: Sequence[tuple[int, int]]) -> Future:
        args = ([s.to_dict() for s in pack], list(positions))
        executor = self._pool()
        try:
            future = executor.submit(_run_in_worker, *args)
        except BrokenProcessPool:
            self.restart(executor)
            executor = self._pool()
            future = executor.submit(_run_in_worker, *args)
        future.mcpl_executor = executor  # which pool to replace if this future breaks
        return future

    def run(self, pack: Sequence[JobSpec], positions: Sequence[tuple[int, int]]) -> list[JobOutcome]:
        """Run a pack and wait. If a worker dies, the pool starts anew and the pack is tried once more
        (it resumes from its checkpoints); a second death fails it with the reason."""
        for attempt in range(2):
            outcomes = outcomes_of(self.submit(pack, positions), pack, self.setup.out_root, self, final=attempt == 1)
            if outcomes is not None:
                return outcomes
        raise AssertionError("unreachable")

    def restart(self, broken: ProcessPoolExecutor | None = None) -> None:
        """Drop the pool (`broken`: only if it is still the current one). Packs run from several threads
        (a flow's tasks): each sees the same broken pool, and the first to restart it must not have its
        fresh pool shut down by the next."""
        with self._lock:
            if self._executor is not None and (broken is None or self._executor is broken):
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._listener is not None:
            self.setup.messages.put(None)
            self._listener.join(10)
            self._manager.shutdown()
            self._listener = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def outcomes_of(future: Future, pack: Sequence[JobSpec], out_root: str, pool: WorkerPool,
                final: bool = True) -> list[JobOutcome] | None:
    """The pack's outcomes; None when a worker died and the pack should be tried again (not `final`).

    A dying worker breaks every future of the pool, so each pack it held or queued is retried
    once on a fresh pool; the retry resumes from the pack's checkpoints.
    """
    try:
        return [JobOutcome.from_dict(d) for d in future.result()]
    except BrokenProcessPool:
        pool.restart(getattr(future, "mcpl_executor", None))
        if not final:
            return None
        return [_model_failure(s, out_root, RuntimeError("its worker process died twice (killed, or out of "
                                                          "memory); rerun to resume from its last checkpoint"))
                for s in pack]


# ----------------------------------------------------------------------------- batch
def run_batch(jobs: Sequence[JobSpec], out_root: str | Path, options: RunOptions | None = None,
              observers: Sequence[Observer] = (), *, workers: int = 1, pack: int | None = None,
              devices: Sequence[str] | None = None, tracking: Callable[[], dict | None] | None = None,
              log: bool = True, **context) -> BatchSummary:
    """Run every job of a batch; never stops at a failing job.

    `workers` 1: in this process, one model load for the whole batch. More: long-lived worker
    processes (`devices`: one entry per worker, default every visible GPU, else CPU). `pack`:
    jobs per UNet call (default: `default_pack`). `observers` see the batch here; in workers
    each job is logged (`log`) and tracked (`tracking()` gives TrackingSettings after the
    batch started) from the worker.
    """
    options = options or RunOptions()
    batch = BatchRun(jobs, out_root, options, observers, **context).start()
    size = pack_size(len(jobs), workers, pack, options.device or (devices[0] if devices else None))
    packs = plan_packs(list(jobs), size)
    position = {spec.job_id: (i, len(jobs)) for i, spec in enumerate(jobs, start=1)}
    if workers <= 1:
        loaded: dict[str, object] = {}
        for group in packs:
            components = _load_once(loaded, group[0].model, options)
            if isinstance(components, Exception):
                for spec in group:
                    batch.record(_model_failure(spec, str(batch.context.out_root), components))
                continue
            for outcome in run_pack(group, batch.context.out_root, options, batch.observers,
                                    components=components, positions=[position[s.job_id] for s in group]):
                batch.record(outcome)
        return batch.finish()
    from mcpl.method.model_files import model_hash

    setup = WorkerSetup(str(batch.context.out_root), options.model_dump(), list(devices or _visible(workers)),
                        tracking() if tracking else None, {s.model: model_hash(s.model) for s in jobs},
                        threads=options.threads or 1, log=log)
    with WorkerPool(workers, setup) as pool:
        for outcomes in _as_done(pool, packs, position):
            for outcome in outcomes:
                batch.record(outcome)
    return batch.finish()


def _load_once(loaded: dict, model: str, options: RunOptions):
    from mcpl.method.models import load_components

    if model not in loaded:
        try:
            loaded[model] = load_components(model, options.device)
        except Exception as err:  # every job on this model fails with the reason; others go on
            loaded[model] = err
    return loaded[model]


def _visible(workers: int) -> list[str]:
    import torch

    gpus = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(gpus)] if gpus else ["cpu"] * workers


def _as_done(pool: WorkerPool, packs: list[list[JobSpec]], position: dict) -> Iterator[list[JobOutcome]]:
    """Keep every worker busy (a queue of packs), yield each pack's outcomes as it finishes."""
    queue = [(group, 0) for group in packs]
    running: dict[Future, tuple[list[JobSpec], int]] = {}
    while queue or running:
        while queue and len(running) < pool.workers * 2:  # one waiting behind each running pack
            group, attempt = queue.pop(0)
            running[pool.submit(group, [position[s.job_id] for s in group])] = (group, attempt)
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for future in done:
            group, attempt = running.pop(future)
            outcomes = outcomes_of(future, group, pool.setup.out_root, pool, final=attempt >= 1)
            if outcomes is None:
                queue.insert(0, (group, attempt + 1))
                continue
            yield outcomes


__all__ = ["WorkerPool", "WorkerSetup", "default_pack", "pack_for_memory", "plan_packs", "run_batch"]
