"""Pytest plugin: real Prefect and MLflow servers on 127.0.0.1, once per session.

Test modules opt in with `pytest_plugins = ("helpers.server_fixtures",)`. Each server gets a free
port and a temporary store, starts on first use, and is stopped at the end of the session.
`mlflow_server.stop()` / `.start()` let a test take MLflow down and bring it back on the
same port and store.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from helpers.servers import MlflowServer, PrefectServer


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
