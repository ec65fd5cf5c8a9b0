"""Initial placements: scales from the area ratio, positions at distance-transform maxima.

Scale: the paper code first normalises every element to one size (its tight box's long side,
``uniform_image_size``), then takes sqrt(fill * A_target / sum_i A_i) with fill = 0.55, so each
element starts at the same box size whatever its source resolution. Positions: the
code takes the argmax of the target's distance transform (the paper, its medial axis); here the
elements, largest first, each take the current argmax and then block a disc of their own area, so
the N elements start spread over the shape instead of stacked on one point.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt

from pics_model.layout.elements import Element


def initial_scales(elements: list[Element], target_area: float, fill: float = 0.55,
                   equal_size: bool = True) -> np.ndarray:
    """float64 [N]: target pixels per source pixel of every element, so that together they cover
    ``fill`` of the target's area. ``equal_size``: every element's box side (``extent``) is
    normalised to one common side first (the paper code); False: one scale for all, so relative
    source sizes are kept (a 30 px silhouette stays 20x smaller than a 600 px one)."""
    unit = np.array([1.0 / e.extent if equal_size else 1.0 for e in elements])
    areas = np.array([e.area for e in elements])
    return unit * math.sqrt(fill * target_area / float((areas * unit ** 2).sum()))


def _downsample(target: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """Boolean target at most ``long_side`` px on its long side (block majority), and the factor."""
    f = max(1, math.ceil(max(target.shape) / long_side))
    h, w = (target.shape[0] // f) * f, (target.shape[1] // f) * f
    small = target[:h, :w].reshape(h // f, f, w // f, f).mean((1, 3)) >= 0.5
    return small, float(f)


def place_at_maxima(free: np.ndarray, radii: list[float], fallback: np.ndarray | None = None) -> np.ndarray:
    """Discs of ``radii`` (pixels of ``free``), in the given order, each at the current argmax of
    the distance transform of ``free`` (bool [h, w], updated as discs are placed). Returns
    float64 [N, 3]: centre x, y (pixel units, continuous) and the free distance found there; when
    nothing is free, the argmax of ``fallback`` (default: the first free map) is used."""
    free = np.pad(free, 1)  # beyond the frame is not free (and an all-free map has a transform)
    fallback = distance_transform_edt(free) if fallback is None else np.pad(fallback, 1)
    ys, xs = np.mgrid[:free.shape[0], :free.shape[1]]
    out = np.zeros((len(radii), 3))
    for i, radius in enumerate(radii):
        dist = distance_transform_edt(free)
        if dist.max() <= 0:  # the shape is used up: stack on the deepest point
            dist = fallback
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        out[i] = (x - 0.5, y - 0.5, dist[y, x])  # pixel centre, in the unpadded map's frame
        free &= (xs - x) ** 2 + (ys - y) ** 2 > radius ** 2
    return out


def equivalent_radius(e: Element, scale: float) -> float:
    """Radius (target px) of the disc with the placed element's area."""
    return scale * math.sqrt(e.area / math.pi)


def initial_positions(elements: list[Element], target: np.ndarray, scales: np.ndarray,
                      work_side: int = 128) -> np.ndarray:
    """target: bool [H, W], scales: [N] (:func:`initial_scales`) -> float64 [N, 2] element
    centres (x, y) in target pixels, in input order (placed largest first)."""
    free, f = _downsample(target, work_side)
    if not free.any():
        free, f = target.astype(bool), 1.0
    radii = [equivalent_radius(e, s) / f for e, s in zip(elements, scales)]
    order = sorted(range(len(elements)), key=lambda k: -radii[k])
    found = place_at_maxima(free, [radii[i] for i in order])
    out = np.zeros((len(elements), 2))
    out[order] = found[:, :2] * f
    return out
