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


# ------------------------------------------------------------------------- scripts/serve.sh
class ServeScript:
    """`bash scripts/serve.sh` as a user runs it: non-default ports, a project folder of its own
    (MCPL_HOME) and a HOME of its own (so the test sees whether anything global is written)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.project, self.services, self.home = root / "project", root / "services", root / "home"
        for d in (self.project, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.prefect_ui = f"http://127.0.0.1:{self.prefect_port}"
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.log = root / "serve.log"
        self.proc: subprocess.Popen | None = None

    def shell_env(self, **extra: str) -> dict[str, str]:
        """A new shell in the project: nothing exported by serve.sh, the venv's commands on PATH."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "MCPL_HOME", "PYTHONPATH")
               and not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update({k: v for k, v in QUIET_ENV.items() if k != "PREFECT_LOGGING_LEVEL"})
        env.update({"HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra})
        return env

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 600) -> None:
        env = self.shell_env(PREFECT_PORT=str(self.prefect_port), MLFLOW_PORT=str(self.mlflow_port),
                             SERVICES_DIR=str(self.services), MCPL_HOME=str(self.project))
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen(["bash", str(REPO / "scripts" / "serve.sh")], env=env, cwd=str(self.project),
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while "is being served" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > deadline:
                tail = self.log.read_text(errors="replace")[-4000:]
                self.stop()
                raise RuntimeError(f"serve.sh did not come up (exit {self.proc and self.proc.returncode}):\n{tail}")
            time.sleep(1)

    def ensure(self) -> ServeScript:
        if not self.running:
            self.start()
        return self

    def stop(self) -> None:
        """Ctrl-C, as a user stops it (serve.sh's trap removes its pointers and stops its children)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                stop_process(self.proc)
            self.proc = None

    def run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        """A command typed in another shell, in the project folder."""
        return subprocess.run(args, cwd=str(self.project), env=self.shell_env(), capture_output=True, text=True,
                              timeout=timeout)
