"""Find, fetch, load and export registry concepts by name: `NAME`, `NAME@ALIAS`, `NAME/3`, `models:/...`.

`models:/<name>@latest` is MLflow's own newest-version alias; the publisher adds one alias
per strategy (`@one`, `@all`, `@diverse`). Loading several concepts gives each its own
prompt token: two that both learned `<dog>` are renamed, never silently overwritten.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcpl.concepts.embeddings import EMBEDS_FILE, ExportFormat, export_concept, load_concept
from mcpl.errors import RegistryError
from mcpl.pipeline.tracking.store import client_for

SNAPSHOT_MODEL = "mcpl-registry"
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
    from mcpl.concepts.generate import load_concepts, prompt_warnings

    loaded = fetch(refs, uri, client)
    for i, item in enumerate(loaded):
        if tokens and i < len(tokens) and tokens[i]:
            item.token = tokens[i]
    load_concepts(pipe, [i.folder / EMBEDS_FILE for i in loaded], [i.token for i in loaded])
    for message in prompt_warnings(pipe, prompt, [i.token for i in loaded]) if prompt is not None else ():
        warnings.warn(message, UserWarning, stacklevel=2)
    return loaded


def export(ref: str, out_dir: str | Path, fmt: ExportFormat = "diffusers", file_name: str | None = None,
           uri: str | None = None, client=None) -> Path:
    """Write a registry concept as diffusers / Automatic1111 / ComfyUI read it (safetensors)."""
    client = client or client_for(uri, read_only=True)
    name, version = resolve(client, ref)
    folder = download_version(client, name, version)
    return export_concept(folder / EMBEDS_FILE, out_dir, fmt, name=file_name or name)


def list_concepts(uri: str | None = None, filter_string: str = "", client=None) -> list[dict[str, Any]]:
    """One row per concept: name, newest version, its token, strategy, source and sentence."""
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
