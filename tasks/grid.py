"""Image grids of the previews (decompose samples, training samples): the one place that fits a
picture into a square cell and lays cells out in rows under a header strip."""
from __future__ import annotations

import numpy as np
from PIL import Image

CELL_FILL = (40, 40, 40)


def fit_cell(img: Image.Image | np.ndarray, size: int, fill=CELL_FILL) -> Image.Image:
    """``img`` shrunk to fit ``size`` x ``size`` (aspect kept, bicubic) and centred on ``fill``."""
    im = Image.fromarray(img) if isinstance(img, np.ndarray) else img.copy()
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    cell = Image.new("RGB", (size, size), fill)
    cell.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return cell


def grid(rows: list[list[Image.Image]], cell: int, columns: int, header: int = 0,
         background=(255, 255, 255)) -> Image.Image:
    """Cells ``cell`` px square, ``columns`` wide, one row per entry of ``rows`` (at least one row
    of space), below a ``header`` px strip left for titles."""
    canvas = Image.new("RGB", (columns * cell, header + cell * max(len(rows), 1)), background)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(tile, (c * cell, header + r * cell))
    return canvas
