"""Placed masks at the target's size, and the layout metrics (the paper's section 6, defined here):

    coverage = |union inside the target| / |target|         (LC)
    overlap  = |pixels covered by two or more| / |target|    (OO)
    exceed   = |union outside the target| / |target|        (EA; the whole plane, not only the frame)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pics_model.layout.elements import Element
from pics_model.layout.placement import Placement
from pics_model.layout.warp import render


def place_mask(e: Element, tx: float, ty: float, theta: float, scale: float, out: np.ndarray,
               margin_px: int = 0) -> None:
    """Draw one element's hard silhouette into ``out`` (bool [rows, cols], cleared first): its mask
    resampled to its placed size (area), warped bilinearly in a window around its centre (the rest
    of the canvas is empty anyway), thresholded at one half."""
    out[:] = False
    rows, cols = out.shape
    size = float(scale * e.extent)
    if size <= 0:  # an element the greedy packer left out
        return
    side = int(np.clip(round(size), 2, e.mask.shape[0]))
    m = F.interpolate(e.mask[None, None], size=(side, side), mode="area")
    half = int(np.ceil(size * 0.75)) + 1  # > half the square's diagonal
    cx, cy = int(np.floor(tx)) + margin_px, int(np.floor(ty)) + margin_px
    x0, y0, x1, y1 = max(cx - half, 0), max(cy - half, 0), min(cx + half, cols), min(cy + half, rows)
    if x1 <= x0 or y1 <= y0:
        return
    one = lambda v: torch.tensor([float(v)], dtype=torch.float32)  # noqa: E731
    alpha = render(m, one(tx + margin_px - x0), one(ty + margin_px - y0), one(theta), one(size),
                   (x1 - x0, y1 - y0), 0, (y1 - y0, x1 - x0))
    out[y0:y1, x0:x1] = alpha[0].numpy() >= 0.5


def placed_masks(elements: list[Element], placement: Placement, frame: tuple[int, int],
                 margin_px: int = 0) -> np.ndarray:
    """bool [N, H + 2m, W + 2m]: every element's silhouette where ``placement`` puts it
    (:func:`place_mask`), on the target's frame (width, height) grown by ``margin_px``."""
    w, h = frame
    out = np.zeros((len(elements), h + 2 * margin_px, w + 2 * margin_px), bool)
    for i, e in enumerate(elements):
        place_mask(e, placement.tx[i], placement.ty[i], placement.theta[i], placement.scale[i], out[i], margin_px)
    return out


def layout_metrics(masks: np.ndarray, target: np.ndarray) -> dict:
    """masks bool [N, H, W] and target bool [H, W] on the same frame -> coverage, overlap, exceed."""
    area = float(target.sum())
    if area == 0:
        raise ValueError("layout metrics: the target mask is empty")
    count = masks.sum(0)
    covered = count > 0
    return {"coverage": float((covered & target).sum() / area),
            "overlap": float((count >= 2).sum() / area),
            "exceed": float((covered & ~target).sum() / area)}


def evaluate(elements: list[Element], placement: Placement, target: np.ndarray) -> tuple[np.ndarray, dict]:
    """(placed masks bool [N, H, W] cropped to the target's frame, metrics over the whole plane:
    the canvas is grown by the largest element's half-diagonal, so nothing placed is lost)."""
    h, w = target.shape
    sizes = placement.scale * np.array([e.extent for e in elements])
    margin = int(np.ceil(sizes.max() * 0.75 + max(np.abs(placement.tx - w / 2).max() - w / 2,
                                                  np.abs(placement.ty - h / 2).max() - h / 2, 0)))
    masks = placed_masks(elements, placement, (w, h), margin)
    metrics = layout_metrics(masks, np.pad(target.astype(bool), margin))
    return masks[:, margin:margin + h, margin:margin + w], metrics


def separate(elements: list[Element], placement: Placement, target: np.ndarray, factor: float = 0.95,
             max_rounds: int = 20) -> tuple[Placement, int]:
    """Not from the paper: soft edges leave slivers of overlap that the hard masks show. In each
    round, of every pair of elements that still share a pixel (at the target's resolution) the
    smaller shrinks by ``factor``; at most ``max_rounds`` rounds. Returns the placement and the
    rounds taken."""
    h, w = target.shape
    scale = placement.scale.copy()
    areas = np.array([e.area for e in elements]) * scale ** 2
    masks = placed_masks(elements, placement, (w, h))
    for rounds in range(max_rounds):
        shared = masks[:, masks.sum(0) >= 2].astype(np.float32)  # [N, shared pixels]
        if shared.shape[1] == 0:
            return Placement(placement.tx, placement.ty, placement.theta, scale), rounds
        i, j = np.nonzero(np.triu(shared @ shared.T, 1))
        smaller = np.unique(np.where(areas[i] <= areas[j], i, j))
        scale[smaller] *= factor
        areas[smaller] *= factor ** 2
        for k in smaller:  # only the shrunk ones change
            place_mask(elements[k], placement.tx[k], placement.ty[k], placement.theta[k], scale[k], masks[k])
    return Placement(placement.tx, placement.ty, placement.theta, scale), max_rounds
