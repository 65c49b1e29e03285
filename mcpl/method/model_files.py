"""Facts about a model folder that need no model loaded: its content hash, hints, the default model.

Light on purpose (no torch): job ids and data validation use these.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mcpl.provenance import REPO_ROOT

TOY_MODEL = REPO_ROOT / "models" / "toyworld"
TINY_FALLBACK = REPO_ROOT / "models" / "tiny-random"
# Optional per-model defaults in the model folder: {"learning_rate": float,
# "attention_downscale": int, "templates": [str, ...]} (e.g. a model that never saw "a photo of").
HINTS_FILE = "mcpl_hints.json"


def read_hints(model: str | Path) -> dict:
    """The model folder's mcpl_hints.json, or {} (hub ids and folders without one)."""
    path = Path(model) / HINTS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def default_model() -> str:
    """The embedded default: the toy-world model when shipped, else a tiny model built once."""
    if (TOY_MODEL / "model_index.json").exists():
        return str(TOY_MODEL)
    if not (TINY_FALLBACK / "model_index.json").exists():
        from mcpl.method.tiny import build_tiny_model

        build_tiny_model(TINY_FALLBACK)
    return str(TINY_FALLBACK)


_KNOWN: dict[str, str] = {}


def remember_hash(model: str, digest: str) -> None:
    """A hash computed elsewhere (a batch's parent process), so a worker does not read the folder again."""
    _KNOWN[model] = digest


def model_hash(model: str) -> str:
    """sha256 over a model folder's weight and config files (names + bytes), short form.

    Computed once per process (and handed to workers): a 4 GB folder takes seconds to read.
    """
    if model not in _KNOWN:
        _KNOWN[model] = _hash_folder(model)
    return _KNOWN[model]


def _hash_folder(model: str) -> str:
    path = Path(model)
    if not path.exists():
        return "hub:" + model
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
