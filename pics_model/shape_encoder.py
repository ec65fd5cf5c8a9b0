"""Shape encoder: K rendered views of an object's 3D prior -> one descriptor added to its code.

Input is the frozen object-encoder feature of each view [B,N,K,D] (so a view is "encoded like an
object image", as traces of the reference suggest). Views are embedded by a shared MLP and pooled
by a learned attention query, which is invariant to the order of the views. The output layer
starts at zero: an untrained shape encoder leaves the codes unchanged, so the multi-view prior
can be switched on over a model trained without it (the ablation switch is
`ShapeEncoderConfig.enabled`).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ShapeEncoder(nn.Module):
    """view features [B,N,K,D] (+ prior_valid [B,N] bool) -> descriptor [B,N,C] (0 where invalid)."""

    def __init__(self, in_dim: int, context_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.view_mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                      nn.Linear(hidden_dim, hidden_dim))
        self.pool_query = nn.Parameter(torch.randn(hidden_dim) / math.sqrt(hidden_dim))
        self.pool_key = nn.Linear(hidden_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, context_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, view_features: torch.Tensor, prior_valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.view_mlp(view_features)  # [B,N,K,H]
        logits = self.pool_key(h) @ self.pool_query / math.sqrt(h.shape[-1])  # [B,N,K]
        desc = (torch.softmax(logits, dim=-1).unsqueeze(-1) * h).sum(-2)
        desc = self.out(desc)
        if prior_valid is not None:
            desc = desc * prior_valid.to(desc.dtype).unsqueeze(-1)
        return desc
