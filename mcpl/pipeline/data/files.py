"""Safe access to a dataset's files: paths that stay inside the root, guarded image decoding.

Every image goes through `open_image`, at validation and again when a job loads it, so
the pixels hashed into the manifest are exactly the pixels that train.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mcpl.errors import FileCheckError
from mcpl.method.prompts import shown, text_problem, visible

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: any camera photo passes; a decompression bomb does not
MIN_IMAGE_SIDE = 16  # px: below this a concept has nothing to learn from (a 1x1 image trained "fine")
MAX_PATH_CHARS = 1024  # far beyond any real layout; the OS's own limits are 4096 / 255 bytes a name
MAX_NAME_BYTES = 255  # one path component, in UTF-8 bytes (ext4, APFS, NTFS)
# Decoders allowed to run on dataset files. Pillow reads more (EPS and PDF through Ghostscript,
# PSD, ICO, ...): a file that only pretends to be a photo must never reach those.
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")  # JPEG includes MPO (phone photos)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//|[^/]*$)")
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


@dataclass
class ImageInfo:
    """What validation learned about a file, kept in the manifest."""

    file_bytes: int = 0
    format: str | None = None
    mode: str | None = None  # the file's own mode, before conversion
    width: int = 0  # after EXIF orientation
    height: int = 0
    notes: list[str] = field(default_factory=list)  # conversions applied


def check_path_text(relative: object) -> str:
    """The path text of a table cell, or FileCheckError saying why it cannot be a dataset path.

    Purely lexical (no file system access): type, length, control/invisible characters,
    separators, absolute, drive-letter and URL forms.
    """
    if not isinstance(relative, str) or not relative.strip():
        got = shown(relative) if isinstance(relative, str) else visible(repr(relative), 60)
        raise FileCheckError(f"expected a relative file path, got {got}")
    text = relative.strip()
    if len(text) > MAX_PATH_CHARS:
        raise FileCheckError(f"path of {len(text):,} characters; the limit is {MAX_PATH_CHARS:,}: {shown(text, 60)}")
    problem = text_problem(text)
    if problem:
        raise FileCheckError(f"{shown(text)}: the path contains a {problem}; rename the file")
    if "\\" in text:
        raise FileCheckError(f"{shown(text)}: use '/' as the path separator")
    if _URL.match(text):
        raise FileCheckError(f"{shown(text)} is a URL or a drive path; download or copy the file into the "
                             "dataset folder and give its path relative to it")
    if os.path.isabs(text) or PurePosixPath(text).is_absolute() or re.match(r"^[A-Za-z]:", text):
        raise FileCheckError(f"{shown(text)} is an absolute path; give it relative to the dataset folder")
    long = next((p for p in text.split("/") if len(p.encode("utf-8")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise FileCheckError(f"{shown(text, 60)}: a file or folder name of {len(long.encode('utf-8'))} bytes; "
                             f"the limit is {MAX_NAME_BYTES}")
    return text


def resolve_inside(root: Path, relative: object) -> Path:
    """`root / relative`, refusing absolute paths and anything (.., symlinks) that leaves root.

    The result is a regular file inside root (symlinks inside root are fine). Every OS
    error on the way (a symlink loop, a name too long, no permission) is a FileCheckError.
    """
    text = check_path_text(relative)
    try:
        base = root.resolve()
        lexical = Path(os.path.normpath(base / text))
        if not lexical.is_relative_to(base):
            raise FileCheckError(f"{shown(text)} leaves the dataset folder; keep files inside {root}")
        real = lexical.resolve()
        if not real.is_relative_to(base):
            raise FileCheckError(f"{shown(text)} is a symlink (or passes through one) to {shown(str(real))}, outside "
                                 f"the dataset folder; copy the file into {root}")
        try:
            info = real.stat()
        except FileNotFoundError:
            raise FileCheckError(f"{shown(text)}: file not found in {root}{_near_miss(base, lexical)}") from None
    except RuntimeError as err:  # Python 3.11's Path.resolve on a symlink loop
        raise FileCheckError(f"{shown(text)}: cannot resolve it ({err}); fix the symlink") from None
    except OSError as err:
        raise FileCheckError(f"{shown(text)}: cannot access it ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise FileCheckError(f"{shown(text)} is {kind}, not an image file")
    return real


def _near_miss(base: Path, wanted: Path) -> str:
    """A hint when the file exists under another case or Unicode normalisation ("Dog.PNG" vs "dog.png")."""
    parent = wanted.parent
    try:
        if not parent.is_dir() or not parent.resolve().is_relative_to(base):
            return ""
        key = unicodedata.normalize("NFC", wanted.name).casefold()
        with os.scandir(parent) as entries:
            for i, entry in enumerate(entries):
                if i > 10_000:
                    break
                if entry.name != wanted.name and unicodedata.normalize("NFC", entry.name).casefold() == key:
                    return (f" (there is {shown(entry.name)} in that folder: names are case- and "
                            "byte-sensitive; write the name exactly as on disk)")
    except OSError:
        pass
    return ""


def open_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, kind: str = "RGB") -> tuple[Image.Image, ImageInfo]:
    """Decode an image safely and return it as `kind` ("RGB" or "L") with what was done to it.

    Checks, in order: empty file, recognisable format, pixel count against `max_pixels`
    (read from the header, before decoding), complete decoding; then applies the EXIF
    orientation and converts the mode (alpha composited on white, 16-bit scaled to 8).
    """
    fh = _open_regular(path)
    try:
        return _decode(fh, max_pixels, kind)
    finally:
        fh.close()


def _open_regular(path: Path):
    """Open for reading without following a final symlink or blocking on a FIFO; must be a regular file.

    resolve_inside checked the path, but the file may have been swapped since: what is
    opened is checked again (fstat), so a FIFO, a device or a new symlink is never read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise FileCheckError(f"cannot open the file ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
            raise FileCheckError(f"the file is {kind}, not an image file")
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(fh, max_pixels: int, kind: str) -> tuple[Image.Image, ImageInfo]:
    info = ImageInfo(file_bytes=os.fstat(fh.fileno()).st_size)
    if info.file_bytes == 0:
        raise FileCheckError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh, formats=FORMATS)
    except Image.DecompressionBombError as err:
        raise FileCheckError(_bomb_message(err.args[0] if err.args else "", max_pixels)) from None
    except UnidentifiedImageError:
        raise FileCheckError(f"not an image file in an accepted format ({', '.join(FORMATS)}): corrupt, "
                             "or another kind of file") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, reported as such
        raise FileCheckError(f"cannot open image: {type(err).__name__}: {err}") from None
    with img:
        info.format, info.mode = img.format, img.mode
        if getattr(img, "is_animated", False):
            info.notes.append(f"{img.format} with several frames: the first frame is used")
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
        if out is img:
            out = img.copy()  # detach from the file, which is closed on return
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
    if not isinstance(orientation, int) or not 2 <= orientation <= 8:
        info.notes.append(f"invalid EXIF orientation {orientation!r} ignored")
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
    """open_image, with the file named in its error (a job's error must say which input broke).

    Images (kind RGB) must be at least MIN_IMAGE_SIDE on each side; masks must match
    their image, which is checked by the caller.
    """
    path = resolve_inside(root, relative)
    try:
        image, info = open_image(path, max_pixels, kind)
        if kind == "RGB" and min(image.size) < MIN_IMAGE_SIDE:
            raise FileCheckError(f"image is {image.width}x{image.height} pixels; at least {MIN_IMAGE_SIDE} px on "
                                 "each side are needed to learn a concept from it")
        return image, info
    except FileCheckError as err:
        raise FileCheckError(f"{relative.strip()}: {err}") from None


def mask_pixels(mask: Image.Image) -> int:
    """How many pixels count as object (> 127, the rule mcpl.concepts.metrics uses)."""
    return int((np.asarray(mask) > 127).sum())
