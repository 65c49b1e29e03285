"""The hostile-input corpus: every column, file kind, path and number an attacker (or an
unlucky user) can put in a table row, in one table, validated once.

Each case is one row with its exact expected outcome: the columns it is rejected for, with a
fragment of each reason, or a documented correct accept (docs/DATA.md, "Hostile input").
Around the corpus: validation never raises and writes a manifest with every row, nothing
outside the dataset folder changes, and the CLI prints no traceback and no raw control
character. Table-level tricks (encodings, CSV quoting, blank lines) are in
test_hostile_tables.py; the batch's row accounting in test_accounting.py.
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.data import BOX1, add_good_files, mask
from helpers.hostile import GOOD, pic, raw_file, snapshot
from PIL import Image

from mcpl.pipeline.data import validate_dataset


def row(image: str, sentence: str = GOOD, **extra) -> dict:
    return {"image": image, "sentence": sentence, **extra}


def png_bytes(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


@dataclass
class Case:
    """One row of the corpus: `build(root, folder)` writes its files and returns the row (a dict, or a
    raw JSONL line); `rejected` maps each rejected column to a fragment of its reason (None: accepted)."""

    id: str
    build: Callable[[Path, str], dict | str]
    rejected: dict[str, str] | None = None
    warning: str | None = None  # accepted with this warning
    converted: str | None = None  # accepted with this conversion note
    extra: dict = field(default_factory=dict)


def outside(root: Path) -> Path:
    """Files beside the dataset folder that a hostile row points at; they must never change."""
    return root.parent / "outside"


# ------------------------------------------------------------------------------- cases
def _fifo(root, d):
    (root / d).mkdir()
    os.mkfifo(root / d / "pipe.png")
    return row(f"{d}/pipe.png")


def _symlink_out(root, d):
    (root / d).mkdir()
    os.symlink(outside(root) / "secret.png", root / d / "link.png")
    return row(f"{d}/link.png")


def _symlink_in(root, d):
    pic(root, f"{d}/real.png")
    os.symlink("real.png", root / d / "link.png")
    return row(f"{d}/link.png")


def _symlink_loop(root, d):
    (root / d).mkdir()
    os.symlink("b.png", root / d / "a.png")
    os.symlink("a.png", root / d / "b.png")
    return row(f"{d}/a.png")


def _dangling(root, d):
    (root / d).mkdir()
    os.symlink("nowhere.png", root / d / "a.png")
    return row(f"{d}/a.png")


def _dev_null(root, d):
    (root / d).mkdir()
    os.symlink("/dev/zero", root / d / "zero.png")
    return row(f"{d}/zero.png")


def _hardlink_image(root, d):
    (root / d).mkdir()
    src = pic(outside(root), f"hard-{d}.png")
    os.link(outside(root) / src, root / d / "hard.png")
    return row(f"{d}/hard.png")


def _hardlink_text(root, d):
    (root / d).mkdir()
    os.link(outside(root) / "secret.txt", root / d / "secret.png")
    return row(f"{d}/secret.png")


def _nfd(root, d):
    pic(root, f"{d}/" + unicodedata.normalize("NFC", "café.png"))
    return row(f"{d}/" + unicodedata.normalize("NFD", "café.png"))


def _case(root, d):
    pic(root, f"{d}/Photo.PNG")
    return row(f"{d}/photo.png")


def _truncated(root, d):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    return row(raw_file(root, f"{d}/cut.png", data[: len(data) // 2]))


def _bomb(root, d):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")
    return row(raw_file(root, f"{d}/bomb.png", data))


def _animated(root, d):
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].paste((0, 255, 0), (0, 0, 5, 5))
    (root / d).mkdir()
    frames[0].save(root / d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return row(f"{d}/anim.gif")


def _multipage_tiff(root, d):
    frames = [Image.new("RGB", (32, 32), c) for c in ("yellow", "blue")]
    (root / d).mkdir()
    frames[0].save(root / d / "pages.tif", save_all=True, append_images=frames[1:])
    return row(f"{d}/pages.tif")


def _sixteen_bit(root, d):
    array = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    (root / d).mkdir()
    Image.fromarray(array).save(root / d / "deep.png")
    return row(f"{d}/deep.png")


def _palette_transparent(root, d):
    (root / d).mkdir()
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    img.paste(2, (3, 3, 9, 9))
    img.save(root / d / "pal.png", transparency=0)
    return row(f"{d}/pal.png")


def _exif(orientation):
    def build(root, d):
        exif = Image.Exif()
        exif[0x0112] = orientation
        return row(pic(root, f"{d}/phone.jpg", size=(32, 48), fmt="JPEG", exif=exif))
    return build


def _float_tiff(root, d):
    (root / d).mkdir()
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(root / d / "float.tif")
    return row(f"{d}/float.tif")


def _ico(root, d):
    return row(pic(root, f"{d}/icon.ico", fmt="ICO"))


def _ppm(root, d):
    return row(pic(root, f"{d}/image.ppm", fmt="PPM"))


def _eps(root, d):
    return row(raw_file(root, f"{d}/fake.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
                                             b"newpath 0 0 moveto 32 32 lineto stroke showpage\n%%EOF\n"))


def _masked(mask_value, image_size=(32, 32), mask_img=None, sentence=GOOD):
    def build(root, d):
        image = pic(root, f"{d}/img.png", size=image_size)
        if mask_img is not None:
            (root / d / "m.png").parent.mkdir(parents=True, exist_ok=True)
            mask_img.save(root / d / "m.png")
        value = mask_value(d) if callable(mask_value) else mask_value
        return row(image, sentence, masks=value)
    return build


def _group(name, folder_tag=""):
    def build(root, d):
        return row(pic(root, f"{d}/g{folder_tag}.png"), group=name)
    return build


def _ov(overrides, sentence=GOOD):
    def build(root, d):
        return row(pic(root, f"{d}/o.png"), sentence, overrides=overrides)
    return build


def _line(template: str, sentence: str = GOOD):
    """A raw JSONL line (for what json.dumps would never write): {IMG} is replaced by a fresh image."""
    def build(root, d):
        return template.replace("{IMG}", pic(root, f"{d}/r.png")).replace("{SENT}", sentence)
    return build


def _img(rel_or_fn, sentence=GOOD, **extra):
    def build(root, d):
        image = rel_or_fn(root, d) if callable(rel_or_fn) else rel_or_fn
        return row(image, sentence, **extra)
    return build


def _sent(sentence):
    return _img(lambda root, d: pic(root, f"{d}/s.png"), sentence)


DEEP = "[" * 3000 + "]" * 3000  # RecursionError in Python's json (issue 10)
NESTED_40 = "[" * 40 + "]" * 40  # parses, but deeper than any column needs
TOKENIZER_SAYS = "cannot be written with the model's tokenizer"

CASES: list[Case] = [
    # ---- image: paths ----------------------------------------------------------------
    Case("image-nul-byte", _img("images/a\x00b.png"), {"image": "control character U+0000 NUL"}),
    Case("image-absolute", _img("/etc/passwd"), {"image": "is an absolute path"}),
    Case("image-dotdot", _img("../outside/secret.png"), {"image": "leaves the dataset folder"}),
    Case("image-dotdot-deep", _img("images/../../outside/secret.png"), {"image": "leaves the dataset folder"}),
    Case("image-dotdot-inside", _img(lambda root, d: pic(root, f"{d}/a.png") and f"{d}/sub/../a.png")),
    Case("image-url-http", _img("http://example.com/a.png"), {"image": "is a URL"}),
    Case("image-url-file", _img("file:///etc/passwd"), {"image": "is a URL"}),
    Case("image-windows-drive", _img("C:/Users/me/a.png"), {"image": "is an absolute path"}),
    Case("image-windows-drive-relative", _img("C:a.png"), {"image": "is a URL or a drive path"}),
    Case("image-backslash", _img("images\\a.png"), {"image": "use '/' as the path separator"}),
    Case("image-unc", _img("//server/share/a.png"), {"image": "is an absolute path"}),
    Case("image-tilde", _img("~/a.png"), {"image": "file not found"}),
    Case("image-very-long", _img("a/" * 2500 + "x.png"), {"image": "path of 5,005 characters"}),
    Case("image-long-name", _img("x" * 300 + ".png"), {"image": "a file or folder name of 304 bytes"}),
    Case("image-unicode-nfd", _nfd, {"image": "there is 'café.png' in that folder"}),
    Case("image-case", _case, {"image": "there is 'Photo.PNG' in that folder"}),
    Case("image-folder", _img(lambda root, d: (root / d).mkdir() or d), {"image": "is a folder"}),
    Case("image-fifo", _fifo, {"image": "is a named pipe (FIFO)"}),
    Case("image-symlink-outside", _symlink_out, {"image": "outside the dataset folder"}),
    Case("image-symlink-inside", _symlink_in),
    Case("image-symlink-loop", _symlink_loop, {"image": "fix the symlink"}),
    Case("image-symlink-dangling", _dangling, {"image": "file not found"}),
    Case("image-device", _dev_null, {"image": "outside the dataset folder"}),
    Case("image-hardlink-outside-image", _hardlink_image),  # documented: a hard link *is* the file
    Case("image-hardlink-outside-text", _hardlink_text, {"image": "not an image file in an accepted format"}),
    Case("image-bidi-override", _img("images/\u202egnp.exe"), {"image": "U+202E RIGHT-TO-LEFT OVERRIDE"}),
    Case("image-ansi", _img("\x1b[31mred.png"), {"image": "control character U+001B ESCAPE"}),
    Case("image-zero-width", _img("ima\u200bge.png"), {"image": "U+200B ZERO WIDTH SPACE"}),
    Case("image-formula", _img("=cmd|' /C calc'!A0"), {"image": "a spreadsheet formula"}),
    Case("image-surrounding-spaces", _img(lambda root, d: " " + pic(root, f"{d}/a.png") + " ")),
    # ---- image: values of the wrong type -----------------------------------------------
    Case("image-number", _img(5), {"image": "expected a relative file path, got 5"}),
    Case("image-list", _img(["a.png"]), {"image": "expected a relative file path, got ['a.png']"}),
    Case("image-object", _img({"path": "a.png"}), {"image": "expected a relative file path"}),
    Case("image-bool", _img(True), {"image": "expected a relative file path, got True"}),
    Case("image-empty", _img(""), {"image": "expected a relative file path, got ''"}),
    Case("image-blank", _img("   "), {"image": "expected a relative file path"}),
    Case("image-null", _img(None), {"image": "missing required column 'image'"}),
    # ---- image: file kinds --------------------------------------------------------------
    Case("image-zero-bytes", _img(lambda root, d: raw_file(root, f"{d}/e.png", b"")), {"image": "empty file"}),
    Case("image-truncated", _truncated, {"image": "truncated or corrupt"}),
    Case("image-random-bytes", _img(lambda root, d: raw_file(root, f"{d}/r.png", bytes(range(256)) * 4)),
         {"image": "not an image file in an accepted format"}),
    Case("image-json-as-png", _img(lambda root, d: raw_file(root, f"{d}/j.png", b'{"a": 1}')),
         {"image": "not an image file in an accepted format"}),
    Case("image-eps-disguised", _eps, {"image": "not an image file in an accepted format"}),
    Case("image-pdf-disguised", _img(lambda root, d: raw_file(root, f"{d}/p.png", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj")),
         {"image": "not an image file in an accepted format"}),
    Case("image-svg", _img(lambda root, d: raw_file(root, f"{d}/s.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>")),
         {"image": "not an image file in an accepted format"}),
    Case("image-ico", _ico, {"image": "not an image file in an accepted format"}),
    Case("image-ppm", _ppm, {"image": "not an image file in an accepted format"}),
    Case("image-1x1", _img(lambda root, d: pic(root, f"{d}/dot.png", size=(1, 1))),
         {"image": "image is 1x1 pixels; at least 16 px"}),
    Case("image-15x200", _img(lambda root, d: pic(root, f"{d}/thin.png", size=(15, 200))),
         {"image": "image is 15x200 pixels"}),
    Case("image-16x16", _img(lambda root, d: pic(root, f"{d}/small.png", size=(16, 16)))),
    Case("image-wide", _img(lambda root, d: pic(root, f"{d}/wide.png", size=(200, 20))),
         warning="training sees only its centred 20x20 square"),
    Case("image-bomb-header", _bomb, {"image": "decompression-bomb guard"}),
    Case("image-animated-gif", _animated, converted="the first frame is used"),
    Case("image-multipage-tiff", _multipage_tiff, converted="the first frame is used"),
    Case("image-cmyk-jpeg", _img(lambda root, d: pic(root, f"{d}/c.jpg", mode="CMYK", fmt="JPEG")),
         converted="CMYK -> RGB"),
    Case("image-16-bit", _sixteen_bit, converted="16-bit greyscale"),
    Case("image-palette-transparency", _palette_transparent, converted="transparency composited on white"),
    Case("image-rgba", _img(lambda root, d: pic(root, f"{d}/a.png", mode="RGBA")),
         converted="RGBA -> RGB, transparency composited on white"),
    Case("image-la", _img(lambda root, d: pic(root, f"{d}/la.png", mode="LA")), converted="LA -> RGB"),
    Case("image-bilevel", _img(lambda root, d: pic(root, f"{d}/b.png", mode="1")), converted="1 -> RGB"),
    Case("image-exif-rotated", _exif(6), converted="EXIF orientation 6 applied"),
    Case("image-exif-invalid", _exif(9), converted="invalid EXIF orientation 9 ignored"),
    Case("image-float", _float_tiff, {"image": "floating-point image"}),
    Case("image-webp", _img(lambda root, d: pic(root, f"{d}/w.webp", fmt="WEBP", lossless=True))),
    Case("image-bmp", _img(lambda root, d: pic(root, f"{d}/b.bmp", fmt="BMP"))),
    Case("image-tiff", _img(lambda root, d: pic(root, f"{d}/t.tiff", fmt="TIFF"))),
    Case("image-wrong-extension", _img(lambda root, d: pic(root, f"{d}/really-a-png.jpg", fmt="PNG"))),
    # ---- sentence ---------------------------------------------------------------------
    Case("sentence-nul", _sent(GOOD + "\x00"), {"sentence": "control character U+0000 NUL"}),
    Case("sentence-bell", _sent("\x07" + GOOD), {"sentence": "control character U+0007 BELL"}),
    Case("sentence-ansi", _sent("\x1b[2J\x1b[31m" + GOOD), {"sentence": "control character U+001B ESCAPE"}),
    Case("sentence-newline", _sent(GOOD.replace(" and ", "\nand ")), {"sentence": "U+000A LINE FEED"}),
    Case("sentence-tab", _sent(GOOD.replace(" and ", "\tand ")), {"sentence": "U+0009 TAB"}),
    Case("sentence-carriage-return", _sent(GOOD + "\r"), {"sentence": "U+000D CARRIAGE RETURN"}),
    Case("sentence-rlo", _sent(GOOD.replace("blue <", "\u202eblue <")), {"sentence": "U+202E RIGHT-TO-LEFT"}),
    Case("sentence-zero-width", _sent(GOOD.replace("a blue", "a bl\u200bue")), {"sentence": "U+200B"}),
    Case("sentence-bom", _sent("\ufeff" + GOOD), {"sentence": "U+FEFF"}),
    Case("sentence-line-separator", _sent(GOOD.replace(" and", "\u2028and")), {"sentence": "line separator U+2028"}),
    Case("sentence-lone-surrogate", _sent(GOOD + " \ud800"), {"sentence": "lone surrogate U+D800"}),
    Case("sentence-private-use", _sent(GOOD + " \ue000"), {"sentence": "private-use character U+E000"}),
    Case("sentence-emoji", _sent("a red \U0001f436 <c1|object|red> and a blue <c2|thing|blue>"),
         {"sentence": f"the word '\U0001f436' (U+1F436) {TOKENIZER_SAYS}"}),
    Case("sentence-accented", _sent("a red café <c1|object|red> and a blue <c2|thing|blue>"),
         {"sentence": f"the word 'café' (U+0063 U+0061 U+0066 U+00E9) {TOKENIZER_SAYS}"}),
    Case("sentence-nfd-accented", _sent("a red cafe\u0301 <c1|object|red> and a blue <c2|thing|blue>"),
         {"sentence": f"the word 'café' (U+0063 U+0061 U+0066 U+00E9) {TOKENIZER_SAYS}"}),
    Case("sentence-cjk", _sent("a red 猫 <c1|object|red> and a blue <c2|thing|blue>"),
         {"sentence": f"the word '猫' (U+732B) {TOKENIZER_SAYS}"}),
    Case("sentence-symbol", _sent("a red (big) <c1|object|red> and a blue <c2|thing|blue>"),
         {"sentence": f"the word '(' (U+0028) {TOKENIZER_SAYS}"}),
    Case("sentence-nbsp", _sent(GOOD.replace(" and", "\xa0and"))),  # documented: a non-breaking space is a space
    Case("sentence-uppercase", _sent("A RED <c1|object|red> AND A BLUE <c2|thing|blue>")),
    Case("sentence-too-long", _sent(GOOD + " and" * 1500),
         {"sentence": "is 6,048 characters long; the limit is 1,000"}),
    Case("sentence-too-many-tokens", _sent("a " * 40 + "<c1|object>"), {"sentence": "tokens long but the model reads"}),
    Case("sentence-formula", _sent("=HYPERLINK(\"http://x\") <c1|object>"), {"sentence": "a spreadsheet formula"}),
    Case("sentence-formula-plus", _sent("+" + GOOD), {"sentence": "a spreadsheet formula"}),
    Case("sentence-formula-at", _sent("@SUM(1) <c1|object>"), {"sentence": "a spreadsheet formula"}),
    Case("sentence-number", _sent(42), {"sentence": "expected text, got int"}),
    Case("sentence-list", _sent([GOOD]), {"sentence": "expected text, got list"}),
    Case("sentence-empty", _sent(""), {"sentence": "empty sentence"}),
    Case("sentence-no-marker", _sent("a red square"), {"sentence": "no placeholder"}),
    Case("sentence-special-token", _sent("a <|endoftext|> <c1|object>"), {"sentence": "invalid placeholder name"}),
    Case("sentence-html", _sent("<script>alert(1)</script> <c1|object>"), {"sentence": "invalid placeholder name"}),
    Case("sentence-unicode-name", _sent("a <çat|object>"), {"sentence": "invalid placeholder name 'çat'"}),
    Case("sentence-emoji-initializer", _sent("a <c1|\U0001f436>"), {"sentence": "invalid initializer word"}),
    Case("sentence-unknown-initializer", _sent("a <c1|café>"), {"sentence": "initializer word 'café' of <c1>"}),
    Case("sentence-five-fields", _sent("a <c1|a|b|c|d>"), {"sentence": "has 5 fields"}),
    Case("sentence-case-twins", _sent("a red <C1|object|red> and a blue <c1|thing|blue>"),
         {"sentence": "placeholders <C1> and <c1> differ only in case"}),
    Case("sentence-long-name", _sent(f"a <{'n' * 200}|object>"), {"sentence": "is 200 characters; at most 64"}),
    # ---- masks --------------------------------------------------------------------------
    Case("masks-string", _masked("m.png"), {"masks": "expected a JSON object"}),
    Case("masks-list", _masked(["m.png"]), {"masks": "expected a JSON object"}),
    Case("masks-key-not-placeholder", _masked({"<c 1>": "m.png"}), {"masks": "mask key '<c 1>' is not a placeholder"}),
    Case("masks-key-ansi", _masked({"\x1b[31m": "m.png"}), {"masks": "mask key '\\x1b[31m' is not a placeholder"}),
    Case("masks-two-for-one", _masked(lambda d: {"c1": f"{d}/m.png", "<c1>": f"{d}/m.png"}, mask_img=mask(BOX1)),
         {"masks": "two masks for <c1>"}),
    Case("masks-unknown-token", _masked(lambda d: {"<zz>": f"{d}/m.png"}, mask_img=mask(BOX1)),
         {"masks": "the sentence has no <zz>"}),
    Case("masks-path-number", _masked({"<c1>": 5}), {"masks": "mask of <c1>: expected a relative file path, got 5"}),
    Case("masks-path-outside", _masked({"<c1>": "../outside/secret.png"}), {"masks": "leaves the dataset folder"}),
    Case("masks-path-nul", _masked({"<c1>": "m\x00.png"}), {"masks": "control character U+0000"}),
    Case("masks-path-formula", _masked({"<c1>": "@m.png"}), {"masks": "a spreadsheet formula"}),
    Case("masks-size-mismatch", _masked(lambda d: {"<c1>": f"{d}/m.png"}, mask_img=mask(BOX1, size=40)),
         {"masks": "masks must match the image's size"}),
    Case("masks-empty", _masked(lambda d: {"<c1>": f"{d}/m.png"}, mask_img=Image.new("L", (32, 32), 0)),
         {"masks": "is empty: no white"}),
    Case("masks-folder", _masked(lambda d: {"<c1>": d}), {"masks": "is a folder"}),
    Case("masks-ten-thousand", _masked({f"<m{i}>": "m.png" for i in range(10_000)}),
         {"masks": "10,000 masks; at most 64"}),
    Case("masks-rgba-accepted", _masked(lambda d: {"c1": f"{d}/m.png"}, mask_img=mask(BOX1).convert("RGBA")),
         converted="mask of <c1>: RGBA -> L"),
    # ---- group --------------------------------------------------------------------------
    Case("group-bool", _group(True), {"group": "expected a name (text), got bool"}),
    Case("group-float", _group(1.5), {"group": "expected a name (text), got float"}),
    Case("group-list", _group(["g"]), {"group": "expected a name (text), got list"}),
    Case("group-control", _group("g\x1b[31m"), {"group": "control character U+001B"}),
    Case("group-long", _group("g" * 500), {"group": "the limit is 100"}),
    Case("group-formula", _group("=1+1"), {"group": "a spreadsheet formula"}),
    Case("group-single-row", _group("lonely"), {"group": "has only this row"}),
    Case("group-int-a", _group(7, "a")),  # 7 and "7" are one group (documented), trained as one job
    Case("group-int-b", _group("7", "b")),
    Case("group-blank", _group("   ")),  # documented: a blank group is no group
    # ---- overrides: every number --------------------------------------------------------
    Case("steps-huge", _ov({"steps": 10**12}), {"overrides": "steps: Input should be less than or equal to 100000"}),
    Case("steps-zero", _ov({"steps": 0}), {"overrides": "steps: Input should be greater than or equal to 1"}),
    Case("steps-negative", _ov({"steps": -5}), {"overrides": "steps: Input should be greater than or equal to 1"}),
    Case("steps-bool", _ov({"steps": True}), {"overrides": "steps: Input should be a valid integer"}),
    Case("steps-string", _ov({"steps": "500"}), {"overrides": "steps: Input should be a valid integer"}),
    Case("steps-fraction", _ov({"steps": 500.5}), {"overrides": "steps: Input should be a valid integer"}),
    Case("steps-2-to-64", _ov({"steps": 2**64}), {"overrides": "steps: Input should be less than or equal"}),
    Case("steps-null", _ov({"steps": None}), {"overrides": "steps: Input should be a valid integer"}),
    Case("steps-ok", _ov({"steps": 300})),
    Case("lr-nan", _line('{"image": "{IMG}", "sentence": "{SENT}", "overrides": {"learning_rate": NaN}}'),
         {"(row)": "NaN is not a JSON number"}),
    Case("lr-infinity", _line('{"image": "{IMG}", "sentence": "{SENT}", "overrides": {"learning_rate": Infinity}}'),
         {"(row)": "Infinity is not a JSON number"}),
    Case("lr-1e400", _line('{"image": "{IMG}", "sentence": "{SENT}", "overrides": {"learning_rate": 1e400}}'),
         {"(row)": "number 1e400 is too large"}),
    Case("steps-5000-digits", _line('{"image": "{IMG}", "sentence": "{SENT}", "overrides": {"steps": ' + "9" * 5000
                                    + "}}"), {"(row)": "Exceeds the limit (4300 digits)"}),
    Case("lr-zero", _ov({"learning_rate": 0}), {"overrides": "learning_rate: Input should be greater than 0"}),
    Case("lr-five", _ov({"learning_rate": 5}), {"overrides": "learning_rate: Input should be less than or equal to 1"}),
    Case("lr-string", _ov({"learning_rate": "0.01"}), {"overrides": "learning_rate: Input should be a valid number"}),
    Case("resolution-odd", _ov({"resolution": 513}), {"overrides": "resolution: Input should be a multiple of 8"}),
    Case("resolution-huge", _ov({"resolution": 100_000}), {"overrides": "resolution: Input should be less than"}),
    Case("batch-huge", _ov({"batch_size": 10**6}),
         {"overrides": "batch_size: Input should be less than or equal to 64"}),
    Case("vectors-17", _ov({"num_vectors": 17}),
         {"overrides": "num_vectors: Input should be less than or equal to 16"}),
    Case("views-100", _ov({"cl_views": 100}), {"overrides": "cl_views: Input should be less than or equal to 8"}),
    Case("views-one", _ov({"cl_views": 1}), {"overrides": "cl_views: Input should be greater than or equal to 2"}),
    Case("seed-negative", _ov({"seed": -1}), {"overrides": "seed: Input should be greater than or equal to 0"}),
    Case("seed-huge", _ov({"seed": 2**64}), {"overrides": "seed: Input should be less than or equal to 4294967295"}),
    Case("temperature-tiny", _ov({"cl_temperature": 1e-30}), {"overrides": "cl_temperature: Input should be greater"}),
    Case("threshold-one", _ov({"mask_threshold": 1.0}), {"overrides": "mask_threshold: Input should be less than 1"}),
    Case("flip-bool", _ov({"flip_p": True}), {"overrides": "flip_p: Input should be a valid number"}),
    Case("shuffle-two", _ov({"phrase_shuffle": 2}),
         {"overrides": "phrase_shuffle: Input should be less than or equal"}),
    Case("shuffle-nan", _ov({"phrase_shuffle": "nan"}),
         {"overrides": "phrase_shuffle: Input should be a valid number"}),
    Case("attn-mask-int", _ov({"attn_mask": 1}), {"overrides": "attn_mask: Input should be a valid boolean"}),
    Case("layers-too-many", _ov({"attention_layers": ["up"] * 100}),
         {"overrides": "attention_layers: List should have"}),
    Case("layers-huge-json", _ov({"attention_layers": ["x" * 2000] * 40}),
         {"overrides": "characters of JSON; the limit"}),
    Case("checkpoints-many", _ov({"keep_checkpoints": 10**6}), {"overrides": "keep_checkpoints: Input should be less"}),
    Case("map-timesteps-many", _ov({"map_timesteps": 10**4}), {"overrides": "map_timesteps: Input should be less"}),
    Case("strategy-bogus", _ov({"strategy": "rm -rf"}), {"overrides": "strategy: Input should be 'one', 'all' or"}),
    Case("strategy-diverse-alone", _ov({"strategy": "diverse"}), {"overrides": "needs several rows"}),
    Case("unknown-setting", _ov({"stepz": 5}), {"overrides": "stepz: Extra inputs are not permitted"}),
    Case("ansi-setting-name", _ov({"\x1b[31m": 5}), {"overrides": "\\x1b[31m: Extra inputs are not permitted"}),
    Case("overrides-list", _ov([1, 2]), {"overrides": "expected a JSON object of training settings, got list"}),
    Case("overrides-string", _ov("steps=5"), {"overrides": "expected a JSON object of training settings, got str"}),
    Case("overrides-nested", _line('{"image": "{IMG}", "sentence": "{SENT}", "overrides": {"attention_layers": '
                                   + NESTED_40 + "}}"), {"(row)": "nested more than 32 levels deep"}),
    # ---- meta -----------------------------------------------------------------------------
    Case("meta-list", _img(lambda root, d: pic(root, f"{d}/m.png"), meta=[1, 2]), {"meta": "expected a JSON object"}),
    Case("meta-string", _img(lambda root, d: pic(root, f"{d}/m.png"), meta="x"), {"meta": "expected a JSON object"}),
    Case("meta-huge", _img(lambda root, d: pic(root, f"{d}/m.png"), meta={"x": "y" * 100_000}),
         {"meta": "characters of JSON; the limit is 65,536"}),
    Case("meta-recursion", _line('{"image": "{IMG}", "sentence": "{SENT}", "meta": {"x": ' + DEEP + "}}"),
         {"(row)": "nested more than 32 levels deep"}),
    Case("meta-control-characters", _img(lambda root, d: pic(root, f"{d}/m.png"), meta={"note": "\x1b[31m\x00"})),
    Case("meta-big-int", _img(lambda root, d: pic(root, f"{d}/m.png"), meta={"id": 10**30})),  # documented: kept as is
    Case("meta-duplicate-key", _line('{"image": "{IMG}", "sentence": "{SENT}", "meta": {"a": 1, "a": 2}}'),
         {"(row)": "key(s) 'a' appear more than once"}),
    # ---- the row as a whole ---------------------------------------------------------------
    Case("row-duplicate-key", _line('{"image": "{IMG}", "image": "images/good.png", "sentence": "{SENT}"}'),
         {"(row)": "key(s) 'image' appear more than once"}),
    Case("row-array", lambda root, d: "[1, 2]", {"(row)": "expected a JSON object per line, got list"}),
    Case("row-null", lambda root, d: "null", {"(row)": "expected a JSON object per line, got NoneType"}),
    Case("row-string", lambda root, d: '"image"', {"(row)": "expected a JSON object per line, got str"}),
    Case("row-garbage", lambda root, d: "{not json", {"(row)": "not valid JSON"}),
    Case("row-trailing-comma", _line('{"image": "{IMG}", "sentence": "{SENT}",}'), {"(row)": "not valid JSON"}),
    Case("row-deep-array", lambda root, d: DEEP, {"(row)": "nested more than 32 levels deep"}),
    Case("row-unknown-column", _line('{"imagee": "{IMG}", "sentence": "{SENT}"}'),
         {"(row)": "unknown column(s) 'imagee'", "image": "missing required column 'image'"}),
    Case("row-many-unknown-columns", _line('{"image": "{IMG}", "sentence": "{SENT}", '
                                           + ", ".join(f'"k{i}": {i}' for i in range(5000)) + "}"),
         {"(row)": "'k9' and 4990 more (allowed"}),
    Case("row-empty-object", lambda root, d: "{}", {"image": "missing required column", "sentence": "missing"}),
    Case("row-latin-1", lambda root, d: '{"image": "caf\xe9.png", "sentence": "a <c1>"}'.encode("latin-1"),
         {"(row)": "text is not valid UTF-8 (byte 0xe9"}),
    Case("row-raw-line-separator", _line('{"image": "{IMG}", "sentence": "a <c1|object>\u2028and"}'),
         {"sentence": "line separator U+2028"}),  # one row, not two: U+2028 is not a line break of the table
    Case("row-byte-order-mark", _line('\ufeff{"image": "{IMG}", "sentence": "{SENT}"}')),  # concatenated files
    Case("row-duplicate-of-row-1", lambda root, d: add_good_files(root), {"(row)": "duplicate of row 1"}),
    Case("row-duplicate-content", lambda root, d: {**add_good_files(root, "copy"), "masks": None},
         {"(row)": "duplicate of row 1 (same image content"}),
]


# -------------------------------------------------------------------------- the corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model):
    top = tmp_path_factory.mktemp("hostile")
    root = top / "dataset"
    out = outside(root)
    out.mkdir(parents=True)
    pic(out, "secret.png")
    (out / "secret.txt").write_text("do not read me\n")
    lines = [json.dumps(add_good_files(root))]
    for i, case in enumerate(CASES):
        built = case.build(root, f"c{i:03d}")
        if isinstance(built, bytes):
            lines.append(built)
        else:
            lines.append(built if isinstance(built, str) else json.dumps(built))
    data = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines) + b"\n"
    (root / "rows.jsonl").write_bytes(data)
    before = snapshot(top, root)
    report = validate_dataset(root, model=tiny_model)
    after = snapshot(top, root)
    return {"root": root, "top": top, "report": report, "before": before, "after": after, "model": tiny_model}


def result(corpus, case: Case):
    number = CASES.index(case) + 2
    r = next(r for r in corpus["report"].rows if r.row == number)
    return r


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_outcome(corpus, case):
    r = result(corpus, case)
    if case.rejected is None:
        assert r.ok, (case.id, r.errors)
        if case.warning:
            assert any(case.warning in w for w in r.warnings), r.warnings
        if case.converted:
            assert any(case.converted in n for n in r.converted), r.converted
        return
    assert r.status == "rejected", case.id
    columns = {c for c, _ in r.errors}
    assert columns == set(case.rejected), (case.id, r.errors)
    for column, fragment in case.rejected.items():
        assert any(c == column and fragment in m for c, m in r.errors), (case.id, r.errors)


def test_every_row_is_in_the_manifest_in_order(corpus):
    report = corpus["report"]
    assert [r.row for r in report.rows] == list(range(1, len(CASES) + 2))
    table = pq.read_table(report.manifest)
    assert table.num_rows == len(CASES) + 1
    assert table.column("row").to_pylist() == list(range(1, len(CASES) + 2))
    statuses = dict(zip(table.column("row").to_pylist(), table.column("status").to_pylist(), strict=True))
    assert statuses[1] == "ok"
    for i, case in enumerate(CASES):
        assert statuses[i + 2] == ("ok" if case.rejected is None else "rejected"), case.id


def test_nothing_outside_the_dataset_changed(corpus):
    """Validation reads; it writes only the manifest, inside the dataset folder."""
    assert corpus["after"] == corpus["before"]
    written = {p.name for p in corpus["root"].iterdir() if p.is_file()} - {"rows.jsonl"}
    assert written == {"manifest.parquet"}
    assert (outside(corpus["root"]) / "secret.txt").read_text() == "do not read me\n"


def test_report_is_safe_to_print(corpus):
    text = corpus["report"].render()
    bad = [ch for ch in text if ch != "\n" and not (ch.isprintable() or ch == " ")]
    assert not bad, sorted(set(bad))
    assert "\\x1b[31mred.png" in text  # the user still sees what is there, escaped


def test_cli_prints_no_traceback_and_no_raw_control_character(corpus, capsys):
    from mcpl.cli import main

    code = main(["data", "validate", str(corpus["root"]), "--model", corpus["model"]])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 1, out[-2000:]
    assert "Traceback" not in out
    bad = {ch for ch in out if ch != "\n" and not (ch.isprintable() or ch == " ")}
    assert not bad, bad
    assert f"{len(CASES) + 1} row(s), {sum(c.rejected is None for c in CASES) + 1} valid" in out


def test_accepted_rows_become_jobs(corpus):
    """The documented accepts are real accepts: they plan into jobs like any good row."""
    from mcpl.config import ConfigSource
    from mcpl.pipeline.data import plan_jobs

    plan = plan_jobs(corpus["report"].manifest, ConfigSource(fields={"steps": 2}), corpus["model"])
    assert plan.accounted() == plan.table_rows == len(CASES) + 1
    planned = {r for j in plan.jobs for r in j.rows} | {m["row"] for m in plan.merged}
    accepted = {1} | {CASES.index(c) + 2 for c in CASES if c.rejected is None}
    assert planned == accepted
    group = next(j for j in plan.jobs if j.group == "7")
    assert len(group.rows) == 2
