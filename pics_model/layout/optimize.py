"""The optimisation: Adam on (position, angle, log scale) of every element, coarse to fine.

Each level renders the elements at a resolution (the long side of the target's part of the
canvas) and takes that level's iterations; positions move by about ``lr_position`` level pixels
per step, so coarse levels take large steps over the shape and fine levels small precise ones
(the paper's hierarchical schedule: 50 -> 200 -> 600 px). The cost of one iteration is
N * canvas pixels bilinear samples, whatever the elements' shapes.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pics_model.layout import losses
from pics_model.layout.elements import Element, mip_stack
from pics_model.layout.init import initial_positions, initial_scales, place_at_maxima
from pics_model.layout.metrics import separate
from pics_model.layout.placement import Placement
from pics_model.layout.warp import canvas_shape, render, splat, windows


@dataclass
class LayoutConfig:
    """Weights and rates of the optimisation; tasks/params.py's ``layout`` section carries them."""

    resolutions: list[int] = field(default_factory=lambda: [64, 128, 256])  # level long sides, px
    iterations: list[int] = field(default_factory=lambda: [100, 60, 40])  # Adam steps per level
    w_containment: float = 1.0
    w_overlap: float = 20.0
    w_uniformity: float = 0.2
    overlap_ramp: float = 1.0  # w_overlap grows geometrically over the levels to this factor at the
    # last. 1: the paper's constant weight; a ramp (10 was tried) makes elements shrink from every
    # contact at the finest level and cost 0.08 of coverage (100 LVIS elements in a star)
    w_pair: float = 1.0  # pair_overlap mode: weight of the per-pair target
    outside_weight: float = 100.0  # containment weight of a pixel outside the target (paper: 100)
    lr_position: float = 0.5  # level pixels per step
    lr_angle: float = 0.05  # radians per step (paper code: 0.05)
    lr_scale: float = 0.01  # log-scale per step
    betas: tuple[float, float] = (0.9, 0.9)  # paper code's Adam betas
    init_fill: float = 0.55  # initial scale: sqrt(fill * A_target / sum A_i) (paper code: 0.55)
    equal_size: bool = True  # elements normalised to one box size before that scale (paper code);
    # False: one scale for all, source sizes kept
    rotate: bool = True  # False: angles stay 0 (upright objects for compositing)
    pair_overlap: float = 0.0  # > 0: chosen pairs share this fraction of the smaller element
    uniformity_kernels: list[int] = field(default_factory=lambda: [5, 11, 17])  # at 600 px (paper)
    blur_px: float = 1.0  # soft edge of the rendered masks, level pixels
    margin: float = 0.1  # canvas grown by this fraction of the target's long side on every side
    reseed_share: float = 0.5  # packing mode, after each level: elements with more of their area
    # covered by others than this move to the emptiest free spot (distance-transform maximum)
    separate_rounds: int = 20  # packing mode: rounds of shrinking elements that still overlap (hard masks)

    def __post_init__(self):
        if len(self.resolutions) != len(self.iterations) or not self.resolutions:
            raise ValueError("layout: resolutions and iterations need the same, non-zero, length")


def target_on_canvas(target: np.ndarray, margin_px: int, shape: tuple[int, int]) -> torch.Tensor:
    """bool [H, W] -> float32 [rows, cols]: padded by ``margin_px`` and area-resampled."""
    t = torch.from_numpy(np.pad(target.astype(np.float32), margin_px))
    return F.interpolate(t[None, None], size=shape, mode="area")[0, 0]


def chain_pairs(n: int) -> list[tuple[int, int]]:
    """The default interacting pairs of pair-overlap mode: each element with the next one."""
    return [(i, i + 1) for i in range(n - 1)]


class _Params:
    """The optimised tensors: positions normalised by the target's long side, angle, log scale."""

    def __init__(self, start: Placement, long_side: float, rotate: bool):
        self.long_side = long_side
        pos = np.stack([start.tx, start.ty], 1) / long_side
        self.pos = torch.tensor(pos, dtype=torch.float32, requires_grad=True)
        self.theta = torch.tensor(start.theta if rotate else np.zeros(len(pos)), dtype=torch.float32,
                                  requires_grad=rotate)
        self.log_s = torch.tensor(np.log(start.scale), dtype=torch.float32, requires_grad=True)

    def placement(self) -> Placement:
        p = self.pos.detach().double().numpy() * self.long_side
        return Placement(p[:, 0], p[:, 1], self.theta.detach().double().numpy(),
                         self.log_s.detach().double().exp().numpy())


def _loss(draw, target, cfg: LayoutConfig, kernels, pairs, w_overlap: float) -> tuple[torch.Tensor, dict]:
    """draw: (masks, tx, ty, theta, size, frame, margin, shape), the arguments of the renderers.
    Pair-overlap mode needs every element's alpha (:func:`render`, N x canvas); the packing mode
    only their sums (:func:`splat`, N x window, much cheaper)."""
    if cfg.pair_overlap > 0:
        alpha = render(*draw)
        u = losses.union(alpha)
        overlap = cfg.w_pair * losses.pair_overlap_loss(alpha, pairs, cfg.pair_overlap)
    else:
        total, logs = splat(*draw)
        u = losses.union_from_logs(logs)
        overlap = w_overlap * losses.overlap(total)
    terms = {"containment": cfg.w_containment * losses.containment(u, target, cfg.outside_weight),
             "overlap": overlap, "uniformity": cfg.w_uniformity * losses.uniformity(u, target, kernels)}
    return sum(terms.values()), terms


def _reseed(p: _Params, draw: tuple, target: torch.Tensor, share: float) -> int:
    """Not from the paper: an element buried under others gets no gradient out (the overlap hinge
    is flat inside another element), so after a level it jumps to the deepest free point of the
    target, shrunk to fit there. Returns how many moved."""
    _, _, _, _, size, (w, h), margin, (rows, cols) = draw
    with torch.no_grad():
        alpha, index, inside = windows(*draw)  # each element's window only: no N x canvas tensor
    hard = (alpha >= 0.5).flatten(1) & inside.view(len(alpha), -1)  # [N, K * K]

    def painted(which: torch.Tensor) -> torch.Tensor:  # canvas pixels covered by ``which`` [N, K * K]
        return torch.zeros(rows * cols).index_add(0, index, which.flatten().float())

    area = hard.sum(1)
    buried = ((hard & (painted(hard)[index].view_as(hard) >= 2)).sum(1) > share * area) | (area == 0)
    if not buried.any():
        return 0
    px = cols / (w + 2 * margin)  # level pixels per target pixel
    free = ((target >= 0.5) & (painted(hard & ~buried[:, None]).view(rows, cols) == 0)).numpy()
    half = 0.5 * size.detach() * px  # half the placed square, level px: a conservative fit
    moved = sorted(torch.nonzero(buried)[:, 0].tolist(), key=lambda i: -float(half[i]))  # largest first
    radii = [float(half[i]) for i in moved]
    found = place_at_maxima(free, radii)
    with torch.no_grad():
        for i, r, (x, y, room) in zip(moved, radii, found):
            p.pos[i] = torch.tensor([x / px - margin, y / px - margin]) / p.long_side
            fit = room / max(r, 1e-6)
            p.log_s[i] += math.log(min(1.0, max(fit, 0.1)))
    return len(moved)


def pack(elements: list[Element], target: np.ndarray, cfg: LayoutConfig | None = None,
         pairs: list[tuple[int, int]] | None = None, init: Placement | None = None,
         log_every: int = 0) -> tuple[Placement, dict]:
    """Lay ``elements`` out in ``target`` (bool [H, W]). Returns the placement and an info dict
    (seconds, per-level seconds and iterations, the initial placement, the last loss terms).
    ``pairs``: pair-overlap mode's interacting pairs (default: :func:`chain_pairs`). ``init``: the
    starting placement (default: the area-ratio scale at distance-transform maxima)."""
    cfg = cfg or LayoutConfig()
    target = np.asarray(target, bool)
    if not target.any():
        raise ValueError("layout: the target mask is empty")
    if not elements:
        raise ValueError("layout: no elements")
    t0 = time.perf_counter()
    h, w = target.shape
    long_side = float(max(h, w))
    margin_px = int(round(cfg.margin * long_side))
    pairs = chain_pairs(len(elements)) if pairs is None else pairs
    if init is None:
        s0 = initial_scales(elements, float(target.sum()), cfg.init_fill, cfg.equal_size)
        centres = initial_positions(elements, target, s0)
        init = Placement(centres[:, 0], centres[:, 1], np.zeros(len(elements)), s0)
    p = _Params(init, long_side, cfg.rotate)
    initial = p.placement()
    groups = [{"params": [p.pos]}, {"params": [p.log_s], "lr": cfg.lr_scale}]
    if cfg.rotate:
        groups.append({"params": [p.theta], "lr": cfg.lr_angle})
    opt = torch.optim.Adam(groups, lr=1.0, betas=cfg.betas)
    extent = torch.tensor([e.extent for e in elements])
    levels, terms = [], {}
    for level, (res, iters) in enumerate(zip(cfg.resolutions, cfg.iterations)):
        w_overlap = cfg.w_overlap * cfg.overlap_ramp ** (level / max(1, len(cfg.resolutions) - 1))
        t_level = time.perf_counter()
        res = min(res, int(long_side))
        shape = canvas_shape((w, h), margin_px, res)
        tgt = target_on_canvas(target, margin_px, shape)
        kernels = losses.scaled_kernels(cfg.uniformity_kernels, res)
        sizes = p.log_s.detach().exp() * extent * res / long_side  # placed sizes, level px
        masks = mip_stack(elements, int(np.clip(sizes.median().item(), 8, 128)), cfg.blur_px)
        opt.param_groups[0]["lr"] = cfg.lr_position / res  # level pixels -> normalised units
        for it in range(iters):
            opt.zero_grad(set_to_none=True)
            draw = (masks, p.pos[:, 0] * long_side, p.pos[:, 1] * long_side, p.theta, p.log_s.exp() * extent,
                    (w, h), margin_px, shape)
            loss, terms = _loss(draw, tgt, cfg, kernels, pairs, w_overlap)
            loss.backward()
            opt.step()
            if log_every and it % log_every == 0:
                print(f"  level {res} it {it}: " + " ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
        moved = 0
        if cfg.pair_overlap == 0 and cfg.reseed_share < 1:
            draw = (masks, p.pos[:, 0] * long_side, p.pos[:, 1] * long_side, p.theta, p.log_s.exp() * extent,
                    (w, h), margin_px, shape)
            moved = _reseed(p, draw, tgt, cfg.reseed_share)
        levels.append({"resolution": res, "iterations": iters, "reseeded": moved,
                       "seconds": time.perf_counter() - t_level})
    placement, rounds = p.placement(), 0
    if cfg.pair_overlap == 0 and cfg.separate_rounds:
        placement, rounds = separate(elements, placement, target, max_rounds=cfg.separate_rounds)
    info = {"seconds": time.perf_counter() - t0, "levels": levels, "initial": initial, "separate_rounds": rounds,
            "loss": {k: float(v.detach()) for k, v in terms.items()}, "config": asdict(cfg)}
    return placement, info
