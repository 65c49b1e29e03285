"""The example dataset: toy-world scenes rendered by the project (no downloads).

`write_example(out)` writes a few two-object scenes (one job each, masks included) with
mcpl.toyworld.dataset, then one MCPL-diverse group of two scenes that share a red circle.
The output is deterministic: same arguments, same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mcpl.toyworld.dataset import write_dataset
from mcpl.toyworld.render import bbox, render, sample_scene

# The group: two scenes that share one object (the concept the group learns) and differ in the other.
GROUP = "red-circle"
GROUP_SCENES = ((("red", "circle"), ("blue", "square")), (("red", "circle"), ("green", "triangle")))


def write_example(out: str | Path, scenes: int = 4, seed: int = 0, style: str = "shape",
                  group: bool = True, size: int = 32) -> list[dict]:
    """Render the example dataset into `out` (replacing what was there); returns its rows."""
    out = Path(out)
    for sub in ("images", "masks"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("rows.jsonl", "rows.csv"):
        (out / name).unlink(missing_ok=True)
    rows = write_dataset(out, scenes, objects=2, seed=seed, pairs="train", style=style, size=size)
    if group:
        for k, objects in enumerate(GROUP_SCENES):
            rows.append(_group_row(out, f"group_{k}", objects, seed * 100_003 + 90_000 + k, size))
    with open(out / "rows.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return rows


def _group_row(out: Path, stem: str, objects, scene_seed: int, size: int) -> dict:
    r = render(sample_scene(scene_seed, forced=list(objects)), size=size)
    Image.fromarray(r.image).save(out / "images" / f"{stem}.png")
    masks, parts, described = {}, [], []
    for o, m in zip(r.scene.objects, r.masks, strict=True):
        name = o.shape  # shapes differ within a scene; the shared object keeps its name across the group
        Image.fromarray((m * 255).astype(np.uint8)).save(out / "masks" / f"{stem}_{name}.png")
        masks[f"<{name}>"] = f"masks/{stem}_{name}.png"
        parts.append(f"a {o.colour} <{name}|{o.shape}|{o.colour}>")
        described.append({"name": name, "colour": o.colour, "shape": o.shape, "bbox": bbox(m)})
    return {"image": f"images/{stem}.png", "sentence": " and ".join(parts), "masks": masks, "group": GROUP,
            "meta": {"caption": r.caption, "seed": scene_seed, "size": size, "objects": described}}
