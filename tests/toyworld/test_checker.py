"""The checker on generated images (a hand-labelled set) and on the odd cases it must not split."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mcpl.toyworld import checker as C  # noqa: E402
from mcpl.toyworld.render import ObjectSpec, Scene, render  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
CHECKER_DIR = ROOT / "models" / "toyworld-checker"
LABELLED = ROOT / "benchmarks" / "data" / "checker_generated"
needs_checker = pytest.mark.skipif(not (CHECKER_DIR / "shape_net.safetensors").exists(), reason="checker not trained")


@pytest.fixture(scope="module")
def checker() -> C.Checker:
    return C.Checker.load(CHECKER_DIR)


def scene(*objects: tuple[str, tuple[int, int, int], float, float, float], background=(225, 225, 225)) -> np.ndarray:
    """Render objects (shape, rgb, cx, cy, radius) in 64 px canvas units."""
    specs = [ObjectSpec("red", shape, cx, cy, r, 0.0, rgb) for shape, rgb, cx, cy, r in objects]
    return render(Scene(specs, background, seed=1)).image


@needs_checker
def test_agrees_with_hand_labels_on_generated_images(checker: C.Checker) -> None:
    from mcpl.toyworld import labelset

    images, records, labels = labelset.load(LABELLED)
    assert len(images) >= 300 and len(labels) == len(images) == len(records)
    groups = {r["group"] for r in records}
    assert {"single", "two", "untrained", "trained", "shape_mix", "colour_mix"} <= groups
    res = labelset.agreement(checker, images, labels)
    assert res["accuracy"] >= 0.97, res["wrong"]
    _, held = labelset.split(len(images))
    assert labelset.agreement(checker, images, labels, held)["accuracy"] >= 0.97


@needs_checker
def test_off_palette_colour_is_one_object_of_colour_other(checker: C.Checker) -> None:
    orange = scene(("triangle", (230, 120, 30), 32, 32, 15))
    found = checker.read(orange)
    assert [(f.colour, f.shape) for f in found] == [(C.OFF_PALETTE, "triangle")]
    teal = scene(("square", (25, 125, 115), 32, 32, 14))
    assert [f.colour for f in checker.read(teal)] == [C.OFF_PALETTE]


@needs_checker
def test_two_tone_object_is_one_mixed_object(checker: C.Checker) -> None:
    img = scene(("circle", (210, 35, 35), 32, 32, 16)).astype(np.float32)
    img[16:, :] = np.where(img[16:, :, 1:2] < 100, np.array([35, 160, 55], np.float32), img[16:, :])
    img[13:19, :] = np.where(img[13:19, :, 1:2] < 170, (img[13:19, :] + np.array([120, 110, 50])) / 2, img[13:19, :])
    found = checker.read(img.astype(np.uint8))
    assert len(found) == 1 and found[0].colour == C.TWO_TONE


@needs_checker
def test_touching_objects_of_two_colours_are_two_objects(checker: C.Checker) -> None:
    img = scene(("square", (210, 35, 35), 22, 32, 10), ("circle", (235, 200, 25), 42, 32, 10))
    assert sorted(f.colour for f in checker.read(img)) == ["red", "yellow"]


def test_hue_bands_hold_every_rendered_palette_colour() -> None:
    from itertools import product

    from mcpl.toyworld.render import COLOURS

    for k, (name, base) in enumerate(COLOURS.items()):
        jitter = np.array(list(product((-12, 0, 12), repeat=3)))
        rgb = np.clip(np.array(base) + jitter, 0, 255)
        assert (C.hue_colour(C.hue_of(rgb)) == k).all(), name


def test_outline_harmonic_tells_circles_from_squares() -> None:
    circle = C.segment(scene(("circle", (35, 65, 215), 32, 32, 15)))[0].alpha
    square = C.segment(scene(("square", (35, 65, 215), 32, 32, 15)))[0].alpha
    assert C.outline_harmonics(circle)[3] < C.SQUARENESS < C.outline_harmonics(square)[3]
    assert C.template_fit(circle)["circle"] > 0.9 and C.template_fit(square)["square"] > 0.9


def test_contact_sheets_number_or_title_each_image(tmp_path: Path) -> None:
    """The labelled set's sheets are numbered (no prompts shown); other callers may title and name them."""
    from PIL import Image

    from mcpl.toyworld.labelset import SCALE, write_sheets

    images = np.zeros((65, 32, 32, 3), dtype=np.uint8)
    plain = write_sheets(images, tmp_path)
    assert [p.name for p in plain] == ["sheet_0.png", "sheet_1.png"]
    assert Image.open(plain[0]).size == (8 * (32 * SCALE + 4), 8 * (32 * SCALE + 14 + 4))
    titled = write_sheets(images[:2], tmp_path, ["0: red square", "1: nothing"], stem="verdicts", scale=2)
    assert [p.name for p in titled] == ["verdicts_0.png"] and Image.open(titled[0]).size == (8 * 68, 8 * 82)
    numbered = np.asarray(Image.open(write_sheets(images[:1], tmp_path, stem="n", scale=2)[0]))
    named = np.asarray(Image.open(write_sheets(images[:1], tmp_path, ["a longer title"], stem="t", scale=2)[0]))
    assert not np.array_equal(numbered, named)  # the title is drawn, not the number
