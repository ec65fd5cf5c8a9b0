"""Procedural textures for the ground and the backdrop: checker, planks, tiles, blotches, plain.

Pure numpy + PIL from a seeded generator, so the same seed gives the same pixels everywhere.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from tasks.make_sample.shapes import _contrast, random_color


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth, tileable value noise in [0, 1]: a random grid, repeated 3 x 3, the middle tile
    upsampled bicubically (so the ground repeats without seams)."""
    small = (rng.uniform(size=(cells, cells)) * 255).astype(np.uint8)
    # resample only the middle tile; the filter reads its neighbours from the surrounding copies
    big = Image.fromarray(np.tile(small, (3, 3))).resize((size, size), Image.BICUBIC,
                                                         box=(cells, cells, 2 * cells, 2 * cells))
    return np.asarray(big, np.float32) / 255.0


def texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One random tileable-looking texture, (size, size, 3) uint8."""
    a = random_color(rng, sat=(0.1, 0.7), val=(0.3, 0.95))
    b = _contrast(rng, a) * 0.6 + a * 0.4
    kind = rng.choice(["checker", "planks", "tiles", "blotches", "plain"], p=[0.2, 0.25, 0.2, 0.2, 0.15])
    yy, xx = np.ogrid[0:size, 0:size]
    yy, xx = (yy / size).astype(np.float32), (xx / size).astype(np.float32)
    grain = _noise(rng, size, 32)[..., None]
    if kind == "checker":
        n = int(rng.integers(2, 6))
        m = ((np.floor(xx * n) + np.floor(yy * n)) % 2)[..., None]
        img = m * a + (1 - m) * b
    elif kind == "planks":
        n = int(rng.integers(3, 8))
        row = np.floor(yy * n).astype(int)
        tone = rng.uniform(0.8, 1.15, size=n)[row][..., None]
        streak = _noise(rng, size, 8)[..., None] * 0.25
        wood = np.array([0.55, 0.38, 0.22]) * rng.uniform(0.7, 1.3) if rng.uniform() < 0.6 else a
        img = wood * tone * (0.85 + streak)
        img = np.where(((yy * n % 1.0) < 0.03)[..., None], img * 0.55, img)  # gaps between planks
    elif kind == "tiles":
        n = int(rng.integers(2, 6))
        grout = ((xx * n % 1.0) < 0.05) | ((yy * n % 1.0) < 0.05)
        img = np.where(grout[..., None], b * 0.7, a)
    elif kind == "blotches":
        m = _noise(rng, size, int(rng.integers(4, 10)))[..., None]
        img = m * a + (1 - m) * b
    else:
        img = np.broadcast_to(a, (size, size, 3))
    img = img * (0.9 + 0.2 * grain)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
