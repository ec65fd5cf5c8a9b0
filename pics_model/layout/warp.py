"""The differentiable warp: placements -> rendered alpha of every element on a canvas.

Coordinates are continuous target pixels: x right, y down, pixel (i, j) covers [j, j+1) x [i, i+1).
Element point u (source pixels, relative to its centre) lands at ``t + s * R(theta) u``, so a
positive ``theta`` turns the element clockwise on screen. A canvas covers the target's frame
grown by ``margin`` target pixels on every side (what slides out of the target is still seen, and
penalised), sampled at ``canvas_shape`` pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_matrices(tx: torch.Tensor, ty: torch.Tensor, theta: torch.Tensor, size: torch.Tensor,
                    frame: tuple[float, float], margin: float) -> torch.Tensor:
    """The ``affine_grid`` matrices [N, 2, 3] that map canvas coordinates (normalised, [-1, 1])
    to each element's mask coordinates (normalised). tx, ty, theta, size: [N]; size is the placed
    square's side in target pixels (scale * extent); frame: the target's (width, height)."""
    w, h = frame
    ax, ay = (w + 2 * margin) / 2, (h + 2 * margin) / 2  # canvas half-extent, target px
    bx, by = ax - margin, ay - margin  # canvas centre, target px
    cos, sin = torch.cos(theta), torch.sin(theta)
    k = 2.0 / size  # target px -> element-normalised units
    # input = R(-theta) * k * (diag(ax, ay) @ out + b - t),  R(-theta) = [[cos, sin], [-sin, cos]]
    dx, dy = bx - tx, by - ty
    row0 = torch.stack([cos * ax * k, sin * ay * k, (cos * dx + sin * dy) * k], -1)
    row1 = torch.stack([-sin * ax * k, cos * ay * k, (-sin * dx + cos * dy) * k], -1)
    return torch.stack([row0, row1], 1)


def render(masks: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, theta: torch.Tensor, size: torch.Tensor,
           frame: tuple[float, float], margin: float, canvas_shape: tuple[int, int]) -> torch.Tensor:
    """masks [N, 1, S, S] (soft, [0, 1]) placed on a canvas of ``canvas_shape`` (rows, cols):
    alpha [N, rows, cols], differentiable in tx, ty, theta and size. The cost is N * rows * cols
    bilinear samples whatever the elements' shapes."""
    n = masks.shape[0]
    mats = affine_matrices(tx, ty, theta, size, frame, margin)
    grid = F.affine_grid(mats, [n, 1, *canvas_shape], align_corners=False)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def canvas_shape(frame: tuple[float, float], margin: float, long_side: int) -> tuple[int, int]:
    """(rows, cols) of a canvas whose target part has ``long_side`` pixels on its long side."""
    w, h = frame
    f = long_side / max(w, h)
    return max(1, round((h + 2 * margin) * f)), max(1, round((w + 2 * margin) * f))


def windows(masks: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, theta: torch.Tensor, size: torch.Tensor,
            frame: tuple[float, float], margin: float, canvas_shape: tuple[int, int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`render`'s alpha, but each element sampled only in a K x K window of canvas pixels
    around its centre (K covers the largest element at any angle). Returns (alpha [N, K, K],
    differentiable; index [N * K * K], each window pixel's flat canvas index; inside [N * K * K],
    False where a window pixel is off the canvas). The cost is N * K^2 samples: it grows with the
    resolution, not with the shapes' outlines."""
    rows, cols = canvas_shape
    w, h = frame
    px, py = cols / (w + 2 * margin), rows / (h + 2 * margin)  # level pixels per target pixel
    k_side = int(math.ceil(float(size.detach().max()) * max(px, py) * math.sqrt(2))) + 2
    ox = torch.floor((tx.detach() + margin) * px - k_side / 2).long()
    oy = torch.floor((ty.detach() + margin) * py - k_side / 2).long()
    a = torch.arange(k_side)
    dx = (ox[:, None] + a + 0.5) / px - margin - tx[:, None]  # [N, K] target px from the centre
    dy = (oy[:, None] + a + 0.5) / py - margin - ty[:, None]
    cos, sin, k = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None], (2.0 / size)[:, None, None]
    u = (cos * dx[:, None, :] + sin * dy[:, :, None]) * k  # [N, K (rows), K (cols)]
    v = (-sin * dx[:, None, :] + cos * dy[:, :, None]) * k
    alpha = F.grid_sample(masks, torch.stack([u, v], -1), mode="bilinear", padding_mode="zeros",
                          align_corners=False)[:, 0]
    r, c = oy[:, None] + a, ox[:, None] + a  # [N, K] canvas rows / cols
    inside = ((r >= 0) & (r < rows))[:, :, None] & ((c >= 0) & (c < cols))[:, None, :]
    index = (r.clamp(0, rows - 1) * cols)[:, :, None] + c.clamp(0, cols - 1)[:, None, :]
    return alpha, index.flatten(), inside.flatten()


def splat(masks: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, theta: torch.Tensor, size: torch.Tensor,
          frame: tuple[float, float], margin: float, canvas_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the losses need of :func:`render`'s alpha, without an N x canvas tensor: the
    :func:`windows` added into the canvas. Returns (sum_i alpha_i, sum_i log(1 - alpha_i)), both
    [rows, cols] and differentiable; pixels of a window off the canvas are dropped."""
    rows, cols = canvas_shape
    alpha, index, inside = windows(masks, tx, ty, theta, size, frame, margin, canvas_shape)
    total = alpha.new_zeros(rows * cols).index_add(0, index, alpha.flatten() * inside)
    logs = torch.log1p(-alpha.clamp(0, 1 - 1e-6)).flatten() * inside
    return total.view(rows, cols), alpha.new_zeros(rows * cols).index_add(0, index, logs).view(rows, cols)
