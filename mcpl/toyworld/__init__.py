"""The toy world: a seeded renderer of coloured shapes with exact masks, a tiny
text-to-image model pretrained on it, and a checker that reads generated images.

Real Stable Diffusion weights cannot be downloaded here, so MCPL is developed and
benchmarked against this world (see docs/TOYWORLD.md).
"""

from mcpl.toyworld.render import (
    ALL_PAIRS,
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    TRAIN_PAIRS,
    Rendered,
    Scene,
    caption,
    render,
    sample_scene,
)

__all__ = [
    "ALL_PAIRS",
    "COLOURS",
    "HELDOUT_PAIRS",
    "SHAPES",
    "TRAIN_PAIRS",
    "Rendered",
    "Scene",
    "caption",
    "render",
    "sample_scene",
]
