"""The registry snapshot: a Parquet table of every concept version (vectors + metadata).

Registered as its own model, `mcpl-registry`, with a new version only when its content changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from mcpl.concepts.embeddings import EMBEDS_FILE, load_concept
from mcpl.pipeline.registry.refs import SNAPSHOT_MODEL, download_version, search_all
from mcpl.pipeline.tracking.store import experiment_id

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "concepts.parquet"

SNAPSHOT_COLUMNS = ("name", "version", "token", "concept", "dataset", "source", "source_image", "sentence",
                    "adjective", "initializer", "strategy", "base_model", "base_model_hash", "config_hash",
                    "job_id", "sha256", "steps", "metrics", "run_id", "num_vectors", "dim", "vector")


def concept_versions(client) -> list:
    """Every version of every concept registered model (not the snapshot)."""
    names = [m.name for m in search_all(client.search_registered_models, "")
             if m.tags.get("kind") == "mcpl-concept"]
    out = []
    for name in names:
        out += sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    return out


def snapshot_rows(client, previous: list[dict] | None = None) -> list[dict]:
    """One row per concept version; vectors reused from the previous snapshot, else downloaded."""
    known = {(r["name"], str(r["version"]), r["sha256"]): r for r in previous or []}
    rows = []
    for v in concept_versions(client):
        row = known.get((v.name, str(v.version), v.tags.get("sha256", "")))
        if row is None:
            folder = download_version(client, v.name, v.version)
            _, vectors, _ = load_concept(folder / EMBEDS_FILE)
            metrics = {k[len("metric."):]: float(val) for k, val in v.tags.items() if k.startswith("metric.")}
            row = {"name": v.name, "version": int(v.version), **{c: v.tags.get(c, "") for c in (
                "token", "concept", "dataset", "source", "source_image", "sentence", "adjective", "initializer",
                "strategy", "base_model", "base_model_hash", "config_hash", "job_id", "sha256")},
                   "steps": int(v.tags.get("steps", 0) or 0), "metrics": json.dumps(metrics, sort_keys=True),
                   "run_id": v.run_id or "", "num_vectors": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
                   "vector": vectors.flatten().tolist()}
        rows.append({c: row[c] for c in SNAPSHOT_COLUMNS})
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def rows_hash(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def write_snapshot(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.int64() if c in ("version", "steps", "num_vectors", "dim") else
                         pa.list_(pa.float32()) if c == "vector" else pa.string()) for c in SNAPSHOT_COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_snapshot(path: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def publish_snapshot(client, experiment: str = "mcpl") -> tuple[str | None, bool]:
    """Write the registry table as a new `mcpl-registry` version if its content changed."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{SNAPSHOT_MODEL}'")
    except MlflowException:
        versions = []
    newest = max(versions, key=lambda v: int(v.version), default=None)
    previous = None
    if newest is not None:
        try:
            previous = read_snapshot(download_version(client, SNAPSHOT_MODEL, newest.version) / SNAPSHOT_FILE)
        except Exception as err:  # noqa: BLE001 - rebuild from the versions instead
            log.warning("previous snapshot unreadable (%s); rebuilding", err)
    rows = snapshot_rows(client, previous)
    digest = rows_hash(rows)
    if newest is not None and newest.tags.get("sha256") == digest:
        return str(newest.version), False
    with tempfile.TemporaryDirectory() as tmp:
        path = write_snapshot(rows, Path(tmp) / "snapshot" / SNAPSHOT_FILE)
        run = client.create_run(experiment_id(client, experiment), run_name="registry snapshot",
                                tags={"mcpl.kind": "registry-snapshot", "mcpl.sha256": digest})
        client.log_artifacts(run.info.run_id, str(path.parent), "snapshot")
        client.log_metric(run.info.run_id, "concept_versions", len(rows))
        client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(SNAPSHOT_MODEL, tags={"kind": "mcpl-registry-snapshot"},
                                       description="Every concept version with its vectors and metadata "
                                                   f"(Parquet, {SNAPSHOT_FILE}).")
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        SNAPSHOT_MODEL, source=f"{run.info.artifact_uri}/snapshot", run_id=run.info.run_id,
        tags={"sha256": digest, "rows": str(len(rows)), "concepts": str(len({r['name'] for r in rows}))})
    return str(version.version), True


