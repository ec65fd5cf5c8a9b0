"""Image-space losses of the paper (section 4.2), on rendered alpha [N, H, W] and a target [H, W].

All are means over canvas pixels, so their scale does not depend on the resolution level. The
paper's formulations and where these differ:

* containment: the paper's (1/wh)||W * (I_hat - I_C)||^2, W = 1 inside and ``outside_weight``
  (100) outside; I_hat here is the union 1 - prod(1 - alpha_i) instead of a diffvg rendering.
* overlap: the paper renders at transparency tau and penalises pixels off tau; its code is a hinge
  on stacked alpha. Here the hinge is on summed coverage: relu(sum_i alpha_i - 1).
* pair overlap (not in the paper): for compositing, chosen pairs should overlap by a fraction of
  the smaller element's area, so objects interact; the other pairs keep the hinge.
* uniformity: empty target pixels after dilating the union with kernels 5, 11, 17 (pixels at the
  paper's 600 px, scaled to the level); bigger kernels weigh more (weight = kernel size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def union(alpha: torch.Tensor) -> torch.Tensor:
    """alpha [N, H, W] -> [H, W]: 1 - prod(1 - alpha_i), the coverage of any element."""
    return union_from_logs(torch.log1p(-alpha.clamp(0, 1 - 1e-6)).sum(0))


def union_from_logs(logs: torch.Tensor) -> torch.Tensor:
    """sum_i log(1 - alpha_i) [H, W] (as :func:`pics_model.layout.warp.splat` gives) -> the union."""
    return 1 - torch.exp(logs)


def containment(u: torch.Tensor, target: torch.Tensor, outside_weight: float = 100.0) -> torch.Tensor:
    """u, target: [H, W] -> scalar. Zero iff the union equals the target exactly."""
    weight = 1 + (outside_weight - 1) * (1 - target)
    return (weight * (u - target) ** 2).mean()


def overlap(total: torch.Tensor) -> torch.Tensor:
    """total = sum_i alpha_i [H, W] -> scalar: mean of relu(total - 1); zero iff no pixel is
    covered more than once."""
    return F.relu(total - 1).mean()


def pair_overlaps(alpha: torch.Tensor) -> torch.Tensor:
    """alpha [N, H, W] -> [N, N]: soft intersection area of every pair (canvas pixels)."""
    flat = alpha.flatten(1)
    return flat @ flat.T


def pair_overlap_loss(alpha: torch.Tensor, pairs: list[tuple[int, int]], fraction: float) -> torch.Tensor:
    """Chosen ``pairs`` should share ``fraction`` of the smaller element's area (squared error of
    the fraction); every other pair should share nothing (its intersection, per canvas pixel)."""
    inter = pair_overlaps(alpha)
    area = alpha.flatten(1).sum(1).clamp_min(1e-6)
    n = alpha.shape[0]
    chosen = torch.zeros(n, n, dtype=torch.bool)
    for i, j in pairs:
        chosen[i, j] = chosen[j, i] = True
    off_diag = ~torch.eye(n, dtype=torch.bool)
    loss = (inter * (off_diag & ~chosen)).sum() / 2 / alpha[0].numel()
    if pairs:
        i, j = torch.tensor(pairs).T
        share = inter[i, j] / torch.minimum(area[i], area[j])
        loss = loss + ((share - fraction) ** 2).sum()
    return loss


def uniformity(u: torch.Tensor, target: torch.Tensor, kernels: list[int]) -> torch.Tensor:
    """Weighted mean of target pixels still empty after dilating the union by each kernel (max
    pooling): large empty areas survive big dilations and cost the most."""
    total = u.new_zeros(())
    for k in kernels:
        k = max(3, k | 1)  # odd, so the dilation stays centred
        dilated = F.max_pool2d(u[None, None], k, stride=1, padding=k // 2)[0, 0]
        total = total + k * (target * (1 - dilated)).mean()
    return total / sum(kernels)


def scaled_kernels(kernels: list[int], long_side: int, reference_side: int = 600) -> list[int]:
    """The paper's kernel sizes (at ``reference_side`` px) at a level of ``long_side`` px."""
    return [max(3, round(k * long_side / reference_side)) for k in kernels]
