"""Builders for the hostile-input tests: images no other row has, raw files, tree snapshots."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from PIL import Image

GOOD = "a red <c1|object|red> and a blue <c2|thing|blue>"
_colour = itertools.count(1)


def pic(root: Path, rel: str, size=(32, 32), mode: str = "RGB", fmt: str | None = None, **save) -> str:
    """Write a small image with pixels no other image of the run has (accepted rows must not be duplicates)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    n = next(_colour)
    img = Image.new("RGB", size, "white")
    img.paste((255, 0, 0), (2, 2, 14, 14))
    img.putpixel((size[0] - 1, size[1] - 1), (n % 256, n // 256 % 256, 77))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, fmt, **save)
    return rel


def raw_file(root: Path, rel: str, data: bytes) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every entry under `folder` (links not followed) with what could change; `skip` and below left out."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(base) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st = path.lstat()
            out[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink)
    return out
