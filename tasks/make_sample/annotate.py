"""Rendered masks -> LVIS annotation records: polygons or RLE, amodal RLE, depth order, occluders.

Polygons follow the pixel boundary (marching squares at level 0.5), so pycocotools decodes them
back to exactly the rendered mask; holes (an object seen through a ring, a region covered by a
nearer object) are joined to their outer ring by a zero-width bridge, which the even-odd fill of
pycocotools leaves empty. Any polygon that does not decode exactly falls back to RLE.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from skimage import measure


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(segm, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE -> (H, W) uint8 mask (what LVIS.ann_to_mask does)."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = {"size": segm["size"], "counts": segm["counts"].encode("ascii")
               if isinstance(segm["counts"], str) else segm["counts"]}
    return mask_utils.decode(rle)


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _inside(point: np.ndarray, ring: np.ndarray) -> bool:
    from matplotlib.path import Path

    return bool(Path(ring).contains_point(point))


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Exact COCO polygons of a binary mask (x, y in pixel units, pixel (0, 0) covers [0, 1)^2)."""
    rings = []
    for c in measure.find_contours(np.pad(mask.astype(np.uint8), 1), 0.5):
        c = measure.approximate_polygon(c, tolerance=0)  # drop collinear points only
        xy = c[:, ::-1] - 0.5  # (row, col) on the padded grid -> (x, y) on pixel edges
        if len(xy) >= 4:
            rings.append(xy[:-1] if np.allclose(xy[0], xy[-1]) else xy)
    outers = [r for r in rings if _signed_area(r) > 0]
    holes = [r for r in rings if _signed_area(r) < 0]
    for h in holes:
        host = next((i for i, o in enumerate(outers) if _inside(h.mean(0), o)), None)
        if host is None:
            continue
        o = outers[host]
        d = ((o[:, None, :] - h[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        # outer up to i, around the hole from j back to j, back to outer i: a zero-width bridge
        outers[host] = np.concatenate([o[: i + 1], h[j:], h[: j + 1], o[i:]])
    return [[round(float(v), 2) for v in o.ravel()] for o in outers]


def segmentation(mask: np.ndarray, fmt: str) -> tuple[object, str]:
    """The ``segmentation`` field for a visible mask and the format actually used."""
    if fmt == "polygon":
        polys = mask_to_polygons(mask)
        if polys and np.array_equal(decode(polys, *mask.shape), mask.astype(np.uint8)):
            return polys, "polygon"
    return encode_rle(mask), "rle"


def bbox_xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def depth_order(amodal: np.ndarray, depth: np.ndarray) -> list[int]:
    """Depth rank per object, 0 = nearest.

    For each pair the z-buffers of the objects rendered alone decide, pixel by pixel over the
    overlap of their amodal masks, which one is in front; the majority gives an edge "i before
    j". The rank is a topological order of those edges, ties broken by mean depth; a cycle
    (possible with non-convex shapes: a ball in a bowl) is broken at the nearest object by mean depth.
    """
    k = len(amodal)
    mean = [float(depth[i][amodal[i]].mean()) if amodal[i].any() else np.inf for i in range(k)]
    before = np.zeros((k, k), bool)
    for i in range(k):
        for j in range(i + 1, k):
            both = amodal[i] & amodal[j]
            if not both.any():
                continue
            n_ij = int((depth[i][both] < depth[j][both]).sum())
            n_ji = int((depth[j][both] < depth[i][both]).sum())
            if n_ij != n_ji:
                a, b = (i, j) if n_ij > n_ji else (j, i)
                before[a, b] = True
    rank = [0] * k
    left = set(range(k))
    for r in range(k):
        free = [i for i in left if not any(before[j, i] for j in left)]
        pick = min(free or left, key=lambda i: (mean[i], i))
        rank[pick] = r
        left.remove(pick)
    return rank
