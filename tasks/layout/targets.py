"""Procedural target shapes for the layout stage and benchmark: bool [size, size] masks."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_dilation

from tasks.params import ParamsError

SHAPES = ("circle", "heart", "star", "letter")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1], y up."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return c[None, :], -c[:, None]


def circle(size: int) -> np.ndarray:
    x, y = _grid(size)
    return x ** 2 + y ** 2 <= 0.9 ** 2


def heart(size: int) -> np.ndarray:
    """The quartic heart (x^2 + y^2 - 1)^3 <= x^2 y^3, fitted to the square."""
    x, y = _grid(size)
    x, y = x * 1.3, y * 1.3 + 0.15
    return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0


def star(size: int, points: int = 5, inner: float = 0.45) -> np.ndarray:
    r_out = 0.48 * size
    corners = []
    for k in range(2 * points):
        r = r_out if k % 2 == 0 else r_out * inner
        a = math.pi / 2 + k * math.pi / points
        corners.append((size / 2 + r * math.cos(a), size / 2 + 0.04 * size - r * math.sin(a)))
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon(corners, fill=255)
    return np.asarray(im) >= 128


def letter(size: int, char: str = "S") -> np.ndarray:
    """``char`` in Pillow's built-in scalable font, scaled to fill the square and emboldened
    (strokes grown by 4 % of the side) so that elements fit in them."""
    font = ImageFont.load_default(size=size)
    im = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(im).text((size // 2, size // 2), char, fill=255, font=font)
    box = im.getbbox()
    if box is None:
        raise ParamsError(f"layout.letter {char!r}: the font draws nothing for it")
    glyph = im.crop(box)
    scale = 0.9 * size / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.Resampling.LANCZOS)
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return binary_dilation(np.asarray(out) >= 128, iterations=max(1, round(0.04 * size)))


def make_target(name: str, size: int, char: str = "S") -> np.ndarray:
    if name == "letter":
        return letter(size, char)
    return {"circle": circle, "heart": heart, "star": star}[name](size)
