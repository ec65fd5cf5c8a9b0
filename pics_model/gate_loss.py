"""Occlusion-order loss: supervise the alpha gate with which object is visible in each overlap.

The paper trains the gate through the denoising loss alone. On the tiny preset that signal is too
weak to order occlusion (docs/fidelity_log.md: held-out order accuracy stays near chance), so we
add an auxiliary term. It needs no extra annotation: instance (modal) masks say which object a
pixel shows, and every training pair has them.

For every ITB call (block) of one forward, on the block's own token grid, for each token covered
by two or more objects (its overlap set S):

    v_p   = fraction of the token's area where object p is visible      (p in S; area-pooled mask)
    q_p   = v_p / sum_S v                                                (target share)
    w     = sum_S v                                                      (token weight)
    ce    = - sum_S q_p log softmax_S(s_p / tau)                         (s_p: the gate's score)

    loss_block = sum_tokens w * ce / sum_tokens w ;  loss = mean over blocks with any weight.

Tokens whose overlap shows only background (w = 0) do not count, and neither do rows given as
False in ``rows`` (e.g. samples whose objects were dropped for classifier-free guidance: their
codes are all zero, so there is nothing to order). softmax_S(s_p / tau) is exactly alpha_p, so the
loss pulls alpha towards the visible share, and the sign of s_a - s_b towards the front object:
what ``tasks/evaluate/occlusion.py`` measures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def occlusion_order_loss(records: list, visible: torch.Tensor, tau: float,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """records: a RoutingContext score sink, [(hw, scores [B,N,T] with their graph, covers [B,N,T]
    bool)] per block; visible [B,N,R,R] in [0,1] on the square frame the token grids tile;
    tau: the gate temperature; rows [B] bool or None -> scalar loss (0 with no weighted token).
    Dense over every token (no host synchronisation): tokens outside the overlaps weigh 0."""
    if not records:
        return visible.new_zeros((), dtype=torch.float32)
    sums, weights = [], []
    for (hh, ww), scores, covers in records:
        v = F.adaptive_avg_pool2d(visible.to(scores.device, torch.float32), (hh, ww)).flatten(2)  # [B,N,T]
        overlap = covers.sum(1, keepdim=True) >= 2  # [B,1,T]
        if rows is not None:
            overlap = overlap & rows.to(overlap.device).view(-1, 1, 1)
        shown = v * (covers & overlap)  # [B,N,T]
        weight = shown.sum(1)  # [B,T]
        target = shown / weight.clamp_min(1e-8).unsqueeze(1)
        # a finite floor instead of -inf for objects not covering the token: no NaN on empty tokens
        logits = torch.where(covers, scores.float() / tau, torch.full_like(scores, -1e4, dtype=torch.float32))
        ce = -(target * torch.log_softmax(logits, dim=1)).sum(1)  # [B,T]
        sums.append((weight * ce).sum())
        weights.append(weight.sum())
    sums, weights = torch.stack(sums), torch.stack(weights)
    counted = (weights > 0).float()  # blocks with any weighted token
    return (sums / weights.clamp_min(1e-8) * counted).sum() / counted.sum().clamp_min(1.0)
