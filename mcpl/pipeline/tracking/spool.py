"""The on-disk spool of MLflow calls: ordered per-key JSON-lines logs plus the key -> run id map.

Plain files under one folder, locked with flock, so any process that shares the folder
(another worker, a later `mcpl registry build`) can append to or replay it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


    def known_keys(self) -> list[str]:
        """Every key that has a run id (created online, or replayed)."""
        return sorted(p.name for p in (self.root / "ids").iterdir() if not p.name.startswith("."))
