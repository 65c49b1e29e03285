"""MLflow tracking that never loses a training result.

Every MLflow call goes through `Tracker`, which addresses runs by a local *key* (e.g.
`batch-<id>`, `batch-<id>.job-<job_id>`) instead of a server run id. While MLflow answers,
calls go straight through (with a few quick retries). When it does not, the call is
appended to the on-disk spool (`<spool>/ops/<key>.jsonl`, mcpl.pipeline.tracking.spool)
and the tracker goes offline; every later call for that key is spooled too, so the order
of a run's history is kept. `replay()` applies spooled calls in order once MLflow is back
(a run created offline gets its real id then, and its children are re-parented through
the key -> id map). Artifacts are spooled by path: they are the job bundle's own files,
which stay on disk.

Nothing here imports Prefect: the flow, the CLI and tests all use the same tracker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcpl.errors import TrackingUnavailable
from mcpl.pipeline.tracking.spool import Spool
from mcpl.pipeline.tracking.store import (
    DEFAULT_EXPERIMENT,
    experiment_id,
    is_permanent,
    now_ms,
    probe,
    quick_http,
    resolve_tracking_uri,
    unavailable_message,
)

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "noise_loss", "cl_loss", "lr", "mask_fraction")


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

        quick_http()
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
        self._probed = False  # the first call probes an HTTP server (seconds) before paying a request timeout
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
        """Apply spooled calls in order; stop at the first that fails again. Returns how many applied.

        An HTTP server is probed first (seconds): a dead or silent server must not cost each
        spooled call its full request timeout and retries. Raises TrackingUnavailable then.
        """
        applied = 0
        if self.spool.keys():
            problem = probe(self.uri)
            if problem:
                raise TrackingUnavailable(unavailable_message(self.uri, problem))
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
            except Exception as err:  # noqa: BLE001 - unreachable (probe) or a replay failure: stays spooled
                self._go_offline(err)
        self.status.pending = self.spool.count()
        return self.status

    # --------------------------------------------------------------------- internals
    def _call(self, key: str, op: dict) -> None:
        with self._lock:
            if not self._probed:
                self._probed = True
                problem = probe(self.uri)
                if problem:
                    self._go_offline(TrackingUnavailable(unavailable_message(self.uri, problem)))
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
