"""One sample's object patches.

Geometry (see design notes): a patch is the object's tight mask box with everything outside the
mask set to white, padded by a random factor U[pad_lo, pad_hi] and to a square (object centred,
white), resized to ``patch_size``. Expanded boxes (``pics_model.data.expand_boxes``: the tight box
grown about its centre by U[lo, hi), clipped to the image) and the region map
(``pics_model.data.region_map``, on the target padded to a centred square and resized to
``preview_resolution``; bit i set inside expanded box i) use the model's geometry.
"""
from __future__ import annotations

import math

import cv2
import numpy as np


def make_patch(image: np.ndarray, mask: np.ndarray, box, pad: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [size, size, 3] on white, uint8 [size, size] in {0, 255})."""
    x0, y0, x1, y1 = (int(v) for v in box)  # mask boxes are integral
    crop = image[y0:y1, x0:x1]
    m = mask[y0:y1, x0:x1]
    bh, bw = m.shape
    side = max(int(math.ceil(max(bw, bh) * pad)), 1)
    canvas = np.full((side, side, 3), 255, np.uint8)
    mcanvas = np.zeros((side, side), np.uint8)
    oy, ox = (side - bh) // 2, (side - bw) // 2
    inside = m.astype(bool)
    region = canvas[oy:oy + bh, ox:ox + bw]
    region[inside] = crop[inside]
    mcanvas[oy:oy + bh, ox:ox + bw] = m * 255
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    patch = cv2.resize(canvas, (size, size), interpolation=interp)
    pmask = cv2.resize(mcanvas, (size, size), interpolation=interp)
    return patch, np.where(pmask >= 128, 255, 0).astype(np.uint8)
