"""Annotation segmentation -> COCO compressed RLE, with every defect named.

pycocotools does the rasterising and RLE work; this module only refuses what pycocotools would
mis-handle silently: a NaN vertex makes ``frPyObjects`` allocate without bound, an uncompressed RLE
whose run lengths do not sum to h*w decodes to uninitialised memory, and a garbled compressed RLE
only fails at decode time.
"""
from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_utils


class MaskError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Vertices may sit a little outside the image (COCO has some); far outside means a broken polygon.
_POLY_MARGIN = 1.0


def _check_polygons(seg, h: int, w: int) -> list[list[float]]:
    if not seg:
        raise MaskError("invalid_polygon", "empty polygon list")
    polys = []
    for k, poly in enumerate(seg):
        if not isinstance(poly, list):
            raise MaskError("invalid_polygon", f"polygon {k} is {type(poly).__name__}, not a list")
        if len(poly) < 6 or len(poly) % 2:
            raise MaskError("invalid_polygon", f"polygon {k} has {len(poly)} coordinates (need an even count >= 6)")
        try:
            arr = np.asarray(poly, dtype=np.float64)
        except (TypeError, ValueError):
            raise MaskError("invalid_polygon", f"polygon {k} has non-numeric coordinates") from None
        if not np.isfinite(arr).all():
            raise MaskError("invalid_polygon", f"polygon {k} has non-finite coordinates")
        xs, ys = arr[0::2], arr[1::2]
        lim_x, lim_y = w * (1 + _POLY_MARGIN), h * (1 + _POLY_MARGIN)
        if xs.min() < -w * _POLY_MARGIN or xs.max() > lim_x or ys.min() < -h * _POLY_MARGIN or ys.max() > lim_y:
            raise MaskError("invalid_polygon", f"polygon {k} lies far outside the {w}x{h} image")
        polys.append(arr.tolist())
    return polys


def to_rle(seg, h: int, w: int) -> tuple[dict, np.ndarray | None]:
    """(compressed RLE at (h, w), decoded mask if decoding was needed to validate it, else None)."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(_check_polygons(seg, h, w), h, w)
        return mask_utils.merge(rles), None
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise MaskError("invalid_segmentation", f"neither a polygon list nor an RLE dict: {str(seg)[:80]}")
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        raise MaskError("invalid_rle", f"RLE size must be [height, width], got {size!r}")
    if list(size) != [h, w]:
        raise MaskError("mask_size_mismatch", f"RLE size {size[0]}x{size[1]} (h x w) but image is {h}x{w}")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise MaskError("invalid_rle", f"uncompressed RLE counts must be non-negative ints summing to {h * w}")
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(counts, (str, bytes)):
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise MaskError("invalid_rle", f"RLE counts of type {type(counts).__name__}")
    try:
        mask = mask_utils.decode(rle)  # the only check that a compressed string is well formed
    except Exception as e:  # pycocotools raises a bare Exception
        raise MaskError("invalid_rle", str(e)) from None
    return rle, mask


def ann_mask(ann: dict, h: int, w: int) -> tuple[dict, int, np.ndarray | None]:
    """(RLE, area in pixels, decoded mask or None) for an annotation; raises :class:`MaskError`."""
    rle, mask = to_rle(ann["segmentation"], h, w)
    area = int(mask_utils.area(rle))
    if area == 0:
        raise MaskError("empty_mask", "the segmentation covers no pixel of the image")
    return rle, area, mask


def decode(rle: dict) -> np.ndarray:
    """uint8 [h, w] in {0, 1}, in pycocotools' Fortran order (copying it costs as much as decoding;
    callers make small crops contiguous where OpenCV needs them)."""
    return mask_utils.decode(rle)


def rle_string(rle: dict) -> str:
    c = rle["counts"]
    return c.decode("ascii") if isinstance(c, bytes) else c


def encode(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def mining_box(ann: dict, rle: dict) -> list[float]:
    """xyxy box used by the pair rules: the annotation's ``bbox`` (xywh), else the mask's box."""
    b = ann.get("bbox")
    if isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in b) \
            and b[2] >= 0 and b[3] >= 0:
        x, y, bw, bh = (float(v) for v in b)
    else:
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
    return [x, y, x + bw, y + bh]


def mask_box(rle: dict) -> list[float]:
    """Tight xyxy box of the mask's pixels (integers; x1, y1 exclusive)."""
    x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
    return [x, y, x + bw, y + bh]
