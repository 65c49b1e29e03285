"""Shared fixtures: one tiny random SD model per session, built through the real save/load path."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from mcpl.method.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


def two_square_image(colours=((255, 0, 0), (0, 0, 255)), size: int = 32) -> Image.Image:
    """A white image with one coloured square top-left and one bottom-right."""
    img = Image.new("RGB", (size, size), "white")
    img.paste(colours[0], (2, 2, 14, 14))
    img.paste(colours[1], (18, 18, 30, 30))
    return img


@pytest.fixture
def scene() -> Image.Image:
    return two_square_image()
