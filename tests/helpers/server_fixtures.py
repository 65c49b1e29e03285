"""Pytest plugin: real Prefect and MLflow servers on 127.0.0.1, once per session.

Test modules opt in with `pytest_plugins = ("helpers.server_fixtures",)`. Each server gets a free
port and a temporary store, starts on first use, and is stopped at the end of the session.
`mlflow_server.stop()` / `.start()` let a test take MLflow down and bring it back on the
same port and store. `serve_sh` is `bash scripts/serve.sh` itself (its own servers, non-default
ports, a project folder and HOME of its own); `served_run` is one batch a user starts on it with
`prefect deployment run mcpl/batch --watch` from another shell.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator

import pytest

from helpers.servers import BIN, MlflowServer, PrefectServer, ServeScript, write_dataset


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[tuple[PrefectServer, MlflowServer]]:
    """Both servers, started side by side (about 10-30 s on a busy 2-core machine)."""
    root = tmp_path_factory.mktemp("servers")
    prefect, mlflow = PrefectServer(root / "prefect"), MlflowServer(root / "mlflow")
    prefect.launch()
    mlflow.launch()
    try:
        prefect.wait(180)
        mlflow.wait(180)
        yield prefect, mlflow
    finally:
        mlflow.stop()
        prefect.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(servers) -> MlflowServer:
    return servers[1]


@pytest.fixture(scope="session")
def prefect_server(servers) -> PrefectServer:
    return servers[0]


@pytest.fixture
def prefect_api(prefect_server) -> Iterator[str]:
    """Point this process's Prefect client at the test server for one test."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api, PREFECT_HOME: prefect_server.home}):
        yield prefect_server.api


# ------------------------------------------------------------------------- scripts/serve.sh
SERVED_PARAMS = {"steps": 4, "samples": 1, "sample_steps": 2, "threads": 1,
                 "overrides": {"batch_size": 2, "checkpoint_every": 2, "map_timesteps": 2}}


@pytest.fixture(scope="session")
def serve_sh_session(tmp_path_factory) -> Iterator[ServeScript]:
    served = ServeScript(tmp_path_factory.mktemp("serve_sh"))
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def serve_sh(serve_sh_session) -> ServeScript:
    """serve.sh, running (started again on the same stores if a test stopped it)."""
    return serve_sh_session.ensure()


@pytest.fixture(scope="session")
def served_run(serve_sh_session, tiny_model) -> dict:
    """A batch started from another shell in the project: relative dataset and out, the tiny model."""
    served = serve_sh_session.ensure()
    write_dataset(served.project / "data" / "toy", [
        {"image": "a.png", "colours": ("red", "blue"), "sentence": "a photo of a red <dog|dog|red> on a <board|board>"},
        {"image": "b.png", "colours": ("green", "yellow"), "sentence": "a <cat|cat> and a <ball|ball>"}])
    params = {**SERVED_PARAMS, "dataset": "data/toy", "out": "runs/toy", "model": tiny_model}
    done = served.run([str(BIN / "prefect"), "deployment", "run", "mcpl/batch", "--params", json.dumps(params),
                       "--watch", "--watch-timeout", "600"], timeout=660)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    name = re.search(r"Created flow run '([^']+)'", done.stdout)
    summary = json.loads((served.project / "runs" / "toy" / "summary.json").read_text())
    return {"watch": done.stdout, "flow_run": name[1] if name else None, "summary": summary,
            "concepts": ["toy.images-a.dog", "toy.images-a.board", "toy.images-b.cat", "toy.images-b.ball"]}
