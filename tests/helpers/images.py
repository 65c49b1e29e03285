"""Small synthetic images for engine and output tests."""

from __future__ import annotations

from PIL import Image


def two_square_image(colours=((255, 0, 0), (0, 0, 255)), size: int = 32) -> Image.Image:
    """A white image with one coloured square top-left and one bottom-right."""
    img = Image.new("RGB", (size, size), "white")
    img.paste(colours[0], (2, 2, 14, 14))
    img.paste(colours[1], (18, 18, 30, 30))
    return img
