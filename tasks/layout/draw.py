"""Pictures of a layout: each element's own pixels (or a colour) where it was placed."""
from __future__ import annotations

import colorsys

import numpy as np
import torch
import torch.nn.functional as F

from pics_model.layout import Element, Placement
from pics_model.layout.warp import render

INSIDE, OUTSIDE = (214, 214, 214), (250, 250, 250)


def palette(n: int) -> np.ndarray:
    """n distinct colours (golden-ratio hues), uint8 [n, 3]."""
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.55, 0.9)]
                     for i in range(n)], np.uint8)


def _placed_rgb(e: Element, placement: Placement, i: int, frame: tuple[int, int]) -> np.ndarray:
    """The element's image warped like its mask: uint8 [H, W, 3]. The image is zero outside the
    silhouette, so it is warped with the mask and divided by it (no dark fringe at the edges)."""
    size = float(placement.scale[i] * e.extent)
    side = int(np.clip(round(size), 2, e.image.shape[1]))
    stack = torch.cat([e.image * e.mask, e.mask[None]])  # [4, S, S]
    stack = F.interpolate(stack[None], size=(side, side), mode="area")[0][:, None]  # [4, 1, s, s]
    rep = lambda v: torch.full((4,), float(v))  # noqa: E731
    out = render(stack, rep(placement.tx[i]), rep(placement.ty[i]), rep(placement.theta[i]), rep(size), frame, 0,
                 (frame[1], frame[0]))
    rgb = out[:3] / out[3:].clamp_min(1e-3)
    return (rgb.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def draw_collage(target: np.ndarray, elements: list[Element], placement: Placement, masks: np.ndarray) -> np.ndarray:
    """target bool [H, W], masks bool [N, H, W] (placed, same order) -> uint8 [H, W, 3]: the target
    in grey, every element in its own pixels (a colour when it has none), later ones on top."""
    h, w = target.shape
    out = np.where(target[..., None], np.uint8(INSIDE), np.uint8(OUTSIDE)).astype(np.uint8)
    colours = palette(len(elements))
    for i, (e, m) in enumerate(zip(elements, masks)):
        if not m.any():
            continue
        out[m] = _placed_rgb(e, placement, i, (w, h))[m] if e.image is not None else colours[i]
    return out
