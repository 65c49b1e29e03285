"""MLflow tracking that never loses a training result.

Every MLflow call goes through `Tracker`, which addresses runs by a local *key* (e.g.
`batch-<id>`, `batch-<id>.job-<job_id>`) instead of a server run id. While MLflow answers,
calls go straight through (with a few quick retries). When it does not, the call is
appended to an on-disk spool (`<spool>/ops/<key>.jsonl`) and the tracker goes offline;
every later call for that key is spooled too, so the order of a run's history is kept.
`replay()` applies spooled calls in order once MLflow is back (a run created offline gets
its real id then, and its children are re-parented through the key -> id map in
`<spool>/ids/`). Artifacts are spooled by path: they are the job bundle's own files,
which stay on disk. The spool is plain JSON lines, so any process that shares the folder
(another worker, a later `mcpl registry build`) can replay it.

Nothing here imports Prefect: the flow, the CLI and tests all use the same tracker.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mcpl"
# Fail fast instead of MLflow's default 7 retries with exponential back-off (minutes per call):
# the spool is our retry, so a dead server should cost seconds, not the batch's time.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow errors that a retry cannot fix: such a call is dropped (and counted), never spooled.
PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "PERMISSION_DENIED",
                   "UNAUTHENTICATED", "INVALID_STATE"}
LOSS_KEYS = ("loss", "noise_loss", "cl_loss", "lr", "mask_fraction")


def resolve_tracking_uri(uri: str | None = None, root: str | Path | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite store `<root or cwd>/mlflow.db`."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(root) if root else Path.cwd()).resolve() / 'mlflow.db'}"


def safe_key(text: str) -> str:
    """A run key usable as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:200]


def git_revision(repo: str | Path | None = None) -> str:
    """`<sha>` or `<sha>-dirty` of the code that ran; `unknown` outside a git checkout."""
    cwd = str(repo or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """Get or create the experiment. With a SQLite store the artifacts go beside the database
    (`<db folder>/mlruns`), not into whatever folder the process happens to run in."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = client.tracking_uri
    if artifact_location is None and uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlruns" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location)
    except Exception as err:  # another process created it first
        if not is_permanent(err):
            raise
        return client.get_experiment_by_name(name).experiment_id


def is_permanent(err: BaseException) -> bool:
    code = getattr(err, "error_code", None)
    return isinstance(code, str) and code in PERMANENT_CODES


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------------------ spool
class Spool:
    """Ordered per-key operation logs plus the key -> run id map, safe across processes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "ops").mkdir(parents=True, exist_ok=True)
        (self.root / "ids").mkdir(parents=True, exist_ok=True)

    def _ops(self, key: str) -> Path:
        return self.root / "ops" / f"{key}.jsonl"

    def _cursor(self, key: str) -> Path:
        return self.root / "ops" / f"{key}.done"

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        with open(self.root / "ops" / f"{key}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def append(self, key: str, op: dict) -> None:
        with self.locked(key), open(self._ops(key), "a") as fh:
            fh.write(json.dumps(op) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def pending(self, key: str) -> list[dict]:
        """Ops of `key` not yet applied, in order."""
        path = self._ops(key)
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        cursor = self._cursor(key)
        done = int(cursor.read_text() or 0) if cursor.exists() else 0
        return lines[done:]

    def mark_done(self, key: str, count: int) -> None:
        """Record that `count` more ops of `key` were applied; drop the log once all are."""
        cursor = self._cursor(key)
        done = (int(cursor.read_text() or 0) if cursor.exists() else 0) + count
        total = sum(1 for line in self._ops(key).read_text().splitlines() if line.strip())
        if done >= total:
            self._ops(key).unlink(missing_ok=True)
            cursor.unlink(missing_ok=True)
        else:
            cursor.write_text(str(done))

    def keys(self) -> list[str]:
        """Keys with pending ops; batch (parent) keys sort before their jobs' keys."""
        return sorted((p.stem for p in (self.root / "ops").glob("*.jsonl")), key=lambda k: (k.count("."), k))

    def count(self) -> int:
        return sum(len(self.pending(k)) for k in self.keys())

    def run_id(self, key: str) -> str | None:
        path = self.root / "ids" / key
        return path.read_text().strip() or None if path.exists() else None

    def set_run_id(self, key: str, run_id: str) -> None:
        tmp = self.root / "ids" / f".{key}.{os.getpid()}"
        tmp.write_text(run_id)
        tmp.replace(self.root / "ids" / key)


# ---------------------------------------------------------------------------- tracker
@dataclass
class TrackingStatus:
    """What happened to the logs: the batch summary reports it."""

    uri: str
    online: bool
    spooled: int = 0  # calls written to the spool by this tracker
    replayed: int = 0  # spooled calls applied later
    dropped: list[str] = field(default_factory=list)  # calls MLflow rejected for good
    pending: int = 0  # calls still in the spool
    spool_dir: str = ""
    errors: list[str] = field(default_factory=list)

    def message(self) -> str:
        if not self.spooled and not self.pending:
            return f"MLflow at {self.uri}: all logs written"
        if self.pending:
            return (f"MLflow at {self.uri} was unreachable: {self.spooled} log call(s) spooled, {self.replayed} "
                    f"replayed, {self.pending} still pending in {self.spool_dir}; nothing is lost: run "
                    f"`mcpl registry build <out>` when MLflow is back to replay them")
        return (f"MLflow at {self.uri} was unreachable for a while: {self.spooled} log call(s) were spooled "
                f"and all were replayed")

    def to_dict(self) -> dict:
        return {**self.__dict__, "message": self.message()}


class Tracker:
    """MLflow client by run key, with spool-and-replay when MLflow is unreachable. Thread-safe."""

    def __init__(self, uri: str | None = None, spool_dir: str | Path = "mlflow-spool",
                 experiment: str = DEFAULT_EXPERIMENT, probe_every: float = 15.0,
                 artifact_location: str | None = None) -> None:
        from mlflow import MlflowClient

        for name, value in QUICK_HTTP.items():
            os.environ.setdefault(name, value)
        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.spool = Spool(spool_dir)
        self.probe_every = probe_every
        self._experiment_id: str | None = None
        self._lock = threading.RLock()
        self._offline_since: float | None = None
        self._last_probe = 0.0
        self.status = TrackingStatus(self.uri, online=True, spool_dir=str(self.spool.root))

    # ------------------------------------------------------------------ public calls
    def start_run(self, key: str, name: str, tags: dict[str, str] | None = None, parent: str | None = None) -> None:
        """Create the run for `key`, or reopen it if it exists (a retried job continues its run)."""
        if self.spool.run_id(key) or any(op["op"] == "create_run" for op in self.spool.pending(key)):
            self._call(key, {"op": "reopen", "tags": tags or {}})
        else:
            self._call(key, {"op": "create_run", "name": name, "tags": tags or {}, "parent": parent,
                             "start": now_ms()})

    def log_params(self, key: str, params: dict[str, Any]) -> None:
        if params:
            self._call(key, {"op": "log_batch", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def set_tags(self, key: str, tags: dict[str, Any]) -> None:
        if tags:
            self._call(key, {"op": "log_batch", "tags": {k: str(v)[:8000] for k, v in tags.items()}})

    def log_metrics(self, key: str, metrics: dict[str, float], step: int | None = None) -> None:
        rows = [[k, float(v), now_ms(), int(step or 0)] for k, v in metrics.items() if _finite(v)]
        if rows:
            self._call(key, {"op": "log_batch", "metrics": rows})

    def log_metric_rows(self, key: str, rows: list[list]) -> None:
        """[[name, value, timestamp_ms, step], ...] in one call (a loss curve)."""
        rows = [r for r in rows if _finite(r[1])]
        for start in range(0, len(rows), 900):  # MLflow takes at most 1000 metrics per batch
            self._call(key, {"op": "log_batch", "metrics": rows[start:start + 900]})

    def log_artifacts(self, key: str, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a folder; spooled by path (the files must stay where they are)."""
        self._call(key, {"op": "log_artifacts", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def end_run(self, key: str, status: str = "FINISHED") -> None:
        self._call(key, {"op": "end_run", "status": status, "end": now_ms()})

    def run_id(self, key: str) -> str | None:
        return self.spool.run_id(key)

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.client, self.experiment, self.artifact_location)
        return self._experiment_id

    def replay(self) -> int:
        """Apply spooled calls in order; stop at the first that fails again. Returns how many applied."""
        applied = 0
        with self._lock:
            for key in self.spool.keys():
                with self.spool.locked(key):
                    ops = self.spool.pending(key)
                    done = 0
                    try:
                        for op in ops:
                            self._apply_or_drop(key, op)
                            done += 1
                    except Exception as err:
                        self.spool.mark_done(key, done)
                        applied += done
                        self._go_offline(err)
                        self.status.replayed += applied
                        return applied
                    self.spool.mark_done(key, done)
                    applied += done
            self.status.replayed += applied
            if self._offline_since is not None:
                log.warning("MLflow at %s is back: %d spooled call(s) replayed", self.uri, applied)
            self._offline_since = None
            self.status.online = True
        return applied

    def finish(self) -> TrackingStatus:
        """Last replay attempt; the status says whether anything is still spooled."""
        if self.spool.keys():
            try:
                self.replay()
            except Exception as err:  # pragma: no cover - replay already catches
                self.status.errors.append(str(err))
        self.status.pending = self.spool.count()
        return self.status

    # --------------------------------------------------------------------- internals
    def _call(self, key: str, op: dict) -> None:
        with self._lock:
            if self._offline_since is not None and time.time() - self._last_probe > self.probe_every:
                self._last_probe = time.time()
                try:
                    self.replay()
                except Exception as err:  # noqa: BLE001 - stay offline
                    self._go_offline(err)
            if self._offline_since is not None or self.spool.pending(key):
                self._spool(key, op)
                return
            try:
                self._apply_or_drop(key, op)
            except Exception as err:
                self._go_offline(err)
                self._spool(key, op)

    def _spool(self, key: str, op: dict) -> None:
        self.spool.append(key, op)
        self.status.spooled += 1

    def _go_offline(self, err: BaseException) -> None:
        if self._offline_since is None:
            self._offline_since = self._last_probe = time.time()
            log.warning("MLflow at %s is unreachable (%s); spooling logs to %s and replaying them when it "
                        "is back", self.uri, str(err).splitlines()[0][:200], self.spool.root)
            self.status.errors.append(str(err).splitlines()[0][:300])
        self.status.online = False

    def _apply_or_drop(self, key: str, op: dict) -> None:
        try:
            self._apply(key, op)
        except Exception as err:
            if not is_permanent(err):
                raise
            message = f"{key}: {op['op']} rejected by MLflow: {str(err)[:300]}"
            log.warning(message)
            self.status.dropped.append(message)

    def _apply(self, key: str, op: dict) -> None:
        kind = op["op"]
        if kind == "create_run":
            if self.spool.run_id(key):  # created before a crash cut the replay short: do not duplicate it
                return
            tags = dict(op["tags"])
            if op.get("parent"):
                parent_id = self.spool.run_id(op["parent"])
                if parent_id is None:
                    raise RuntimeError(f"parent run {op['parent']} not created yet")
                tags["mlflow.parentRunId"] = parent_id
            run = self.client.create_run(self.experiment_id(), start_time=op["start"], tags=tags,
                                         run_name=op["name"])
            self.spool.set_run_id(key, run.info.run_id)
            return
        run_id = self.spool.run_id(key)
        if run_id is None:
            raise RuntimeError(f"no run for key {key}")
        if kind == "reopen":
            self.client.update_run(run_id, status="RUNNING")
            if op.get("tags"):
                self._log_batch(run_id, {"tags": op["tags"]})
        elif kind == "log_batch":
            self._log_batch(run_id, op)
        elif kind == "log_artifacts":
            path = Path(op["path"])
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), op.get("artifact_path"))
            elif path.is_file():
                self.client.log_artifact(run_id, str(path), op.get("artifact_path"))
            else:
                log.warning("%s: artifact %s no longer exists; skipped", key, path)
        elif kind == "end_run":
            self.client.set_terminated(run_id, status=op["status"], end_time=op["end"])
        else:
            raise ValueError(f"unknown spooled op {kind!r}")

    def _log_batch(self, run_id: str, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])],
            params=[Param(k, v) for k, v in op.get("params", {}).items()],
            tags=[RunTag(k, v) for k, v in op.get("tags", {}).items()])


def _finite(value: object) -> bool:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return v == v and abs(v) != float("inf")


# -------------------------------------------------------------------- train callback
class MlflowCallback:
    """A `TrainCallback` that streams the loss curve to a run and notes where training resumed."""

    def __init__(self, tracker: Tracker, key: str, flush_every: int = 25, flush_seconds: float = 10.0) -> None:
        self.tracker = tracker
        self.key = key
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.rows: list[list] = []
        self.first_step: int | None = None
        self.last_checkpoint: int | None = None
        self._last_flush = time.time()

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if self.first_step is None:
            self.first_step = step
            self.tracker.set_tags(self.key, {"mcpl.resumed_from_step": step - 1})
        ts = now_ms()
        self.rows += [[k, float(logs[k]), ts, step] for k in LOSS_KEYS if k in logs]
        if len(self.rows) >= self.flush_every * len(LOSS_KEYS) or time.time() - self._last_flush > self.flush_seconds:
            self.flush()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.last_checkpoint = step
        self.flush()
        self.tracker.set_tags(self.key, {"mcpl.last_checkpoint_step": step})

    def flush(self) -> None:
        rows, self.rows = self.rows, []
        self._last_flush = time.time()
        if rows:
            self.tracker.log_metric_rows(self.key, rows)


# ------------------------------------------------------------------ job record -> run
def flatten(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    """Nested dicts to dotted keys (`metrics.image_0.<dog>.iou`)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(f"{prefix}.{k}" if prefix else str(k), v)
    else:
        yield prefix, value


def metric_name(name: str) -> str:
    """MLflow metric names allow only alphanumerics, `_ - . / :` and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "", name)


def job_params(record: dict) -> dict[str, Any]:
    """Everything that defines the job, as flat params."""
    params = {f"config.{k}": v for k, v in flatten("", record.get("config", {}))}
    params.update({"base_model": record.get("base_model"), "strategy": record.get("strategy"),
                   "job_id": record.get("job_id"), "learning_rate": record.get("learning_rate"),
                   "attention_layers": ",".join(record.get("attention_layers", [])),
                   "concepts": ",".join(c["token"] for c in record.get("concepts", [])),
                   "images": ",".join(i.get("source", "") for i in record.get("images", []))})
    for i, image in enumerate(record.get("images", [])):
        params[f"sentence.{i}"] = image.get("sentence", "")
    return {k: v for k, v in params.items() if v is not None}


def job_summary_metrics(record: dict) -> dict[str, float]:
    """Timing, final loss and evaluation metrics of a finished job."""
    out = {"final_loss": record.get("final_loss"), "train_seconds": record.get("train_seconds"),
           "wall_seconds": record.get("wall_seconds"), "steps": record.get("steps")}
    if record.get("train_seconds"):
        out["steps_per_second"] = record["steps"] / record["train_seconds"]
    for name, value in flatten("", record.get("metrics", {})):
        out[metric_name(f"eval.{name}")] = value
    return {k: float(v) for k, v in out.items() if _finite(v)}


def job_lineage_tags(record: dict, extra: dict[str, Any] | None = None) -> dict[str, str]:
    tags = {"mcpl.kind": "job", "mcpl.job_id": record.get("job_id", ""), "mcpl.strategy": record.get("strategy", ""),
            "mcpl.base_model": record.get("base_model", ""), "mcpl.base_model_hash": record.get("base_model_hash", ""),
            "mcpl.config_hash": record.get("config_hash", ""),
            "mcpl.image_hashes": ",".join(i.get("hash", "") for i in record.get("images", [])),
            "mcpl.git_rev": git_revision()}
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return {k: str(v) for k, v in tags.items()}


def log_job_result(tracker: Tracker, key: str, record: dict, out_dir: str | Path,
                   history_before: int | None = None) -> None:
    """Params, summary metrics, lineage tags, the bundle's files and the loss curve's steps before
    `history_before` (steps a resumed run trained in an earlier process; None: the whole curve)."""
    out = Path(out_dir)
    tracker.log_params(key, job_params(record))
    tracker.set_tags(key, job_lineage_tags(record))
    history = record.get("history", [])
    end = history_before if history_before is not None else len(history) + 1
    ts = now_ms()
    rows = [[k, float(h[k]), ts, int(h["step"])] for h in history if int(h["step"]) < end
            for k in LOSS_KEYS if k in h]
    if rows:
        tracker.log_metric_rows(key, rows)
    tracker.log_metrics(key, job_summary_metrics(record), step=int(record.get("steps", 0)))
    for name in ("job.json", "embeddings.safetensors"):
        if (out / name).exists():
            tracker.log_artifacts(key, out / name)
    for folder in ("concepts", "attention", "samples"):
        if (out / folder).is_dir():
            tracker.log_artifacts(key, out / folder, folder)


# ------------------------------------------------------------------- one tracked job
def job_key(parent_key: str | None, job_id: str) -> str:
    """A job's run key: under its batch, so a retry in the same batch continues the same run."""
    return safe_key(f"{parent_key}.job-{job_id}" if parent_key else f"job-{job_id}")


def dataset_hash(specs: Iterable[Any]) -> str:
    """Content hash of the data a batch trains on (images' pixel hashes, sentences, masks)."""
    import hashlib

    items = sorted(json.dumps([list(s.images), list(s.image_hashes), list(s.sentences), s.masks, s.group],
                              sort_keys=True) for s in specs)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def run_tracked_job(spec: Any, out_root: str | Path, tracker: Tracker | None = None, parent_key: str | None = None,
                    device: str | None = None, samples: int = 2, sample_steps: int = 25,
                    callbacks: Iterable[Any] = (), skip_done: bool = True, progress: bool = False,
                    extra_tags: dict[str, Any] | None = None) -> dict:
    """Run one `JobSpec` into `<out_root>/jobs/<job_id>/` with its own MLflow run; raise if it fails.

    Resumes from the bundle's checkpoints (so an orchestrator's retry continues), writes the
    registry cards and `outcome.json` (read back by a parent that ran it elsewhere), and
    logs the failure (tag, FAILED run, error.log) before re-raising.
    """
    import traceback
    from dataclasses import asdict

    from mcpl.method.checkpoint import list_checkpoints
    from mcpl.pipeline.runner import fill_outcome, is_done, job_dir, new_outcome, train_one

    out = job_dir(out_root, spec.job_id)
    outcome = new_outcome(spec, out_root)
    extra: dict[str, Any] = {"device": device or "", "resumed_from": 0, "run_id": None, "pid": os.getpid(),
                             "worker": os.environ.get("MCPL_WORKER_NAME") or socket.gethostname()}
    record = is_done(out, spec.job_id) if skip_done else None
    if record is not None:
        outcome.status = "skipped"
        fill_outcome(outcome, record)
        return _write_outcome(out, {**asdict(outcome), **extra})
    checkpoints = list_checkpoints(out / "checkpoints")
    extra["resumed_from"] = int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0
    key = job_key(parent_key, spec.job_id)
    fresh = tracker is None or tracker.run_id(key) is None and not tracker.spool.pending(key)
    cb = None
    if tracker is not None:
        tags = {"mcpl.kind": "job", "mcpl.job_id": spec.job_id, "mcpl.rows": ",".join(map(str, spec.rows)),
                "mcpl.method.images": ",".join(spec.images), "mcpl.group": spec.group or "",
                "mcpl.dataset": spec.dataset, "mcpl.dataset_hash": dataset_hash([spec]),
                "mcpl.strategy": spec.config.strategy, "mcpl.device": device or "",
                "mcpl.resume_checkpoint": extra["resumed_from"], **(extra_tags or {})}
        tracker.start_run(key, f"job {spec.job_id[:8]} ({', '.join(spec.images)})",
                          {k: str(v) for k, v in tags.items()}, parent=parent_key)
        cb = MlflowCallback(tracker, key)
    started = time.time()
    try:
        record = train_one(spec, out, [*([cb] if cb else []), *callbacks], device, samples, sample_steps, progress)
    except Exception as err:
        outcome.seconds = round(time.time() - started, 2)
        outcome.error = f"{type(err).__name__}: {err}"
        if not any(Path(i).name in str(err) for i in spec.images):  # say which input, if the error does not
            outcome.error += f" [{spec.label}: {', '.join(spec.images)}]"
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.log").write_text(traceback.format_exc())
        if tracker is not None and cb is not None:
            cb.flush()
            tracker.set_tags(key, {"mcpl.error": outcome.error[:5000]})
            tracker.log_artifacts(key, out / "error.log")
            tracker.end_run(key, "FAILED")
            extra["run_id"] = tracker.run_id(key)
        _write_outcome(out, {**asdict(outcome), **extra})
        raise
    outcome.status, outcome.seconds = "done", round(time.time() - started, 2)
    fill_outcome(outcome, record)
    if tracker is not None and cb is not None:
        cb.flush()
        before = (cb.first_step or 1) if fresh else 0
        log_job_result(tracker, key, record, out, history_before=before)
        tracker.end_run(key, "FINISHED")
        extra["run_id"] = tracker.run_id(key)
    extra["first_step"] = cb.first_step if cb else None
    return _write_outcome(out, {**asdict(outcome), **extra})


def _write_outcome(out: Path, data: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".outcome.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out / "outcome.json")
    return data
