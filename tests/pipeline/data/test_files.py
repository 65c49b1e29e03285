"""Dataset validation of files: broken images, bombs, modes, EXIF orientation, paths, masks.

Every bad row must be rejected with a message naming the row and the reason, while the
good row of the same table still becomes a job.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers.data import (
    BOX1,
    BOX2,
    SENTENCE,
    add_good_files,
    assert_good_row_is_a_job,
    assert_rejected,
    mask,
    row_of,
    scene,
    write_jsonl,
)
from PIL import Image

from mcpl.config import TrainConfig
from mcpl.pipeline.data import load_jobs, validate_dataset


def validate(root: Path, model: str, **kw):
    return validate_dataset(root, model=model, **kw)


def one_bad(root: Path, model: str, bad: dict, **kw):
    """Table: row 1 good, row 2 the bad one."""
    good = add_good_files(root)
    write_jsonl(root, [good, {"sentence": SENTENCE, **bad}])
    report = validate(root, model, **kw)
    assert_good_row_is_a_job(report, model)
    return report


def noise(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries a sliver of data (a 'bomb' header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


# ------------------------------------------------------------------------- broken files
def test_zero_byte_image(tmp_path, tiny_model):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    report = one_bad(tmp_path, tiny_model, {"image": "images/empty.png"})
    assert_rejected(report, 2, "image", "empty file (0 bytes)")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, tiny_model, fmt):
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / f"cut.{fmt.lower()}"
    noise().save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = one_bad(tmp_path, tiny_model, {"image": path.relative_to(tmp_path).as_posix()})
    assert_rejected(report, 2, "image", "truncated or corrupt")


def test_corrupt_image(tmp_path, tiny_model):
    (tmp_path / "images").mkdir()
    rng = random.Random(0)
    (tmp_path / "images" / "junk.png").write_bytes(bytes(rng.randrange(256) for _ in range(500)))
    report = one_bad(tmp_path, tiny_model, {"image": "images/junk.png"})
    assert_rejected(report, 2, "image", "not an image file")


@pytest.mark.parametrize("side", [10_000, 60_000])  # over our 40 MP limit; over Pillow's own bomb limit
def test_decompression_bomb_rejected_from_header(tmp_path, tiny_model, side):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bomb.png").write_bytes(png_header_only(side, side))
    report = one_bad(tmp_path, tiny_model, {"image": "images/bomb.png"})
    assert_rejected(report, 2, "image", "decompression-bomb guard")
    assert "40,000,000" in row_of(report, 2).error


def test_pixel_limit_is_a_parameter(tmp_path, tiny_model):
    (tmp_path / "images").mkdir()
    noise((40, 40)).save(tmp_path / "images" / "big.png")
    report = one_bad(tmp_path, tiny_model, {"image": "images/big.png"}, max_pixels=32 * 32)
    assert_rejected(report, 2, "image", "40x40 = 1,600 pixels is over the limit of 1,024")


def test_missing_file(tmp_path, tiny_model):
    report = one_bad(tmp_path, tiny_model, {"image": "images/nowhere.png"})
    assert_rejected(report, 2, "image", "file not found")


# ---------------------------------------------------------------------------------- paths
def test_path_with_dotdot_leaving_root(tmp_path, tiny_model):
    root = tmp_path / "ds"
    scene().save(tmp_path / "outside.png")
    report = one_bad(root, tiny_model, {"image": "../outside.png"})
    assert_rejected(report, 2, "image", "leaves the dataset folder")


def test_dotdot_that_stays_inside_is_fine(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    write_jsonl(tmp_path, [{**good, "image": "masks/../images/good.png"}])
    assert validate(tmp_path, tiny_model).ok


def test_absolute_path(tmp_path, tiny_model):
    root = tmp_path / "ds"
    add_good_files(root, "other")
    report = one_bad(root, tiny_model, {"image": str(root / "images" / "other.png")})
    assert_rejected(report, 2, "image", "is an absolute path")


def test_symlink_pointing_outside(tmp_path, tiny_model):
    root = tmp_path / "ds"
    scene().save(tmp_path / "secret.png")
    (root / "images").mkdir(parents=True)
    os.symlink(tmp_path / "secret.png", root / "images" / "link.png")
    report = one_bad(root, tiny_model, {"image": "images/link.png"})
    assert_rejected(report, 2, "image", "symlink")


def test_symlinked_folder_pointing_outside(tmp_path, tiny_model):
    root = tmp_path / "ds"
    (tmp_path / "elsewhere").mkdir()
    scene().save(tmp_path / "elsewhere" / "a.png")
    root.mkdir()
    os.symlink(tmp_path / "elsewhere", root / "linked")
    report = one_bad(root, tiny_model, {"image": "linked/a.png"})
    assert_rejected(report, 2, "image", "symlink")


def test_symlink_inside_root_is_fine(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    os.symlink(tmp_path / "images" / "good.png", tmp_path / "images" / "alias.png")
    write_jsonl(tmp_path, [{**good, "image": "images/alias.png"}])
    assert validate(tmp_path, tiny_model).ok


# ---------------------------------------------------------------------------------- modes
def _expect_rgb(tmp_path, tiny_model, img: Image.Image, name: str, mode: str, note: str,
                probes: dict[tuple[int, int], tuple[int, int, int]], **save):
    (tmp_path / "images").mkdir(exist_ok=True)
    img.save(tmp_path / "images" / name, **save)
    write_jsonl(tmp_path, [{"image": f"images/{name}", "sentence": SENTENCE}])
    report = validate(tmp_path, tiny_model)
    r = report.rows[0]
    assert r.ok, r.errors
    assert r.mode == mode and any(note in c for c in r.converted), (r.mode, r.converted)
    (job,) = load_jobs(report.manifest, TrainConfig(steps=2), tiny_model)
    (item,) = job.load_inputs()
    assert item.image.mode == "RGB"
    for xy, rgb in probes.items():
        assert item.image.getpixel(xy) == rgb, (xy, item.image.getpixel(xy))


def test_cmyk_converted(tmp_path, tiny_model):
    img = Image.new("CMYK", (32, 32), (0, 0, 0, 0))
    img.paste((0, 255, 255, 0), BOX1)  # red
    _expect_rgb(tmp_path, tiny_model, img, "cmyk.tif", "CMYK", "CMYK -> RGB",
                {(5, 5): (255, 0, 0), (25, 5): (255, 255, 255)})


def test_rgba_transparency_goes_on_white(tmp_path, tiny_model):
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black
    img.paste((255, 0, 0, 255), BOX1)
    _expect_rgb(tmp_path, tiny_model, img, "rgba.png", "RGBA", "composited on white",
                {(5, 5): (255, 0, 0), (25, 5): (255, 255, 255)})


def test_sixteen_bit_greyscale_scaled_not_clipped(tmp_path, tiny_model):
    array = np.full((32, 32), 65535, dtype=np.uint16)
    array[:16] = 32896  # 128 * 257
    img = Image.fromarray(array)
    assert img.mode.startswith("I;16")
    (tmp_path / "images").mkdir()
    img.save(tmp_path / "images" / "deep.png")
    assert Image.open(tmp_path / "images" / "deep.png").mode in ("I;16", "I")
    write_jsonl(tmp_path, [{"image": "images/deep.png", "sentence": SENTENCE}])
    report = validate(tmp_path, tiny_model)
    r = report.rows[0]
    assert r.ok and "16-bit" in " ".join(r.converted)
    (item,) = load_jobs(report.manifest, TrainConfig(), tiny_model)[0].load_inputs()
    assert item.image.getpixel((3, 3)) == (128, 128, 128)  # a plain convert("RGB") gives 255
    assert item.image.getpixel((3, 30)) == (255, 255, 255)


def test_palette_converted(tmp_path, tiny_model):
    _expect_rgb(tmp_path, tiny_model, scene().convert("P"), "pal.png", "P", "P -> RGB",
                {(5, 5): (255, 0, 0), (25, 25): (0, 0, 255)})


def test_palette_with_transparency(tmp_path, tiny_model):
    img = scene().convert("P")
    white = img.getpixel((25, 5))
    _expect_rgb(tmp_path, tiny_model, img, "palt.png", "P", "composited on white",
                {(5, 5): (255, 0, 0), (25, 5): (255, 255, 255)}, transparency=white)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_and_bilevel_converted(tmp_path, tiny_model, mode):
    _expect_rgb(tmp_path, tiny_model, scene().convert(mode), f"grey_{mode}.png", mode, f"{mode} -> RGB",
                {(25, 5): (255, 255, 255)})


def test_exif_orientation_applied(tmp_path, tiny_model):
    stored = Image.new("RGB", (40, 20), "white")
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "images").mkdir()
    stored.save(tmp_path / "images" / "phone.png", exif=exif)
    Image.new("L", (20, 40), 255).save(tmp_path / "images" / "upright_mask.png")
    Image.new("L", (40, 20), 255).save(tmp_path / "images" / "stored_mask.png")
    write_jsonl(tmp_path, [
        {"image": "images/phone.png", "sentence": SENTENCE, "masks": {"<c1>": "images/upright_mask.png"}},
        {"image": "images/phone.png", "sentence": "a <c9|object>", "masks": {"<c9>": "images/stored_mask.png"}},
    ])
    report = validate(tmp_path, tiny_model)
    r = report.rows[0]
    assert r.ok, r.errors
    assert (r.width, r.height) == (20, 40) and "EXIF orientation 6 applied" in r.converted
    assert_rejected(report, 2, "masks", "is 40x20 but the image is 20x40")
    (item,) = load_jobs(report.manifest, TrainConfig(), tiny_model)[0].load_inputs()
    assert item.image.size == (20, 40)
    assert item.image.getpixel((10, 2)) == (255, 0, 0)  # the strip is now on top
    assert item.image.getpixel((10, 37)) == (255, 255, 255)


# ---------------------------------------------------------------------------------- masks
def test_mask_size_differs(tmp_path, tiny_model):
    (tmp_path / "masks").mkdir(parents=True)
    mask(BOX1, size=16).save(tmp_path / "masks" / "small.png")
    add_good_files(tmp_path, "two")
    report = one_bad(tmp_path, tiny_model, {"image": "images/two.png", "masks": {"<c1>": "masks/small.png"}})
    assert_rejected(report, 2, "masks", "is 16x16 but the image is 32x32")


def test_mask_empty(tmp_path, tiny_model):
    (tmp_path / "masks").mkdir(parents=True)
    Image.new("L", (32, 32), 0).save(tmp_path / "masks" / "black.png")
    add_good_files(tmp_path, "two")
    report = one_bad(tmp_path, tiny_model, {"image": "images/two.png", "masks": {"<c2>": "masks/black.png"}})
    assert_rejected(report, 2, "masks", "is empty")


def test_mask_for_unknown_placeholder_and_bad_mask_path(tmp_path, tiny_model):
    add_good_files(tmp_path, "two")
    report = one_bad(tmp_path, tiny_model, {"image": "images/two.png",
                                            "masks": {"<c7>": "masks/two_c1.png", "c2": "../x.png"}})
    assert_rejected(report, 2, "masks", "the sentence has no <c7>")
    assert_rejected(report, 2, "masks", "mask of <c2>: '../x.png' leaves the dataset folder")


def test_masks_accept_rgba_and_names_without_brackets(tmp_path, tiny_model):
    good = add_good_files(tmp_path)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), BOX2)
    rgba.save(tmp_path / "masks" / "rgba.png")
    write_jsonl(tmp_path, [{**good, "masks": {"c1": "masks/good_c1.png", "<c2>": "masks/rgba.png"}}])
    report = validate(tmp_path, tiny_model)
    assert report.ok, report.render()
    (job,) = load_jobs(report.manifest, TrainConfig(), tiny_model)
    assert job.masks == [{"<c1>": "masks/good_c1.png", "<c2>": "masks/rgba.png"}]
    (item,) = job.load_inputs()
    assert item.masks["<c2>"].getpixel((5, 5)) == 0 and item.masks["<c2>"].getpixel((25, 25)) == 255
