"""One sample's derived arrays: object patches, expanded boxes and the region map, and their PNGs.

Geometry (see design notes): a patch is the object's tight mask box with everything outside the
mask set to white, padded by a random factor U[pad_lo, pad_hi] and to a square (object centred,
white), resized to ``patch_size``. An expanded box is the tight box grown about its centre by
U[lo, hi) and clipped to the image. The region map is the target padded to a centred square
(AnyDoor's ``pad_to_square``) and resized to ``train_resolution``; bit i is set inside expanded box
i, so exclusive/overlap/background regions are bit tests and padding is the area outside
``tasks.shards.square_geometry``'s content window.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from tasks.shards import square_geometry


def expand_box(box, factor: float, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
    return [max(cx - hw, 0.0), max(cy - hh, 0.0), min(cx + hw, float(width)), min(cy + hh, float(height))]


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


def region_map(boxes_expanded, width: int, height: int, resolution: int) -> np.ndarray:
    """uint8 [R, R]; bit i set inside expanded box i on the square-padded, resized target."""
    scale, px, py = square_geometry(width, height, resolution)
    out = np.zeros((resolution, resolution), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes_expanded):
        c0 = max(int(math.floor((x0 + px) * scale)), 0)
        r0 = max(int(math.floor((y0 + py) * scale)), 0)
        c1 = min(int(math.ceil((x1 + px) * scale)), resolution)
        r1 = min(int(math.ceil((y1 + py) * scale)), resolution)
        out[r0:r1, c0:c1] |= np.uint8(1 << i)
    return out


def png(arr: np.ndarray, level: int) -> bytes:
    """PNG bytes of a grey [H, W] or RGB [H, W, 3] array (OpenCV wants BGR).

    Fixed filters instead of libpng's adaptive choice: the "up" filter suits photo patches and no
    filter suits flat masks; both at a fraction of the adaptive search's cost for similar sizes.
    """
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
        filt = cv2.IMWRITE_PNG_FILTER_UP
    else:
        filt = cv2.IMWRITE_PNG_FILTER_NONE
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, filt])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def unpng(data: bytes, color: bool) -> np.ndarray:
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if arr is None:
        raise ValueError("not a decodable PNG")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if color else arr
