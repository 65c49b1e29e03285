"""Write toy-world scenes as a dataset folder in the project format (docs/FORMAT.md).

    python -m mcpl.toyworld.dataset --out data/toyworld-2obj --n 50 --objects 2

Layout: images/<id>.png, masks/<id>_<name>.png (white = object), rows.jsonl with the
columns image, sentence, masks, meta (meta = caption, seed and each object's colour,
shape and bbox). Sentences mark each object as a concept; `style` picks how:

- "generic": `a <obj1|object> and a <obj2|object>` (nothing gives the object away)
- "shape":   `a red <obj1|circle> and a blue <obj2|square>` (shape word initialises,
  colour word stays an ordinary word and is bound as the concept's adjective)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mcpl.toyworld.render import ALL_PAIRS, HELDOUT_PAIRS, TRAIN_PAIRS, Rendered, bbox, render, sample_scene

STYLES = ("generic", "shape")
PAIR_SETS = {"all": ALL_PAIRS, "train": TRAIN_PAIRS, "heldout": HELDOUT_PAIRS}


def concept_sentence(r: Rendered, style: str = "generic") -> str:
    """The concept sentence of a rendered scene, objects named obj1, obj2, ... in caption order."""
    parts = []
    for k, o in enumerate(r.scene.objects, start=1):
        if style == "generic":
            parts.append(f"a <obj{k}|object>")
        elif style == "shape":
            parts.append(f"a {o.colour} <obj{k}|{o.shape}|{o.colour}>")
        else:
            raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    return " and ".join(parts)


def row_for(r: Rendered, stem: str, style: str) -> dict:
    """One rows.jsonl record (paths relative to the dataset folder)."""
    objects = [
        {"name": f"obj{k}", "colour": o.colour, "shape": o.shape, "bbox": bbox(m)}
        for k, (o, m) in enumerate(zip(r.scene.objects, r.masks, strict=True), start=1)
    ]
    return {
        "image": f"images/{stem}.png",
        "sentence": concept_sentence(r, style),
        "masks": {f"<obj{k}>": f"masks/{stem}_obj{k}.png" for k in range(1, len(objects) + 1)},
        "meta": {
            "caption": r.caption,
            "seed": r.scene.seed,
            "size": int(r.image.shape[0]),
            "objects": objects,
        },
    }


def write_dataset(
    out: str | Path,
    n: int,
    objects: int | None = 2,
    seed: int = 0,
    pairs: str = "all",
    style: str = "generic",
    size: int = 32,
) -> list[dict]:
    """Render `n` scenes (seeds seed*100003 + i) into `out`; returns the rows written."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene_seed = seed * 100_003 + i
        r = render(sample_scene(scene_seed, n_objects=objects, pairs=PAIR_SETS[pairs]), size=size)
        stem = f"{i:05d}"
        Image.fromarray(r.image).save(out / "images" / f"{stem}.png")
        for k, m in enumerate(r.masks, start=1):
            Image.fromarray((m * 255).astype(np.uint8)).save(out / "masks" / f"{stem}_obj{k}.png")
        rows.append(row_for(r, stem, style))
    with open(out / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a toy-world dataset folder.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--objects", type=int, default=2, help="objects per scene (1-3); 0 = random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", choices=sorted(PAIR_SETS), default="all")
    ap.add_argument("--style", choices=STYLES, default="generic")
    ap.add_argument("--size", type=int, default=32, choices=(32, 64))
    a = ap.parse_args(argv)
    rows = write_dataset(a.out, a.n, a.objects or None, a.seed, a.pairs, a.style, a.size)
    print(f"wrote {len(rows)} rows to {a.out}/rows.jsonl")


if __name__ == "__main__":
    main()
