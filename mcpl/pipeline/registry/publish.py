"""The concept registry: learned concepts as versioned MLflow registered models.

Names are `<dataset>.<source>.<concept>`: the dataset folder's name, the image path
relative to it without extension (`/` -> `-`) or the MCPL-diverse group's name, and the
concept's name (`dog` for `<dog>`), e.g. `example.images-scene_0.circle`. Two images that
both learned `<dog>` so get two names. Should two different sources still collide (same
name, different images), the newcomer gets `-<source hash>` after its source part.

Each training of a concept is a version (source: the job run's `concepts/<concept>/`
folder: the embedding, its overlay and sample pictures, `concept.json`); a version
carries the embedding file's sha256 and publishing the same file again adds nothing.
`models:/<name>@latest` is MLflow's own newest-version alias; we add one alias per
strategy (`@one`, `@all`, `@diverse`). A Parquet snapshot of every version (vectors and
metadata) is the registered model `mcpl-registry`, with a version only when it changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcpl.concepts.embeddings import EMBEDS_FILE, ExportFormat, export_concept, load_concept

log = logging.getLogger(__name__)

SNAPSHOT_MODEL = "mcpl-registry"
SNAPSHOT_FILE = "concepts.parquet"
CARD_FILE = "concept.json"
SPEC_FILE = "spec.json"
STRATEGY_ALIASES = ("one", "all", "diverse")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def registry_name(dataset: str, source: str, concept: str) -> str:
    """`<dataset>.<source>.<concept>`, each part reduced to letters, digits, `_` and `-`."""
    return ".".join(_slug(p) for p in (dataset, re.sub(r"\.[A-Za-z0-9]+$", "", source).replace("/", "-"), concept))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------ concept cards
@dataclass
class ConceptCard:
    """One learned concept of one job bundle, with everything the registry shows about it."""

    name: str
    token: str
    concept: str
    job_id: str
    folder: Path  # <job>/concepts/<concept>/
    sha256: str
    dataset: str
    source: str
    source_key: str  # hash of the training images: a name means one set of images
    images: list[str]
    sentences: list[str]
    initializer: str
    adjective: str
    strategy: str
    base_model: str
    base_model_hash: str
    config_hash: str
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.folder / EMBEDS_FILE

    def tags(self) -> dict[str, str]:
        """Version tags (plain keys, so the MLflow UI search `tags.concept = 'dog'` works)."""
        tags = {"token": self.token, "concept": self.concept, "dataset": self.dataset, "source": self.source,
                "source_image": ",".join(self.images), "sentence": " | ".join(self.sentences),
                "initializer": self.initializer, "adjective": self.adjective, "strategy": self.strategy,
                "base_model": self.base_model, "base_model_hash": self.base_model_hash,
                "config_hash": self.config_hash, "job_id": self.job_id, "sha256": self.sha256,
                "steps": str(self.steps)}
        tags.update({f"metric.{k}": f"{v:.6g}" for k, v in self.metrics.items()})
        return tags

    def model_tags(self) -> dict[str, str]:
        return {"kind": "mcpl-concept", "token": self.token, "concept": self.concept, "dataset": self.dataset,
                "source": self.source, "source_key": self.source_key}

    def description(self) -> str:
        """Markdown (the MLflow UI renders it): code spans keep `<token>` visible."""
        sentences = "; ".join(f"`{s}`" for s in self.sentences)
        return (f"Concept `{self.token}` learned from {', '.join(self.images)} (dataset {self.dataset}, strategy "
                f"{self.strategy}): {sentences}. Load it with `mcpl registry load {self.name}` or "
                f"`models:/{self.name}@latest`.")


def find_job_dirs(root: str | Path) -> list[Path]:
    """Job bundles at or under `root` (a bundle, a batch output folder, or any folder of them).

    A batch folder's `summary.json` names the jobs of its latest run: only those count, so
    bundles kept from earlier runs (other configs or models) are not published again.
    """
    root = Path(root)
    if (root / "job.json").exists():
        return [root]
    summary = root / "summary.json"
    if summary.exists():
        jobs = json.loads(summary.read_text()).get("jobs", [])
        listed = [root / j["out_dir"] for j in jobs if j.get("status") in ("done", "skipped") and j.get("out_dir")]
        return sorted(d for d in listed if (d / "job.json").exists())
    return sorted(p.parent for p in root.rglob("job.json") if "checkpoints" not in p.parts)


def concept_cards(job_dir: str | Path) -> list[ConceptCard]:
    """Read a finished bundle and write each concept's card files next to its embedding.

    `concepts/<name>/` gets `overlay.png` (attention on the training image), `sample.png`
    (a generation) and `concept.json`, so the folder a registry version points at is
    self-describing. Idempotent.
    """
    job_dir = Path(job_dir)
    record = json.loads((job_dir / "job.json").read_text())
    spec = json.loads((job_dir / SPEC_FILE).read_text()) if (job_dir / SPEC_FILE).exists() else {}
    dataset = Path(spec["dataset"]).name if spec.get("dataset") else "adhoc"
    images = [i.get("source") or i.get("hash", "") for i in record.get("images", [])]
    source = spec.get("group") or (images[0] if len(images) == 1 else "group-" + record["job_id"][:8])
    source_key = hashlib.sha256(",".join(sorted(i["hash"] for i in record["images"])).encode()).hexdigest()[:12]
    cards = []
    for c in record["concepts"]:
        folder = (job_dir / c["file"]).parent
        shown = [i for i in record["images"] if c["token"] in i.get("sentence", "")
                 or f"<{c['name']}" in i.get("sentence", "")] or record["images"]
        overlay = job_dir / shown[0]["overlay"]
        if overlay.exists():
            shutil.copyfile(overlay, folder / "overlay.png")
        sample = job_dir / record.get("samples", {}).get(c["name"], {}).get("file", "-")
        if sample.is_file():
            shutil.copyfile(sample, folder / "sample.png")
        metrics = {}
        for image_key, per_token in record.get("metrics", {}).items():
            for metric, value in (per_token.get(c["token"]) or {}).items() if isinstance(per_token, dict) else []:
                if isinstance(value, int | float):
                    metrics[f"{image_key}.{metric}"] = float(value)
        metrics["final_loss"] = float(record.get("final_loss", float("nan")))
        card = ConceptCard(
            name=registry_name(dataset, source, c["name"]), token=c["token"], concept=c["name"],
            job_id=record["job_id"], folder=folder, sha256=file_sha256(folder / EMBEDS_FILE), dataset=dataset,
            source=source, source_key=source_key, images=[i.get("source") or i["hash"] for i in shown],
            sentences=[i["sentence"] for i in shown], initializer=c.get("initializer") or "",
            adjective=c.get("adjective") or "", strategy=record.get("strategy", ""),
            base_model=record.get("base_model", ""), base_model_hash=record.get("base_model_hash", ""),
            config_hash=record.get("config_hash", ""), steps=int(record.get("steps", 0)), metrics=metrics)
        card_json = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(card).items()}
        card_json["folder"] = f"concepts/{c['name']}"
        (folder / CARD_FILE).write_text(json.dumps(card_json, indent=1, sort_keys=True))
        cards.append(card)
    return cards


# ---------------------------------------------------------------------------- publish
@dataclass
class PublishReport:
    created: list[tuple[str, str]] = field(default_factory=list)  # (name, version)
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    snapshot_version: str | None = None
    snapshot_changed: bool = False

    def message(self) -> str:
        snap = (f"snapshot {SNAPSHOT_MODEL} v{self.snapshot_version}" + (" (new)" if self.snapshot_changed else "")
                if self.snapshot_version else "no snapshot")
        return f"registry: {len(self.created)} new version(s), {len(self.unchanged)} unchanged; {snap}"

    def to_dict(self) -> dict:
        return {"created": [f"{n}/{v}" for n, v in self.created],
                "unchanged": [f"{n}/{v}" for n, v in self.unchanged],
                "snapshot_version": self.snapshot_version, "snapshot_changed": self.snapshot_changed,
                "message": self.message()}


def client_for(uri: str | None = None):
    """An MlflowClient on the resolved tracking URI (registry in the same store)."""
    from mlflow import MlflowClient

    from mcpl.pipeline.tracking.tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client, name: str) -> str:
    from mcpl.pipeline.tracking.tracker import experiment_id

    return experiment_id(client, name)


def _job_run(client, experiment: str, card: ConceptCard, run_ids: dict[str, str]) -> str:
    """The run holding the job's concept folders: the tracked job run, else a new publish run."""
    run_id = run_ids.get(card.job_id)
    if run_id is None:
        exp = _experiment_id(client, experiment)
        runs = client.search_runs([exp], f"tags.`mcpl.job_id` = '{card.job_id}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        exp = _experiment_id(client, experiment)
        run = client.create_run(exp, run_name=f"publish {card.job_id[:8]}",
                                tags={"mcpl.kind": "job", "mcpl.job_id": card.job_id,
                                      "mcpl.strategy": card.strategy, "mcpl.base_model_hash": card.base_model_hash})
        run_id = run.info.run_id
        client.log_artifacts(run_id, str(card.folder.parent), "concepts")
        client.log_artifact(run_id, str(card.folder.parent.parent / "job.json"))
        client.set_terminated(run_id)
    run_ids[card.job_id] = run_id
    present = {Path(f.path).name for f in client.list_artifacts(run_id, f"concepts/{card.concept}")}
    if not {EMBEDS_FILE, CARD_FILE} <= present:  # a run logged before the cards existed
        client.log_artifacts(run_id, str(card.folder), f"concepts/{card.concept}")
    return run_id


def _unique_name(client, card: ConceptCard) -> str:
    """The card's name, or name-with-source-hash if that name belongs to other images."""
    from mlflow.exceptions import MlflowException

    for name in (card.name, _suffixed(card)):
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            return name
        if model.tags.get("source_key") in (None, card.source_key):
            return name
    return _suffixed(card)


def _suffixed(card: ConceptCard) -> str:
    dataset, _, rest = card.name.partition(".")
    source, _, concept = rest.rpartition(".")
    return f"{dataset}.{source}-{card.source_key[:6]}.{concept}"


def publish(cards: Iterable[ConceptCard], uri: str | None = None, experiment: str = "mcpl",
            run_ids: dict[str, str] | None = None, snapshot: bool = True, client=None) -> PublishReport:
    """Register each card as a new version of its concept unless that exact file is registered."""
    from mlflow.exceptions import MlflowException

    client = client or client_for(uri)
    run_ids = dict(run_ids or {})
    report = PublishReport()
    for card in cards:
        name = _unique_name(client, card)
        card.name = name
        try:
            client.create_registered_model(name, tags=card.model_tags(), description=card.description())
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        versions = client.search_model_versions(f"name = '{name}'")
        same = [v for v in versions if v.tags.get("sha256") == card.sha256]
        if same:
            report.unchanged.append((name, str(same[0].version)))
            continue
        run_id = _job_run(client, experiment, card, run_ids)
        source = f"{client.get_run(run_id).info.artifact_uri}/concepts/{card.concept}"
        version = client.create_model_version(name, source=source, run_id=run_id, tags=card.tags(),
                                              description=card.description())
        if card.strategy in STRATEGY_ALIASES:
            client.set_registered_model_alias(name, card.strategy, version.version)
        report.created.append((name, str(version.version)))
    if snapshot:
        report.snapshot_version, report.snapshot_changed = publish_snapshot(client, experiment)
    return report


# --------------------------------------------------------------------------- snapshot
SNAPSHOT_COLUMNS = ("name", "version", "token", "concept", "dataset", "source", "source_image", "sentence",
                    "adjective", "initializer", "strategy", "base_model", "base_model_hash", "config_hash",
                    "job_id", "sha256", "steps", "metrics", "run_id", "num_vectors", "dim", "vector")


def concept_versions(client) -> list:
    """Every version of every concept registered model (not the snapshot)."""
    names = [m.name for m in _search_all(client.search_registered_models, "")
             if m.tags.get("kind") == "mcpl-concept"]
    out = []
    for name in names:
        out += sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    return out


def _search_all(fn, filter_string: str) -> list:
    items, token = [], None
    while True:
        page = fn(filter_string=filter_string, max_results=200, page_token=token)
        items += list(page)
        token = getattr(page, "token", None)
        if not token:
            return items


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
        run = client.create_run(_experiment_id(client, experiment), run_name="registry snapshot",
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


# ------------------------------------------------------------------------ load / export
REF = re.compile(r"^(?:models:/)?(?P<name>[^@/=]+?)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+|latest))?$")


def resolve(client, ref: str) -> tuple[str, str]:
    """`name`, `name@alias`, `name/3` or `models:/...` -> (name, version); bare name = @latest."""
    match = REF.match(ref.strip())
    if not match:
        raise ValueError(f"not a concept reference: {ref!r} (use NAME, NAME@ALIAS, NAME/VERSION or models:/...)")
    name, alias, version = match["name"], match["alias"], match["version"]
    if version and version != "latest":
        return name, str(version)
    if alias and alias != "latest":
        return name, str(client.get_model_version_by_alias(name, alias).version)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ValueError(f"no registered concept named {name!r}; see `mcpl registry list`")
    return name, str(max(versions, key=lambda v: int(v.version)).version)


def download_version(client, name: str, version: str | int, dst: str | Path | None = None) -> Path:
    """Download a version's folder (embedding + cards) to `dst` or a fresh temporary folder."""
    import mlflow.artifacts

    source = client.get_model_version_download_uri(name, str(version))
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="mcpl-concept-"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                    tracking_uri=client.tracking_uri))


@dataclass
class LoadedConcept:
    ref: str
    name: str
    version: str
    token: str  # the token to write in prompts
    learned_token: str
    folder: Path


def fetch(refs: Sequence[str], uri: str | None = None, client=None) -> list[LoadedConcept]:
    """Download concepts and give each a prompt token that no other of them uses.

    A concept keeps its learned token (`<dog>`) unless another requested concept learned
    the same one; then every concept sharing it gets its registry name (`<example.a.dog>`).
    """
    client = client or client_for(uri)
    out = []
    for ref in refs:
        name, version = resolve(client, ref)
        folder = download_version(client, name, version)
        token, _, _ = load_concept(folder / EMBEDS_FILE)
        out.append(LoadedConcept(ref, name, version, token, token, folder))
    counts: dict[str, int] = {}
    for item in out:
        counts[item.learned_token] = counts.get(item.learned_token, 0) + 1
    for item in out:
        if counts[item.learned_token] > 1:
            item.token = f"<{item.name}>"
    if len({i.token for i in out}) != len(out):
        raise ValueError("the same concept version was requested twice")
    return out


def load_into_pipeline(pipe, refs: Sequence[str], tokens: Sequence[str | None] | None = None,
                       uri: str | None = None, client=None) -> list[LoadedConcept]:
    """Load registry concepts into a diffusers pipeline; returns each one's prompt token.

    `tokens` overrides them (None entries keep the default). A token already in the
    tokenizer is an error (mcpl.generate.load_concepts), never a silent overwrite.
    """
    from mcpl.concepts.generate import load_concepts

    loaded = fetch(refs, uri, client)
    for i, item in enumerate(loaded):
        if tokens and i < len(tokens) and tokens[i]:
            item.token = tokens[i]
    load_concepts(pipe, [i.folder / EMBEDS_FILE for i in loaded], [i.token for i in loaded])
    return loaded


def export(ref: str, out_dir: str | Path, fmt: ExportFormat = "diffusers", file_name: str | None = None,
           uri: str | None = None, client=None) -> Path:
    """Write a registry concept as diffusers / Automatic1111 / ComfyUI read it (safetensors)."""
    client = client or client_for(uri)
    name, version = resolve(client, ref)
    folder = download_version(client, name, version)
    return export_concept(folder / EMBEDS_FILE, out_dir, fmt, name=file_name or name)


def list_concepts(uri: str | None = None, filter_string: str = "", client=None) -> list[dict[str, Any]]:
    """One row per concept: name, newest version, its token, strategy, source and sentence."""
    client = client or client_for(uri)
    rows = []
    for model in _search_all(client.search_registered_models, filter_string):
        if model.tags.get("kind") != "mcpl-concept":
            continue
        versions = client.search_model_versions(f"name = '{model.name}'")
        newest = max(versions, key=lambda v: int(v.version), default=None)
        tags = newest.tags if newest else {}
        rows.append({"name": model.name, "versions": len(versions), "latest": newest.version if newest else "",
                     "aliases": ",".join(sorted(model.aliases)) if model.aliases else "",
                     "token": tags.get("token", ""), "strategy": tags.get("strategy", ""),
                     "source_image": tags.get("source_image", ""), "sentence": tags.get("sentence", "")})
    return sorted(rows, key=lambda r: r["name"])


def show(ref: str, uri: str | None = None, client=None) -> dict[str, Any]:
    """A concept's versions with tags, run and aliases (for `mcpl registry show`)."""
    client = client or client_for(uri)
    name = REF.match(ref.strip())["name"] if REF.match(ref.strip()) else ref
    model = client.get_registered_model(name)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    aliases = dict(model.aliases or {})
    return {"name": name, "description": model.description, "tags": dict(model.tags), "aliases": aliases,
            "versions": [{"version": v.version, "run_id": v.run_id, "source": v.source, "tags": dict(v.tags),
                          "aliases": [a for a, n in aliases.items() if str(n) == str(v.version)]}
                         for v in versions]}


def publish_bundles(root: str | Path, uri: str | None = None, experiment: str = "mcpl",
                    run_ids: dict[str, str] | None = None, snapshot: bool = True) -> PublishReport:
    """Cards for every bundle under `root`, then `publish` them."""
    cards = [c for d in find_job_dirs(root) for c in concept_cards(d)]
    return publish(cards, uri, experiment, run_ids, snapshot)
