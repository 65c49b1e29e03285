"""Model families: one adapter each (sd, sdxl, ldm), found from a folder's model_index.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mcpl.errors import ModelLoadError
from mcpl.method.families.base import Components, Conditioning, Family, TextStack
from mcpl.method.families.ldm import LatentDiffusion
from mcpl.method.families.sd import StableDiffusion
from mcpl.method.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), LatentDiffusion())}


def supported() -> str:
    return "; ".join(f"{f.description}" for f in FAMILIES.values())


def pipeline_class(model: str) -> str:
    """`_class_name` of a model folder's (or cached hub id's) model_index.json.

    A folder without one is taken for Stable Diffusion's layout, so its missing parts are named.
    """
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return StableDiffusion.pipeline_classes[0]
        try:
            return str(json.loads(index.read_text()).get("_class_name", ""))
        except ValueError as err:
            raise ModelLoadError(f"{index} is not valid JSON: {err}") from None
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model folder {model} does not exist")
    try:
        from diffusers import DiffusionPipeline

        return str(DiffusionPipeline.load_config(model).get("_class_name", ""))
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(f"cannot load model {model!r}: {err}\n" + (
            "HF_HUB_OFFLINE=1: a hub id works only if it is fully in the local cache; pass a local diffusers "
            "folder instead." if offline else "Pass a diffusers folder or a hub id that is reachable or cached.")
        ) from None


def family_of(model: str) -> Family:
    """The adapter for a model folder or hub id; a clear error for anything else."""
    name = pipeline_class(model)
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    raise ModelLoadError(f"{model} is a {name or 'unknown'} model; mcpl trains {supported()}")


__all__ = ["FAMILIES", "Components", "Conditioning", "Family", "TextStack", "family_of", "pipeline_class"]
