"""Where MLflow lives and how every client is made: one documented store, and fail fast when it is down.

The store: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else the project's embedded SQLite
store `<root>/mlflow.db` (root: `$MCPL_HOME`, else the current folder). `scripts/serve.sh`
writes the URI of the server it starts into `.mcpl/tracking_uri` so that a plain
`mcpl registry list` in the same project finds the store the served pipeline used.
Every client comes from `client_for`, with MLflow's HTTP retries cut to seconds: a dead
server costs < 30 s and a TrackingUnavailable, never minutes of back-off.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from mcpl.errors import TrackingUnavailable

DEFAULT_EXPERIMENT = "mcpl"
STORE_FILE = "mlflow.db"
SERVED_URI_FILE = Path(".mcpl") / "tracking_uri"  # written by scripts/serve.sh, read here
# MLflow's defaults retry 7 times with exponential back-off (minutes per call); the spool is our
# retry, so a dead server must cost seconds.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# MLflow errors that a retry cannot fix: such a call is dropped (and counted), never spooled.
PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "PERMISSION_DENIED",
                   "UNAUTHENTICATED", "INVALID_STATE"}


def project_root() -> Path:
    return Path(os.environ.get("MCPL_HOME") or Path.cwd()).resolve()


def resolve_tracking_uri(uri: str | None = None, root: str | Path | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the served store noted by serve.sh, else `<root>/mlflow.db`."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(root).resolve() if root else project_root()
    served = base / SERVED_URI_FILE
    if served.is_file() and served.read_text().strip():
        return served.read_text().strip()
    return f"sqlite:///{base / STORE_FILE}"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def quick_http() -> None:
    for name, value in QUICK_HTTP.items():
        os.environ.setdefault(name, value)


def probe(uri: str, timeout: float = 5.0) -> str | None:
    """None if the store answers, else why not (HTTP servers only; file stores always answer)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


def unavailable_message(uri: str, problem: str) -> str:
    return (f"MLflow at {uri} is unreachable ({problem}); start it (scripts/serve.sh) or pass --tracking-uri / "
            "MLFLOW_TRACKING_URI")


def is_unreachable(err: BaseException) -> bool:
    """Whether an exception from an MLflow call means "the server did not answer" (not "no such thing").

    MLflow wraps a failed HTTP request in an MlflowException ("API request to ... failed with
    exception ..."); requests' own ConnectionError/Timeout may also surface. Either must be
    reported as TrackingUnavailable, never read as a missing name or an empty registry.
    """
    if isinstance(err, TrackingUnavailable | ConnectionError | TimeoutError):
        return True
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    if names & {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError", "NewConnectionError"}:
        return True
    text = str(err)
    return "API request to" in text and "failed with exception" in text


def unreachable_error(err: BaseException, uri: str | None) -> TrackingUnavailable:
    """The TrackingUnavailable to raise for an unreachable-server exception."""
    first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    return TrackingUnavailable(unavailable_message(resolve_tracking_uri(uri), first))


def client_for(uri: str | None = None, *, read_only: bool = False, check: bool = True):
    """An MlflowClient (registry in the same store) on the resolved URI.

    `check`: probe an HTTP server first and raise TrackingUnavailable within seconds if it
    is down. `read_only`: a SQLite store that does not exist is an error (reading must
    never create an empty database). Both checks come before mlflow is imported (seconds).
    """
    quick_http()
    uri = resolve_tracking_uri(uri)
    if check:
        problem = probe(uri)
        if problem:
            raise TrackingUnavailable(unavailable_message(uri, problem))
    db = sqlite_path(uri)
    if read_only and db is not None and not db.exists():
        raise TrackingUnavailable(f"no MLflow store at {db}: nothing has been registered here yet. Run a batch "
                                  "(`dvc repro`, `mcpl registry build OUT`) or point --tracking-uri / "
                                  "MLFLOW_TRACKING_URI at the store the pipeline used")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """Get or create the experiment. With a SQLite store the artifacts go beside the database
    (`<db folder>/mlruns`), not into whatever folder the process happens to run in."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = sqlite_path(client.tracking_uri)
    if artifact_location is None and db is not None:
        artifact_location = (db.parent / "mlruns" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location)
    except Exception as err:  # another process created it first (MLflow raises several types)
        if not is_permanent(err):
            raise
        return client.get_experiment_by_name(name).experiment_id


def is_permanent(err: BaseException) -> bool:
    code = getattr(err, "error_code", None)
    return isinstance(code, str) and code in PERMANENT_CODES


def safe_key(text: str) -> str:
    """A run key usable as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:200]


def now_ms() -> int:
    return int(time.time() * 1000)
