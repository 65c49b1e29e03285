"""Safe access to a dataset's files: paths that stay inside the root, guarded image decoding.

Every image goes through `open_image`, at validation and again when a job loads it, so
the pixels hashed into the manifest are exactly the pixels that train.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mcpl.errors import FileCheckError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: any camera photo passes; a decompression bomb does not
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


@dataclass
class ImageInfo:
    """What validation learned about a file, kept in the manifest."""

    file_bytes: int = 0
    format: str | None = None
    mode: str | None = None  # the file's own mode, before conversion
    width: int = 0  # after EXIF orientation
    height: int = 0
    notes: list[str] = field(default_factory=list)  # conversions applied


def resolve_inside(root: Path, relative: object) -> Path:
    """`root / relative`, refusing absolute paths and anything (.., symlinks) that leaves root."""
    if not isinstance(relative, str) or not relative.strip():
        raise FileCheckError(f"expected a relative file path, got {relative!r}")
    text = relative.strip()
    if "\\" in text:
        raise FileCheckError(f"{text!r}: use '/' as the path separator")
    if os.path.isabs(text) or PurePosixPath(text).is_absolute() or re.match(r"^[A-Za-z]:/", text):
        raise FileCheckError(f"{text!r} is an absolute path; give it relative to the dataset folder")
    base = root.resolve()
    lexical = Path(os.path.normpath(base / text))
    if not lexical.is_relative_to(base):
        raise FileCheckError(f"{text!r} leaves the dataset folder; keep files inside {root}")
    real = lexical.resolve()
    if not real.is_relative_to(base):
        raise FileCheckError(f"{text!r} is a symlink (or passes through one) to {real}, outside the "
                             f"dataset folder; copy the file into {root}")
    if not real.exists():
        raise FileCheckError(f"{text!r}: file not found in {root}")
    if not real.is_file():
        raise FileCheckError(f"{text!r} is not a regular file")
    return real


def open_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, kind: str = "RGB") -> tuple[Image.Image, ImageInfo]:
    """Decode an image safely and return it as `kind` ("RGB" or "L") with what was done to it.

    Checks, in order: empty file, recognisable format, pixel count against `max_pixels`
    (read from the header, before decoding), complete decoding; then applies the EXIF
    orientation and converts the mode (alpha composited on white, 16-bit scaled to 8).
    """
    info = ImageInfo(file_bytes=path.stat().st_size)
    if info.file_bytes == 0:
        raise FileCheckError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise FileCheckError(_bomb_message(err.args[0] if err.args else "", max_pixels)) from None
    except UnidentifiedImageError:
        raise FileCheckError("not an image file Pillow can read (corrupt or unsupported format)") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, reported as such
        raise FileCheckError(f"cannot open image: {type(err).__name__}: {err}") from None
    with img:
        info.format, info.mode = img.format, img.mode
        width, height = img.size
        if width * height > max_pixels:
            raise FileCheckError(f"{width}x{height} = {width * height:,} pixels is over the limit of "
                                 f"{max_pixels:,} (decompression-bomb guard); downscale the image or "
                                 "raise --max-pixels if it is genuine")
        if width == 0 or height == 0:
            raise FileCheckError(f"image has no pixels ({width}x{height})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except Exception as err:  # noqa: BLE001
            raise FileCheckError(f"cannot decode image ({type(err).__name__}: {err}); the file is "
                                 "truncated or corrupt, export it again") from None
        out = _orient(img, info)
        out = _to_mode(out, kind, info)
    info.width, info.height = out.size
    return out, info


def _bomb_message(detail: str, max_pixels: int) -> str:
    return (f"image is too large to decode safely ({detail}); the limit is {max_pixels:,} pixels "
            "(decompression-bomb guard)")


def _orient(img: Image.Image, info: ImageInfo) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the pixels as stored
        info.notes.append("unreadable EXIF ignored")
        return img
    if orientation in (None, 1):
        return img
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001
        raise FileCheckError(f"cannot apply EXIF orientation {orientation}: {err}") from None
    info.notes.append(f"EXIF orientation {orientation} applied")
    return rotated


def _to_mode(img: Image.Image, kind: str, info: ImageInfo) -> Image.Image:
    """Convert to RGB (images) or L (masks); transparency goes on white (images) or black (masks)."""
    mode = img.mode
    if mode == kind:
        return img
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        array = np.asarray(img).astype(np.int64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise FileCheckError(f"{mode} image with values outside 0..65535; save it as 8 or 16 bit")
        if mode != "I" or (array.size and array.max() > 255):
            array = (array + 128) // 257  # 16-bit -> 8-bit, rounded
        info.notes.append(f"{mode} (16-bit greyscale) scaled to 8-bit {kind}")
        return Image.fromarray(array.astype(np.uint8), "L").convert(kind)
    if mode == "F":
        raise FileCheckError("floating-point image (mode F): save it as an 8- or 16-bit image")
    try:
        if mode in ALPHA_MODES or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            fill = (255, 255, 255, 255) if kind == "RGB" else (0, 0, 0, 255)
            out = Image.alpha_composite(Image.new("RGBA", rgba.size, fill), rgba).convert(kind)
            info.notes.append(f"{mode} -> {kind}, transparency composited on "
                              f"{'white' if kind == 'RGB' else 'black'}")
            return out
        out = img.convert(kind)
    except (ValueError, OSError) as err:
        raise FileCheckError(f"cannot convert mode {mode} to {kind}: {err}") from None
    info.notes.append(f"{mode} -> {kind}")
    return out


def load_image(root: Path, relative: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageInfo]:
    """A dataset image as RGB, by its path relative to root (all checks applied)."""
    return _open_named(root, relative, max_pixels, "RGB")


def load_mask(root: Path, relative: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageInfo]:
    """A mask as an 8-bit greyscale image (white = object), all checks applied."""
    return _open_named(root, relative, max_pixels, "L")


def _open_named(root: Path, relative: str, max_pixels: int, kind: str) -> tuple[Image.Image, ImageInfo]:
    """open_image, with the file named in its error (a job's error must say which input broke)."""
    path = resolve_inside(root, relative)
    try:
        return open_image(path, max_pixels, kind)
    except FileCheckError as err:
        raise FileCheckError(f"{relative}: {err}") from None


def mask_pixels(mask: Image.Image) -> int:
    """How many pixels count as object (> 127, the rule mcpl.concepts.metrics uses)."""
    return int((np.asarray(mask) > 127).sum())
