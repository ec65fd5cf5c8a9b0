"""``pics composite --layout auto``: where N objects go in a region of the background.

The objects' silhouettes (alpha, else non-white pixels) are laid out in the region's rectangle by
the differentiable method in pair-overlap mode (``layout.composite_pair_overlap``: each object
overlaps the next, so the composite has the interactions PICS models), upright (no rotation), at
their relative source sizes.
"""
from __future__ import annotations

import numpy as np

from pics_model.layout import make_element, pack, placed_masks
from tasks.layout.io import read_element
from tasks.params import LayoutParams


def layout_objects(images: list, region: tuple[int, int, int, int], size: tuple[int, int],
                   p: LayoutParams) -> list[np.ndarray]:
    """images: object image paths; region: x0, y0, x1, y1 (background px); size: the background's
    (width, height). Returns one bool [H, W] placement mask per object, in order."""
    x0, y0, x1, y1 = region
    elements = [make_element(read_element(path, f"--object {i + 1}")[0], str(path)) for i, path in enumerate(images)]
    target = np.ones((y1 - y0, x1 - x0), bool)
    # the objects keep their relative source sizes (equal_size off): the pair-overlap loss has no
    # gradient between elements that start apart, and equal boxes start chained pairs apart
    cfg = p.config(pair_overlap=p.composite_pair_overlap, rotate=False, equal_size=False)
    placement, _ = pack(elements, target, cfg)
    local = placed_masks(elements, placement, (x1 - x0, y1 - y0))
    out = np.zeros((len(elements), size[1], size[0]), bool)
    out[:, y0:y1, x0:x1] = local
    return list(out)
