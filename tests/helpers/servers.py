"""Helpers of the orchestration tests: server processes on 127.0.0.1, small datasets.

The fixtures that use them are in helpers/server_fixtures.py (a pytest plugin).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

from mcpl.provenance import REPO_ROOT

BIN = Path(sys.executable).parent
REPO = REPO_ROOT
QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
             "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_TELEMETRY": "false",
             "PREFECT_LOGGING_LEVEL": "WARNING"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s: {log.read_text()[-3000:] if log else ''}")


def stop_process(proc: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM, then SIGINT, then SIGKILL to the process group (servers spawn workers)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGINT, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Server:
    """One server process started from a command, checked through a health URL."""

    def __init__(self, name: str, cmd: list[str], health: str, env: dict[str, str], log: Path) -> None:
        self.name, self.cmd, self.health, self.env, self.log = name, cmd, health, env, log
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        fh = open(self.log, "a")
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, stdout=fh, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), start_new_session=True)

    def wait(self, timeout: float = 120) -> None:
        wait_http(self.health, timeout, self.proc, self.log)

    def start(self, timeout: float = 120) -> None:
        self.launch()
        self.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole process group at once: a crash, not a shutdown."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            self.proc = None


class MlflowServer(Server):
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        super().__init__("mlflow", cmd, f"{self.uri}/health", QUIET_ENV, root / "server.log")


class PrefectServer(Server):
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**QUIET_ENV, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": "",
               "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
        cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__("prefect", cmd, f"{self.api}/health", env, root / "server.log")

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for processes that talk to this server."""
        return {**QUIET_ENV, "PREFECT_API_URL": self.api, "PREFECT_HOME": str(self.home)}


# ------------------------------------------------------------------------- datasets
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 200, 20)}


def draw_scene(colours: tuple[str, str], size: int = 32, seed: int = 0) -> Image.Image:
    """Two coloured squares on white (top-left, bottom-right), a little jitter per seed."""
    img = Image.new("RGB", (size, size), "white")
    j = seed % 3
    img.paste(COLOURS[colours[0]], (2 + j, 2, 14 + j, 14))
    img.paste(COLOURS[colours[1]], (18, 18 - j, 30, 30 - j))
    return img


def write_dataset(root: Path, rows: list[dict]) -> Path:
    """rows: {"image": name, "colours": (a, b), "sentence": ..., optional "group"}; writes PNGs + rows.jsonl."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "rows.jsonl", "w") as fh:
        for i, row in enumerate(rows):
            draw_scene(tuple(row["colours"]), seed=i).save(root / "images" / row["image"])
            entry = {"image": f"images/{row['image']}", "sentence": row["sentence"]}
            if row.get("group"):
                entry["group"] = row["group"]
            fh.write(json.dumps(entry) + "\n")
    return root


FAST = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "map_timesteps": 2}


def fast_config(**fields):
    from mcpl.config import TrainConfig

    return TrainConfig(**{**FAST, **fields})


def jobs_for(root: Path, model: str, manifest: Path | None = None, **fields) -> list:
    """Validate a dataset folder and return its JobSpecs under the fast test config."""
    from mcpl.pipeline.data import load_jobs, validate_dataset

    report = validate_dataset(root, manifest or root / "manifest.parquet", model)
    assert report.ok, report.render()
    return load_jobs(report.manifest, fast_config(**fields), model)
