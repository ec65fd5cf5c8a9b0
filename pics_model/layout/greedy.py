"""The object-space baseline: largest element first, each at the tightest free position.

For each element (upright, at a scale that starts from the area ratio), the positions where it
fits without touching anything already placed or the outside of the target are those where the
correlation of its mask with the obstacle map is zero (an FFT correlation). Of those it takes the
one with the smallest distance to the nearest obstacle (it hugs the boundary and its neighbours,
so free space stays in one piece); when nothing fits it shrinks by ``shrink`` and tries again.
"""
from __future__ import annotations

import time

import numpy as np
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from scipy.signal import correlate

from pics_model.layout.elements import Element
from pics_model.layout.init import initial_scales
from pics_model.layout.optimize import Placement


def _kernel(e: Element, size_px: float) -> np.ndarray:
    """The element's silhouette at ``size_px`` (bool, odd side, centred)."""
    side = max(1, int(round(size_px)))
    side += 1 - side % 2
    m = F.interpolate(e.mask[None, None], size=(side, side), mode="area" if e.mask.shape[0] >= side else "bilinear")
    return m[0, 0].numpy() >= 0.5


def _best_position(obstacles: np.ndarray, kernel: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the free centre closest to an obstacle, or None when nothing fits."""
    r = kernel.shape[0] // 2
    padded = np.pad(obstacles, r + 1, constant_values=True).astype(np.float32)
    hits = correlate(padded, kernel.astype(np.float32), mode="same", method="fft")[r + 1:-r - 1, r + 1:-r - 1]
    valid = hits < 0.5
    if not valid.any():
        return None
    dist = distance_transform_edt(~obstacles)
    dist[~valid] = np.inf
    return np.unravel_index(np.argmin(dist), dist.shape)


def greedy_pack(elements: list[Element], target: np.ndarray, fill: float = 0.8, shrink: float = 0.85,
                max_tries: int = 20, equal_size: bool = True) -> tuple[Placement, dict]:
    """Elements into ``target`` (bool [H, W]) without overlap; same Placement as :func:`pack`.
    An element that fits nowhere even after ``max_tries`` shrinks gets scale 0 (left out)."""
    t0 = time.perf_counter()
    target = np.asarray(target, bool)
    h, w = target.shape
    n = len(elements)
    tx, ty = np.full(n, w / 2.0), np.full(n, h / 2.0)
    scale = np.zeros(n)
    obstacles = ~target
    s = initial_scales(elements, float(target.sum()), fill, equal_size)
    for i in sorted(range(n), key=lambda k: -elements[k].area * s[k] ** 2):
        si = s[i]
        for _ in range(max_tries):
            kernel = _kernel(elements[i], si * elements[i].extent)
            pos = _best_position(obstacles, kernel)
            if pos is not None:
                break
            si *= shrink
        if pos is None:
            continue
        y, x = pos
        r = kernel.shape[0] // 2
        obstacles[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] |= kernel[max(0, r - y):kernel.shape[0] - max(
            0, y + r + 1 - h), max(0, r - x):kernel.shape[1] - max(0, x + r + 1 - w)]
        # the kernel is the placed square (side = scale * extent) centred on pixel (y, x)
        tx[i], ty[i], scale[i] = x + 0.5, y + 0.5, kernel.shape[0] / elements[i].extent
    return Placement(tx, ty, np.zeros(n), scale), {"seconds": time.perf_counter() - t0,
                                                   "unplaced": int((scale == 0).sum())}
