"""A model's model_index.json, from a local folder or a cached hub id: which pipeline, which classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mcpl.errors import ModelLoadError


def model_index(model: str) -> dict | None:
    """The folder's (or cached hub id's) model_index.json; None for a folder without one."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None
        try:
            data = json.loads(index.read_text())
        except ValueError as err:
            raise ModelLoadError(f"{index} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{index} is not a JSON object")
        return data
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model folder {model} does not exist")
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(model))
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(f"cannot load model {model!r}: {err}\n" + (
            "HF_HUB_OFFLINE=1: a hub id works only if it is fully in the local cache; pass a local diffusers "
            "folder instead." if offline else "Pass a diffusers folder or a hub id that is reachable or cached.")
        ) from None


def component_class(model: str, subfolder: str, default: str) -> str:
    """The class model_index.json names for a subfolder (e.g. "vqvae": ["diffusers", "VQModel"])."""
    entry = (model_index(model) or {}).get(subfolder)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return default
