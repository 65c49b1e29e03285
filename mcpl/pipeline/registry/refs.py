"""Find, fetch, load and export registry concepts by name: `NAME`, `NAME@ALIAS`, `NAME/3`, `models:/...`.

`models:/<name>@latest` is MLflow's own newest-version alias; the publisher adds one alias
per strategy (`@one`, `@all`, `@diverse`). Loading several concepts gives each its own
prompt token: two that both learned `<dog>` are renamed, never silently overwritten.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcpl.errors import RegistryError
from mcpl.method.prompts import shown
from mcpl.pipeline.tracking.store import client_for

if TYPE_CHECKING:
    from mcpl.concepts.embeddings import ExportFormat

# mcpl.concepts.embeddings (torch) is imported where a file is read or written, not here: `registry
# list` / `show` and a dead server's error must not wait for torch to load.
SNAPSHOT_MODEL = "mcpl-registry"
STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # an export's file stem: one plain file name
REF = re.compile(r"^(?:models:/)?(?P<name>[^@/=]+?)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+|latest))?$")


def resolve(client, ref: str) -> tuple[str, str]:
    """`name`, `name@alias`, `name/3` or `models:/...` -> (name, version); bare name = @latest."""
    match = REF.match(ref.strip())
    if not match:
        raise RegistryError(f"not a concept reference: {ref!r} (use NAME, NAME@ALIAS, NAME/VERSION or models:/...)")
    name, alias, version = match["name"], match["alias"], match["version"]
    if version and version != "latest":
        return name, str(version)
    if alias and alias != "latest":
        try:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        except Exception as err:  # MLflow: RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER_VALUE
            _missing(err, f"{name}@{alias}")
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"no registered concept named {name!r}; see `mcpl registry list`")
    return name, str(max(versions, key=lambda v: int(v.version)).version)


def _missing(err: Exception, what: str) -> None:
    """Turn MLflow's "does not exist" into a RegistryError; anything else (a dead server) propagates."""
    if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        raise RegistryError(f"no registered concept {what!r}; see `mcpl registry list`") from None
    raise err


_DOWNLOADS: list[Path] = []


def _download_root() -> Path:
    """One temporary folder per process for downloaded versions, removed when the process ends."""
    if not _DOWNLOADS:
        _DOWNLOADS.append(Path(tempfile.mkdtemp(prefix="mcpl-concepts-")))
        atexit.register(shutil.rmtree, _DOWNLOADS[0], True)
    return _DOWNLOADS[0]


def download_version(client, name: str, version: str | int, dst: str | Path | None = None) -> Path:
    """Download a version's folder (embedding + cards) to `dst`, or into this process's temporary folder."""
    import mlflow.artifacts

    source = client.get_model_version_download_uri(name, str(version))
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="v-", dir=_download_root()))
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
    from mcpl.concepts.embeddings import EMBEDS_FILE, load_concept

    client = client or client_for(uri, read_only=True)
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
        raise RegistryError("the same concept version was requested twice")
    return out


def load_into_pipeline(pipe, refs: Sequence[str], tokens: Sequence[str | None] | None = None,
                       uri: str | None = None, client=None, prompt: str | None = None) -> list[LoadedConcept]:
    """Load registry concepts into a diffusers pipeline; returns each one's prompt token.

    `tokens` overrides them (None entries keep the default). A token already in the
    tokenizer is an error (mcpl.generate.load_concepts), never a silent overwrite. With the
    `prompt` to be sampled, a UserWarning says when it uses none of the loaded tokens or is
    longer than the text encoder reads (mcpl.concepts.generate.prompt_warnings).
    """
    from mcpl.concepts.embeddings import EMBEDS_FILE
    from mcpl.concepts.generate import load_concepts, prompt_warnings

    loaded = fetch(refs, uri, client)
    for i, item in enumerate(loaded):
        if tokens and i < len(tokens) and tokens[i]:
            item.token = tokens[i]
    load_concepts(pipe, [i.folder / EMBEDS_FILE for i in loaded], [i.token for i in loaded])
    for message in prompt_warnings(pipe, prompt, [i.token for i in loaded]) if prompt is not None else ():
        warnings.warn(message, UserWarning, stacklevel=2)
    return loaded


def export_stem(file_name: str | None, registry_name: str = "concept") -> str:
    """The file stem of an export: `file_name` if it is one plain file name, else refused; by default
    the registry name reduced to letters, digits, `.`, `_` and `-` (names come from MLflow: untrusted)."""
    if file_name is not None:
        stem = file_name.removesuffix(".safetensors")
        if not STEM.match(stem) or ".." in stem:
            raise RegistryError(f"--name {shown(file_name)} is not a plain file name (letters, digits, '.', '_' "
                                "and '-'; no '/', no '..', at most 200 characters): exports are written inside "
                                "--out and nowhere else")
        return stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", registry_name).replace("..", ".").strip(".-")[:200]
    return stem or "concept"


def export(ref: str, out_dir: str | Path, fmt: ExportFormat = "diffusers", file_name: str | None = None,
           uri: str | None = None, client=None, *, force: bool = False) -> Path:
    """Write a registry concept as diffusers / Automatic1111 / ComfyUI read it (safetensors).

    Files go into `out_dir` only (the stem is one plain file name, `export_stem`). They are
    written into a private folder inside `out_dir` first, then moved into place: an existing
    file is refused unless `force`, and replaced (a symlink itself, never written through).
    """
    export_stem(file_name)  # refuse a bad --name before asking MLflow anything
    client = client or client_for(uri, read_only=True)
    name, version = resolve(client, ref)
    from mcpl.concepts.embeddings import EMBEDS_FILE, export_concept  # torch: only once there is a concept
    stem = export_stem(file_name, name)
    folder = download_version(client, name, version)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RegistryError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mcpl-export-", dir=out) as tmp:
        first = export_concept(folder / EMBEDS_FILE, tmp, fmt, name=stem)
        written = sorted(p for p in Path(tmp).iterdir() if p.is_file() and not p.is_symlink())
        targets = [out / p.name for p in written]
        existing = [t for t in targets if os.path.lexists(t)]
        if existing and not force:
            raise RegistryError(f"{existing[0]} already exists; pass --force to replace it (or choose another "
                                "--name / --out)")
        folders = [t for t in existing if t.is_dir() and not t.is_symlink()]
        if folders:
            raise RegistryError(f"{folders[0]} is a folder; choose another --name")
        for src, dst in zip(written, targets, strict=True):
            os.replace(src, dst)
    return out / Path(first).name


def list_concepts(uri: str | None = None, filter_string: str = "", client=None) -> list[dict[str, Any]]:
    """One row per concept: name, newest version, its token, strategy, source and sentence.

    A local SQLite store without a filter is read directly (read-only): importing MLflow and starting
    its store takes ~10 s on a 2-core machine, the query milliseconds. Any other store, a filter, or a
    schema that is not the one expected goes through MLflow."""
    if client is None and not filter_string:
        from mcpl.pipeline.tracking.store import resolve_tracking_uri, sqlite_path

        db = sqlite_path(resolve_tracking_uri(uri))
        if db is not None and db.is_file():
            rows = _list_from_sqlite(db)
            if rows is not None:
                return rows
    client = client or client_for(uri, read_only=True)
    rows = []
    for model in search_all(client.search_registered_models, filter_string):
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


def _list_from_sqlite(db: Path) -> list[dict[str, Any]] | None:
    """list_concepts' rows from MLflow's SQLite tables, opened read-only; None if the tables differ."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            names = con.execute("SELECT name FROM registered_models")
            model_tags: dict[str, dict[str, str]] = {name: {} for (name,) in names}
            for key, value, name in con.execute("SELECT key, value, name FROM registered_model_tags"):
                model_tags.setdefault(name, {})[key] = value
            versions: dict[str, list[int]] = {}
            for name, version in con.execute("SELECT name, version FROM model_versions "
                                             "WHERE current_stage != 'Deleted_Internal'"):
                versions.setdefault(name, []).append(int(version))
            version_tags: dict[tuple[str, int], dict[str, str]] = {}
            for key, value, name, version in con.execute("SELECT key, value, name, version FROM model_version_tags"):
                version_tags.setdefault((name, int(version)), {})[key] = value
            aliases: dict[str, list[str]] = {}
            for alias, name in con.execute("SELECT alias, name FROM registered_model_aliases"):
                aliases.setdefault(name, []).append(alias)
        finally:
            con.close()
    except sqlite3.Error:
        return None
    rows = []
    for name, tags in model_tags.items():
        if tags.get("kind") != "mcpl-concept":
            continue
        found = versions.get(name, [])
        newest = max(found, default=None)
        vtags = version_tags.get((name, newest), {}) if newest is not None else {}
        rows.append({"name": name, "versions": len(found), "latest": newest if newest is not None else "",
                     "aliases": ",".join(sorted(aliases.get(name, []))),
                     "token": vtags.get("token", ""), "strategy": vtags.get("strategy", ""),
                     "source_image": vtags.get("source_image", ""), "sentence": vtags.get("sentence", "")})
    return sorted(rows, key=lambda r: r["name"])


def show(ref: str, uri: str | None = None, client=None) -> dict[str, Any]:
    """A concept's versions with tags, run and aliases (for `mcpl registry show`)."""
    client = client or client_for(uri, read_only=True)
    name = REF.match(ref.strip())["name"] if REF.match(ref.strip()) else ref
    try:
        model = client.get_registered_model(name)
    except Exception as err:  # MLflow's "does not exist" is a user error; anything else propagates
        _missing(err, name)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    aliases = dict(model.aliases or {})
    return {"name": name, "description": model.description, "tags": dict(model.tags), "aliases": aliases,
            "versions": [{"version": v.version, "run_id": v.run_id, "source": v.source, "tags": dict(v.tags),
                          "aliases": [a for a, n in aliases.items() if str(n) == str(v.version)]}
                         for v in versions]}


def search_all(fn, filter_string: str) -> list:
    items, token = [], None
    while True:
        page = fn(filter_string=filter_string, max_results=200, page_token=token)
        items += list(page)
        token = getattr(page, "token", None)
        if not token:
            return items
