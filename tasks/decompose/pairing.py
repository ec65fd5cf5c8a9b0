"""Pair and group mining over one image's qualifying objects.

Two rules produce scored candidate pairs (i < j over the object list):

- ``reference``: the published rule, done right. Score = box IoU; a pair counts when IoU > 0 and
  neither box contains the other (with ``tol`` px slack). Boxes are xyxy throughout; the reference
  code compared an xyxy box with an xywh one.
- ``interaction``: silhouettes overlap or touch. Score = contact length, the number of boundary
  pixels of either mask separated from the other mask by at most ``contact_px`` background pixels
  (0: only adjacent or overlapping pixels; overlapping masks have their boundaries inside each
  other, so overlap counts too). Containment is allowed: a cat lying on a
  couch, whose box sits inside the couch's box, is exactly the interaction we want.

Groups: for size 2, the top-scoring pairs; for size g > 2, each object with >= g-1 partners is
an anchor grouped with its g-1 best partners (the reference's unused triple builder), groups
ranked by the sum of those scores. Ties break on object order (annotation id), never on chance.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a [n, 4] and b [m, 4] -> [n, m]."""
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def contains(outer: np.ndarray, inner: np.ndarray, tol: float) -> np.ndarray:
    """[n, m] bool: box outer[i] contains box inner[j] up to ``tol`` px on every side (xyxy)."""
    return ((inner[None, :, 0] >= outer[:, None, 0] - tol) & (inner[None, :, 1] >= outer[:, None, 1] - tol)
            & (inner[None, :, 2] <= outer[:, None, 2] + tol) & (inner[None, :, 3] <= outer[:, None, 3] + tol))


def reference_pairs(boxes: np.ndarray, tol: float) -> list[tuple[int, int, float]]:
    """[(i, j, box IoU)] for i < j with IoU > 0 and no containment either way."""
    n = len(boxes)
    if n < 2:
        return []
    iou = box_iou(boxes, boxes)
    cont = contains(boxes, boxes, tol)
    ok = (iou > 0) & ~cont & ~cont.T
    ii, jj = np.nonzero(np.triu(ok, k=1))
    return [(int(i), int(j), float(iou[i, j])) for i, j in zip(ii, jj)]


_KERNELS: dict[int, np.ndarray] = {}


def _disk(r: int) -> np.ndarray:
    if r not in _KERNELS:
        _KERNELS[r] = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return _KERNELS[r]


def _boundary(m: np.ndarray) -> np.ndarray:
    # Erosion treats outside the crop as foreground, so a crop edge is not a boundary.
    return m & ~cv2.erode(m, _disk(1))


def contact_length(mask_a: np.ndarray, box_a, mask_b: np.ndarray, box_b, contact_px: int) -> int:
    """Boundary pixels of either mask at most ``contact_px`` background pixels away from the other
    (full-size uint8 {0,1} masks; boxes are their tight xyxy boxes).

    Such pixels lie within contact_px + 1 (centre distance) of the other mask, so only the
    intersection of the two boxes, each grown by that plus a pixel of erosion context, can hold
    them: the morphology runs on that crop.
    """
    return contact_and_overlap(mask_a, box_a, mask_b, box_b, contact_px)[0]


def contact_and_overlap(mask_a: np.ndarray, box_a, mask_b: np.ndarray, box_b, contact_px: int) -> tuple[int, int]:
    """(contact length, overlapping pixels) of two masks whose tight xyxy boxes are given."""
    h, w = mask_a.shape
    g = contact_px + 3
    x0 = max(int(np.floor(max(box_a[0], box_b[0]))) - g, 0)
    y0 = max(int(np.floor(max(box_a[1], box_b[1]))) - g, 0)
    x1 = min(int(np.ceil(min(box_a[2], box_b[2]))) + g, w)
    y1 = min(int(np.ceil(min(box_a[3], box_b[3]))) + g, h)
    if x1 <= x0 or y1 <= y0:
        return 0, 0
    a = np.ascontiguousarray(mask_a[y0:y1, x0:x1])
    b = np.ascontiguousarray(mask_b[y0:y1, x0:x1])
    if not a.any() or not b.any():
        return 0, 0
    near_a, near_b = cv2.dilate(a, _disk(contact_px + 1)), cv2.dilate(b, _disk(contact_px + 1))
    touch = (_boundary(a) & near_b) | (_boundary(b) & near_a)
    return int(np.count_nonzero(touch)), int(np.count_nonzero(a & b))


def interaction_pairs(boxes: np.ndarray, areas: np.ndarray, get_mask: Callable[[int], np.ndarray],
                      contact_px: int, duplicate_iou: float = 1.0) -> list[tuple[int, int, float]]:
    """[(i, j, contact length)] for i < j whose silhouettes overlap, touch or have a gap <= ``contact_px``.

    ``boxes`` are the masks' tight boxes and ``areas`` their pixel counts. Pairs whose mask IoU
    exceeds ``duplicate_iou`` are left out: visible silhouettes of two real objects barely
    overlap, so such a pair is one object labelled twice (LVIS has couch + bed, cup + mug...).
    """
    n = len(boxes)
    if n < 2:
        return []
    r = contact_px + 2
    grown = boxes + np.array([-r, -r, r, r], dtype=boxes.dtype)
    near = box_iou(grown, grown) > 0
    out = []
    for i, j in zip(*np.nonzero(np.triu(near, k=1))):
        c, inter = contact_and_overlap(get_mask(int(i)), boxes[i], get_mask(int(j)), boxes[j], contact_px)
        union = areas[i] + areas[j] - inter
        if c > 0 and not (union > 0 and inter / union > duplicate_iou):
            out.append((int(i), int(j), float(c)))
    return out


def choose_groups(n: int, pairs: list[tuple[int, int, float]], group_size: int, limit: int
                  ) -> list[tuple[int, ...]]:
    """Up to ``limit`` distinct groups (sorted object indices), best first."""
    if group_size == 2:
        ranked = sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))
        return [(i, j) for i, j, _ in ranked[:limit]]
    partners: dict[int, list[tuple[float, int]]] = {k: [] for k in range(n)}
    for i, j, s in pairs:
        partners[i].append((s, j))
        partners[j].append((s, i))
    cands: dict[tuple[int, ...], float] = {}
    for anchor in range(n):
        best = sorted(partners[anchor], key=lambda t: (-t[0], t[1]))[: group_size - 1]
        if len(best) < group_size - 1:
            continue
        group = tuple(sorted([anchor] + [k for _, k in best]))
        score = sum(s for s, _ in best)
        cands[group] = max(score, cands.get(group, -1.0))
    ranked = sorted(cands.items(), key=lambda kv: (-kv[1], kv[0]))
    return [g for g, _ in ranked[:limit]]
