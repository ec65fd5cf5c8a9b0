"""Occlusion-order accuracy of the alpha gate, as in the paper's analysis of s_a - s_b.

Definition (also in docs/metrics.md). For every object pair (a, b) of a sample whose dataset knows
the true depth order (``depth_ranks``, 0 = nearest) and the amodal masks (the embedded dataset):

* Evaluated pixels: the truly occluded ones, where *both* amodal masks are set (both objects are
  physically there and the nearer one hides the other).
* Truth: the nearer object (smaller depth rank) is the visible one there.
* Prediction at a denoising step: the alpha gate works on the latent grid, so each pixel takes
  the prediction of the latent cell (of the square-padded frame the pipeline works in) that
  holds it: the object with the larger routing weight in the pipeline's ``alpha_maps`` (each
  object's ITB-averaged weight: alpha for a, 1 - alpha for b in their overlap). For a pair,
  w_a > w_b iff alpha > 1/2 iff s_a - s_b > 0: the sign of s_a - s_b. A tie (an untrained gate
  gives exactly 1/2) earns half credit, so chance level is 0.5. Cells where the model did not
  route both objects (a weight of 0) count as wrong.
* Accuracy at step t = correct occluded pixels / occluded pixels, pooled over pairs and samples.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cell_fraction(masks: np.ndarray, grid: int) -> np.ndarray:
    """[N, H, W] masks -> [N, grid, grid] covered fraction of each cell of the centred square frame."""
    n, h, w = masks.shape
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    sq = torch.zeros(n, 1, s, s, dtype=torch.float64)
    sq[:, 0, top:top + h, left:left + w] = torch.from_numpy(np.asarray(masks) > 0).double()
    return F.adaptive_avg_pool2d(sq, grid)[:, 0].numpy()


def occlusion_truth(sample: dict, grid: int) -> list[tuple[int, int, np.ndarray]]:
    """[(front, back, weights [grid, grid])] per pair with occluded pixels; [] when the order is unknown.

    ``weights`` = occluded pixels (amodal intersection) per cell, so sums count pixels.
    """
    ranks, amodal = sample.get("depth_ranks"), sample.get("amodal_masks")
    if ranks is None or amodal is None or any(r is None for r in ranks) or len(amodal) != len(ranks):
        return []
    h, w = amodal.shape[1:]
    cell_area = (max(h, w) / grid) ** 2
    out = []
    for a in range(len(ranks)):
        for b in range(a + 1, len(ranks)):
            both = (amodal[a] > 0) & (amodal[b] > 0)
            if ranks[a] == ranks[b] or not both.any():
                continue
            weights = cell_fraction(both[None], grid)[0] * cell_area
            front, back = (a, b) if ranks[a] < ranks[b] else (b, a)
            out.append((front, back, weights))
    return out


def occlusion_credit(alpha_maps: list[np.ndarray], truth: list[tuple[int, int, np.ndarray]]) -> tuple[np.ndarray, float]:
    """(credit [T], occluded pixels): correctly ordered occluded pixels per step (ties count 1/2)."""
    credit = np.zeros(len(alpha_maps), np.float64)
    total = 0.0
    for front, back, weights in truth:
        total += float(weights.sum())
        for k, amap in enumerate(alpha_maps):
            wf, wb = amap[front].astype(np.float64), amap[back].astype(np.float64)
            routed = (wf > 0) & (wb > 0)
            score = np.where(wf > wb, 1.0, np.where(wf == wb, 0.5, 0.0)) * routed
            credit[k] += float((score * weights).sum())
    return credit, total


def visibility_map(truth: list[tuple[int, int, np.ndarray]], grid: int, a: int = 0, b: int = 1) -> np.ndarray:
    """[grid, grid] for the pair (a, b): + where a is truly in front, - where b is (pixel weights)."""
    out = np.zeros((grid, grid), np.float32)
    for front, back, weights in truth:
        if {front, back} == {a, b}:
            frac = weights / max(float(weights.max()), 1e-9)
            out += (1.0 if front == a else -1.0) * frac.astype(np.float32)
    return out
