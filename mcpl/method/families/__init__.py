"""Model families: one adapter each (sd, sdxl, ldm), found from a folder's model_index.json."""

from __future__ import annotations

from mcpl.errors import ModelLoadError
from mcpl.method.families.base import Components, Conditioning, Family, TextStack
from mcpl.method.families.index import model_index
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
    index = model_index(model)
    if index is None:
        return StableDiffusion.pipeline_classes[0]
    return str(index.get("_class_name", ""))


def family_of(model: str) -> Family:
    """The adapter for a model folder or hub id; a clear error for anything else."""
    name = pipeline_class(model)
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    raise ModelLoadError(f"{model} is a {name or 'unknown'} model; mcpl trains {supported()}")


__all__ = ["FAMILIES", "Components", "Conditioning", "Family", "TextStack", "family_of", "pipeline_class"]
