"""An independent implementation of the reference PICS block's equations, the oracle of the
reference-mode tests. Written from the equations (pics_design_notes.md and the reference's
`BasicTransformerBlock._forward` / `scale_mask`), not from pics_model code: plain tensor algebra on
a dict of weights named as in the reference checkpoint (`norm2g`, `gate_q`, `norm_c`, `k_proj`,
`v_proj`, `norm2b`, `attn_bg`, ...). Two objects, as the reference; each sample is routed with its
own masks (the reference's batch-0 masks defect is deliberately not reproduced).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

Weights = dict[str, torch.Tensor]


# torch's layer_norm / linear / SDPA ops (not hand-written) where the reference calls them, so that
# autocast treats each op as it treats the reference's


def layer_norm(x: torch.Tensor, w: Weights, name: str, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B,H,Lq,d], k/v [B,H,Lk,d] -> [B,H,Lq,d]."""
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def cross_attention(x: torch.Tensor, context: torch.Tensor, w: Weights, name: str, heads: int) -> torch.Tensor:
    """The reference's CrossAttention: x [B,Lq,C], context [B,Lk,Cc] -> [B,Lq,C]."""
    q, k, v = (linear(t, w, f"{name}.{p}") for t, p in ((x, "to_q"), (context, "to_k"), (context, "to_v")))
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    d = q.shape[-1] // heads
    o = softmax_attention(split(q), split(k), split(v), d ** -0.5)
    return linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1), w, f"{name}.to_out.0")


def feed_forward(x: torch.Tensor, w: Weights) -> torch.Tensor:
    """GEGLU feed-forward: net.0.proj -> (a, gate) -> a * gelu(gate) -> net.2."""
    a, gate = linear(x, w, "ff.net.0.proj").chunk(2, dim=-1)
    return linear(a * F.gelu(gate), w, "ff.net.2")


def nearest_token_masks(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """masks [B,2,H,W] -> [B,2,h*w] bool: cell (i, j) takes pixel (floor(i*H/h), floor(j*W/w))."""
    hh, ww = masks.shape[-2:]
    rows = torch.arange(h) * hh // h
    cols = torch.arange(w) * ww // w
    return (masks[:, :, rows][:, :, :, cols] != 0).flatten(2)


def reference_block(x: torch.Tensor, codes: torch.Tensor, token_masks: torch.Tensor, w: Weights, heads: int,
                    tau: float = 0.5, gate_autocast: bool = False) -> torch.Tensor:
    """One reference block. x [B,T,C]; codes [B,2,L,Cc]; token_masks [B,2,T] bool -> [B,T,C].

    gate_autocast: the gate under bf16 autocast, as the reference on CUDA."""
    c0, c1 = codes[:, 0], codes[:, 1]
    m0, m1 = token_masks[:, 0, :, None], token_masks[:, 1, :, None]
    x = x + cross_attention(layer_norm(x, w, "norm1"), layer_norm(x, w, "norm1"), w, "attn1", heads)
    n2 = layer_norm(x, w, "norm2")
    y0, y1 = cross_attention(n2, c0, w, "attn2", heads), cross_attention(n2, c1, w, "attn2", heads)
    ctx_dim = c0.shape[-1]
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if gate_autocast else nullcontext()
    with amp:
        qg = linear(layer_norm(x, w, "norm2g"), w, "gate_q")  # [B,T,Cc]
        aggregated = []
        for c in (c0, c1):
            k = linear(layer_norm(c, w, "norm_c"), w, "k_proj")
            v = linear(c, w, "v_proj")
            aggregated.append(F.scaled_dot_product_attention(qg[:, None], k[:, None], v[:, None])[:, 0])
    s0, s1 = ((qg * a).sum(-1) / math.sqrt(ctx_dim) for a in aggregated)
    alpha = torch.softmax(torch.stack([s0, s1], -1) / tau, dim=-1)[..., 0:1]
    pair = (alpha * aggregated[0] + (1.0 - alpha) * aggregated[1]).to(c0.dtype)  # [B,T,Cc]: every token
    x_pair = cross_attention(n2, pair, w, "attn2", heads)
    x_back = cross_attention(layer_norm(x_pair, w, "norm2b"), x, w, "attn_bg", heads)
    out = y0 * (m0 & ~m1) + y1 * (m1 & ~m0) + x_back * (m0 & m1) + x
    return out + feed_forward(layer_norm(out, w, "norm3"), w)


class ReferenceBlock(nn.Module):
    """Stands in for one transformer block inside a diffusers UNet/ControlNet: reads codes and
    pixel masks from the PICS routing context and applies `reference_block`."""

    def __init__(self, weights: Weights, heads: int, tau: float = 0.5):
        super().__init__()
        self.w, self.heads, self.tau = weights, heads, tau

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        ctx = cross_attention_kwargs["pics_routing"]
        side = math.isqrt(hidden_states.shape[1])
        masks = nearest_token_masks(ctx.masks, side, side)
        return reference_block(hidden_states, ctx.codes, masks, self.w, self.heads, self.tau)


def block_weights(state: dict[str, torch.Tensor], prefix: str) -> Weights:
    """The tensors under `prefix` (a reference checkpoint's block prefix), prefix stripped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
