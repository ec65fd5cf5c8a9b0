"""Elements: silhouettes as square, centred masks, and their mip levels with soft edges.

An element's reference point is the centre of its silhouette's tight box; its mask is that box
padded to a square of side ``extent`` (source pixels), so a rotation about the centre keeps the
whole silhouette inside the (zero-padded) sampling window's circumscribed disc.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Element:
    """mask: float32 [S, S] in [0, 1], the tight box centred in a square; extent: S (source px);
    area: silhouette pixels (source px); name: where it came from (a file name, an object key);
    image: optional float32 [3, S, S] in [0, 1], the object's pixels cut the same way (pictures)."""

    mask: torch.Tensor
    extent: float
    area: float
    name: str = ""
    image: torch.Tensor | None = None


def make_element(mask: np.ndarray, name: str = "", image: np.ndarray | None = None) -> Element:
    """A silhouette (bool/0-1/0-255 array [h, w], any background) and optionally the object's
    uint8 RGB [h, w, 3] -> Element; ValueError when the silhouette is empty."""
    m = np.asarray(mask)
    m = m > (127 if m.dtype == np.uint8 and m.max() > 1 else 0.5)
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError(f"{name or 'element'}: empty silhouette (no foreground pixel)")
    crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    oy, ox = (side - h) // 2, (side - w) // 2
    square[oy:oy + h, ox:ox + w] = crop
    rgb = None
    if image is not None:
        rgb = np.zeros((side, side, 3), np.float32)
        rgb[oy:oy + h, ox:ox + w] = np.asarray(image)[ys.min():ys.max() + 1, xs.min():xs.max() + 1, :3] / 255.0
        rgb = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    return Element(torch.from_numpy(square), float(side), float(crop.sum()), name, rgb)


def make_elements(masks, names=None, images=None) -> list[Element]:
    names = list(names) if names is not None else [str(i) for i in range(len(masks))]
    images = list(images) if images is not None else [None] * len(masks)
    return [make_element(m, n, im) for m, n, im in zip(masks, names, images)]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x: [N, 1, S, S]; separable Gaussian, zero padding (the element's outside is empty)."""
    if sigma <= 0:
        return x
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))


def mip_stack(elements: list[Element], side: int, blur_px: float = 0.0) -> torch.Tensor:
    """Every element's mask area-resampled to ``side`` x ``side`` (about its rendered size, so that
    bilinear sampling does not alias), then blurred by ``blur_px`` pixels (soft edges: the warp's
    gradient lives on edges). Returns float32 [N, 1, side, side]."""
    out = [F.interpolate(e.mask[None, None], size=(side, side), mode="area" if e.mask.shape[0] >= side
                         else "bilinear", align_corners=None if e.mask.shape[0] >= side else False)
           for e in elements]
    return _gaussian_blur(torch.cat(out), blur_px).clamp_(0, 1)
