"""Pictures people look at: attention heat maps over the image, and image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PANEL = 160


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to a blue -> cyan -> yellow -> red ramp, (H, W, 3) uint8."""
    stops = np.array([[0, 0, 0.5], [0, 0.8, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(x).astype(int).clip(0, len(stops) - 2)
    frac = (x - low)[..., None]
    return ((stops[low] * (1 - frac) + stops[low + 1] * frac) * 255).astype(np.uint8)


def overlay(image: Image.Image, attention: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """One map (h, w), divided by its max, blended over the image at panel size."""
    base = image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.NEAREST)
    m = attention.detach().float()[None, None]
    m = F.interpolate(m, size=(PANEL, PANEL), mode="bilinear", align_corners=False)[0, 0]
    m = (m / m.max().clamp_min(1e-8)).cpu().numpy()
    heat = Image.fromarray(heat_colours(m))
    return Image.blend(base, heat, alpha)


def labelled_row(panels: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """Panels side by side, each with a caption strip underneath."""
    strip = 18
    out = Image.new("RGB", (PANEL * len(panels), PANEL + strip), "white")
    draw = ImageDraw.Draw(out)
    for i, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        out.paste(panel.resize((PANEL, PANEL), Image.Resampling.NEAREST), (i * PANEL, 0))
        draw.text((i * PANEL + 4, PANEL + 3), label[:26], fill="black")
    return out


def attention_figure(image: Image.Image, maps: dict[str, torch.Tensor], path: Path | None = None) -> Image.Image:
    """The image, then one overlay per concept, labelled with its token."""
    panels = [image] + [overlay(image, m) for m in maps.values()]
    figure = labelled_row(panels, ["image"] + list(maps))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.save(path)
    return figure


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str]) -> Image.Image:
    """Rows of images, each row labelled: one labelled_row per row, stacked."""
    built = [labelled_row(list(r), [f"{label}" if j == 0 else "" for j in range(len(r))])
             for r, label in zip(rows, labels, strict=True)]
    width = max(r.width for r in built)
    out = Image.new("RGB", (width, sum(r.height for r in built)), "white")
    y = 0
    for r in built:
        out.paste(r, (0, y))
        y += r.height
    return out
