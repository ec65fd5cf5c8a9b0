"""The Interaction Transformer Block (ITB): mask-routed experts with attention-gated alpha-blending.

An ITB replaces a diffusers `BasicTransformerBlock` in place and *adopts* its modules (norm1,
attn1, norm2, attn2, norm3, ff keep their state-dict keys and pretrained weights); it adds a gate
and a back-attention. For tokens h [B,T,C], object codes c [B,N,L,Cc] and per-object token masks
m_p [B,T] (expanded boxes resized to this block's grid):

    h = h + attn1(norm1(h))                                      # self-attention (vanilla)
    cover(t) = #objects whose mask holds token t
    background (cover 0):   identity
    exclusive  (cover 1):   y_p = attn2(norm2(h), c_p)          # one cross-attention shared by objects
    overlap    (cover >=2): q_g = gate_q(gate_norm(h))           # [.., Cc]
                            c~_p = Attn(q_g, gate_k(gate_context_norm(c_p)), gate_v(c_p))
                            s_p = <q_g, c~_p> / sqrt(Cc);  alpha = softmax_tau over covering p
                            pair = sum_p alpha_p c~_p            # one pair context per token
                            x_pair = attn2(norm2(h), {pair(t') : t' overlap})   # pair attention
                            out = sum_p alpha_p y_p + back_attn(back_norm(x_pair), h)
    h = h + out;  h = h + ff(norm3(h))

Project choices (see pics_design_notes.md; the paper is silent on these details):
  * "Untrained ITB == vanilla block": `back_attn`'s output projection starts at zero, so an
    untrained overlap expert is the alpha-weighted vanilla cross-attention sum_p alpha_p y_p. It
    equals the vanilla block exactly whenever the covering objects share a code, and for N = 1 the
    ITB is the vanilla block on covered tokens. gate_k/gate_v start as identities (pair contexts
    live in code space), so every new parameter is on a gradient path from step 0 (the gate via
    alpha) or from the first update on (behind the zero projection).
  * The pair attention's keys are the pair contexts of the sample's overlap tokens only (a pair
    context is undefined where fewer than two objects cover a token). The reference attends over
    every token's pair context, which also forces the gate over every token.
  * Row-sparse (default) and dense compute the same numbers: dense runs every expert on every
    token and masks (the reference's way); sparse gathers each expert's own rows.
Order invariance: every object-indexed quantity is combined by a symmetric sum/softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

ROUTING_KEY = "pics_routing"  # key in diffusers' cross_attention_kwargs


# ----------------------------------------------------------------------------------------------
# routing state, shared by all blocks of one forward

@dataclass
class RoutingPlan:
    """Region layout at one token resolution (h x w = T)."""

    hw: tuple[int, int]
    m: torch.Tensor  # [B,N,T] bool: token inside object p's (expanded) box
    ov: torch.Tensor  # [B,T] bool: covered by >= 2 objects
    # row-sparse gather indices (None in dense mode); E = covered (object, token) pairs, O = overlap tokens
    e_g: torch.Tensor | None = None  # [E] group b*N+p
    e_pos: torch.Tensor | None = None  # [E] row within the group's packed tile
    e_tok: torch.Tensor | None = None  # [E] flat token b*T+t
    e_ovpos: torch.Tensor | None = None  # [E] row in the overlap tile, -1 if exclusive
    lmax: int = 0
    e_rows: torch.Tensor | None = None  # [max(lmax,1)] carries the tile height as a tensor size, so a
    # compiled graph sees it as a (dynamic) shape instead of a specialised Python int
    o_b: torch.Tensor | None = None  # [O]
    o_pos: torch.Tensor | None = None  # [O]
    o_tok: torch.Tensor | None = None  # [O] flat token b*T+t
    o_cover: torch.Tensor | None = None  # [B,N,Omax] bool (padding rows all True: finite softmax)
    o_keys: torch.Tensor | None = None  # [B,Omax] bool valid keys (a sample with none: all True)
    omax: int = 0
    o_rows: torch.Tensor | None = None  # [max(omax,1)] as e_rows

    def to(self, device) -> "RoutingPlan":
        kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return RoutingPlan(**kw)


def _pack_positions(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """flags [G,T] bool -> (g, t, pos-within-g, max count) for each True, in (g, t) order."""
    g, t = flags.nonzero(as_tuple=True)
    counts = flags.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    pos = torch.arange(g.numel(), device=flags.device) - offsets[g]
    return g, t, pos, int(counts.max()) if g.numel() else 0


def token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The h x w grid of T tokens for masks of aspect height:width (diffusers drops the grid)."""
    h = max(1, round(math.sqrt(num_tokens * height / width)))
    w = num_tokens // h
    if h * w != num_tokens:
        raise ValueError(f"cannot place {num_tokens} tokens on a grid of aspect {height}:{width}")
    return h, w


def build_plan(masks: torch.Tensor, num_tokens: int, threshold: float = 0.5, sparse: bool = True) -> RoutingPlan:
    """masks [B,N,H,W] float 0/1 (invalid objects already zeroed) -> the plan at T tokens."""
    b, n, hm, wm = masks.shape
    h, w = token_grid(num_tokens, hm, wm)
    mk = masks.float()
    if (h, w) != (hm, wm):
        # a token joins an object's region when at least `threshold` of its area is in the box
        mk = F.interpolate(mk, size=(h, w), mode="area")
    m = (mk >= threshold - 1e-6).flatten(2)
    ov = m.sum(1) >= 2
    plan = RoutingPlan(hw=(h, w), m=m, ov=ov)
    if not sparse:
        return plan
    t_all = h * w
    g, t, pos, lmax = _pack_positions(m.reshape(b * n, t_all))
    bb = torch.div(g, n, rounding_mode="floor")
    ob, ot, opos, omax = _pack_positions(ov)
    ovpos_map = torch.full((b, t_all), -1, dtype=torch.long, device=masks.device)
    ovpos_map[ob, ot] = opos
    o_cover = torch.ones(b, n, max(omax, 1), dtype=torch.bool, device=masks.device)
    o_keys = torch.zeros(b, max(omax, 1), dtype=torch.bool, device=masks.device)
    if ob.numel():
        o_cover[ob, :, opos] = m[ob, :, ot]
        o_keys[ob, opos] = True
    o_keys |= ~o_keys.any(1, keepdim=True)  # a sample with no overlap: attend anywhere, output unused
    plan.e_g, plan.e_pos, plan.e_tok, plan.e_ovpos, plan.lmax = g, pos, bb * t_all + t, ovpos_map[bb, t], lmax
    plan.o_b, plan.o_pos, plan.o_tok, plan.o_cover, plan.o_keys, plan.omax = ob, opos, ob * t_all + ot, o_cover, o_keys, omax
    plan.e_rows = torch.arange(max(lmax, 1), device=masks.device)
    plan.o_rows = torch.arange(max(omax, 1), device=masks.device)
    return plan


class RoutingContext:
    """What every ITB of one UNet/ControlNet forward needs; passed as
    ``cross_attention_kwargs={"pics_routing": ctx}`` and caches one plan per token resolution.

    codes [B,N,L,Cc]; masks [B,N,H,W] 0/1; object_valid [B,N] bool (padding objects are removed
    from every region). alpha_sink: a list that receives ``(hw, weights [B,N,T])`` per block
    (weights = 1 on exclusive tokens, alpha on overlap tokens, 0 elsewhere).
    """

    def __init__(self, codes: torch.Tensor, masks: torch.Tensor, object_valid: torch.Tensor | None = None,
                 mode: str = "sparse", threshold: float = 0.5, tau: float | None = None,
                 alpha_sink: list | None = None):
        if codes.ndim != 4 or masks.ndim != 4 or codes.shape[:2] != masks.shape[:2]:
            raise ValueError(f"routing: codes [B,N,L,C] {tuple(codes.shape)} and masks [B,N,H,W] "
                             f"{tuple(masks.shape)} must agree on B and N")
        if mode not in ("sparse", "dense"):
            raise ValueError(f"routing: expert mode must be 'sparse' or 'dense', got {mode!r}")
        if object_valid is not None:
            masks = masks * object_valid.to(masks.dtype)[:, :, None, None]
        self.codes, self.masks, self.mode, self.threshold = codes, masks, mode, threshold
        self.tau, self.alpha_sink = tau, alpha_sink
        self._plans: dict[int, RoutingPlan] = {}

    def plan(self, num_tokens: int) -> RoutingPlan:
        if num_tokens not in self._plans:
            self._plans[num_tokens] = build_plan(self.masks, num_tokens, self.threshold, self.mode == "sparse")
        return self._plans[num_tokens]

    def precompute(self, token_counts) -> "RoutingContext":
        for t in token_counts:
            self.plan(int(t))
        return self

    def to(self, device) -> "RoutingContext":
        """A copy on `device` with the plans built so far (e.g. indices built on CPU, run on meta)."""
        ctx = RoutingContext(self.codes.to(device), self.masks.to(device), None, self.mode, self.threshold,
                             self.tau, self.alpha_sink)
        ctx._plans = {k: v.to(device) for k, v in self._plans.items()}
        return ctx


# ----------------------------------------------------------------------------------------------

def attend(attn: Attention, queries: torch.Tensor, context: torch.Tensor,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers `Attention` math (as AttnProcessor2_0) with a boolean key mask [B,Lk] (True = keep).

    queries [B,Lq,Cq], context [B,Lk,Ck] -> [B,Lq,out_dim].
    """
    b, lq, _ = queries.shape
    q, k, v = attn.to_q(queries), attn.to_k(context), attn.to_v(context)
    d = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    v = v.view(b, -1, attn.heads, d).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    o = o.transpose(1, 2).reshape(b, lq, attn.heads * d).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](o))


def _pack(rows: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor, d0: int, d1: torch.Tensor) -> torch.Tensor:
    """rows [E,C] -> zero-padded tile [d0, len(d1), C] with tile[i0[e], i1[e]] = rows[e] (differentiable)."""
    tile = rows.new_zeros(d0, d1.shape[0], rows.shape[-1])
    return tile.index_put((i0, i1), rows)


class InteractionTransformerBlock(nn.Module):
    """Drop-in replacement of a diffusers `BasicTransformerBlock` (layer_norm type, with cross-attention).

    Without a routing context in ``cross_attention_kwargs`` it is exactly the vanilla block.
    """

    NEW_MODULES = ("gate_norm", "gate_q", "gate_context_norm", "gate_k", "gate_v", "back_norm", "back_attn")

    def __init__(self, block: BasicTransformerBlock, tau: float = 0.5):
        super().__init__()
        if block.norm_type != "layer_norm" or block.pos_embed is not None or block.attn2 is None \
                or block.only_cross_attention or block.double_self_attention:
            raise ValueError("InteractionTransformerBlock wraps layer_norm blocks with self- and cross-attention "
                             f"only (got norm_type={block.norm_type!r})")
        self.norm1, self.attn1, self.norm2, self.attn2 = block.norm1, block.attn1, block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        self.tau = float(tau)
        dim = block.norm1.normalized_shape[0]
        ctx = self.attn2.to_k.in_features
        eps = block.norm2.eps
        self.gate_norm = nn.LayerNorm(dim, eps=eps)
        self.gate_q = nn.Linear(dim, ctx)
        self.gate_context_norm = nn.LayerNorm(ctx, eps=eps)
        self.gate_k = nn.Linear(ctx, ctx, bias=False)
        self.gate_v = nn.Linear(ctx, ctx, bias=False)
        self.back_norm = nn.LayerNorm(dim, eps=eps)
        heads = self.attn2.heads
        self.back_attn = Attention(query_dim=dim, cross_attention_dim=dim, heads=heads,
                                   dim_head=self.attn2.inner_dim // heads, bias=False, out_bias=True)
        self.reset_new_parameters()

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        """The start state that makes an untrained ITB the vanilla block (see module docstring)."""
        for ln in (self.gate_norm, self.gate_context_norm, self.back_norm):
            ln.reset_parameters()
        self.gate_q.reset_parameters()
        if self.gate_k.weight.device.type != "meta":
            eye = torch.eye(self.gate_k.in_features, dtype=self.gate_k.weight.dtype, device=self.gate_k.weight.device)
            self.gate_k.weight.copy_(eye)
            self.gate_v.weight.copy_(eye)
        for lin in (self.back_attn.to_q, self.back_attn.to_k, self.back_attn.to_v):
            lin.reset_parameters()
        nn.init.zeros_(self.back_attn.to_out[0].weight)
        nn.init.zeros_(self.back_attn.to_out[0].bias)

    def new_parameters(self):
        for name in self.NEW_MODULES:
            yield from getattr(self, name).parameters()

    # ------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, timestep=None,
                cross_attention_kwargs: dict | None = None, class_labels=None,
                added_cond_kwargs=None) -> torch.Tensor:
        """hidden_states [B,T,C] -> [B,T,C]; the signature is BasicTransformerBlock's (incl. the
        positional order diffusers' gradient checkpointing uses)."""
        routing = (cross_attention_kwargs or {}).get(ROUTING_KEY)
        h = hidden_states + self.attn1(self.norm1(hidden_states), attention_mask=attention_mask)
        if routing is None:
            h = h + self.attn2(self.norm2(h), encoder_hidden_states=encoder_hidden_states,
                               attention_mask=encoder_attention_mask)
        else:
            h = h + self.experts(h, routing)
        return h + self.ff(self.norm3(h))

    def experts(self, h: torch.Tensor, routing: RoutingContext) -> torch.Tensor:
        """The mixture-of-experts update for h [B,T,C] (zero on background tokens)."""
        codes = routing.codes
        plan = routing.plan(h.shape[1])
        tau = routing.tau if routing.tau is not None else self.tau
        record = routing.alpha_sink is not None
        if routing.mode == "dense":
            out, weights = self._dense(h, codes, plan, tau)
        else:
            out, weights = self._sparse(h, codes, plan, tau, record)
        if record:
            routing.alpha_sink.append((plan.hw, weights.detach().float()))
        return out

    def _gate(self, h_rows: torch.Tensor, codes: torch.Tensor, cover: torch.Tensor, tau: float):
        """h_rows [B,M,C] (tokens), codes [B,N,L,Cc], cover [B,N,M] bool -> (alpha [B,N,M], pair [B,M,Cc])."""
        b, n = codes.shape[:2]
        qg = self.gate_q(self.gate_norm(h_rows))  # [B,M,Cc]
        kg = self.gate_k(self.gate_context_norm(codes))  # [B,N,L,Cc]
        vg = self.gate_v(codes)
        q = qg[:, None].expand(b, n, *qg.shape[1:])
        c_tilde = F.scaled_dot_product_attention(q, kg.to(q.dtype), vg.to(q.dtype))  # [B,N,M,Cc]
        s = (q * c_tilde).sum(-1) / math.sqrt(qg.shape[-1])
        alpha = torch.softmax((s.float() / tau).masked_fill(~cover, float("-inf")), dim=1)
        pair = (alpha.to(c_tilde.dtype).unsqueeze(-1) * c_tilde).sum(1)
        return alpha, pair

    def _dense(self, h, codes, plan: RoutingPlan, tau):
        b, t, c = h.shape
        n, l_, cc = codes.shape[1:]
        m, ov = plan.m, plan.ov
        normed = self.norm2(h)
        y = self.attn2(normed[:, None].expand(b, n, t, c).reshape(b * n, t, c),
                       encoder_hidden_states=codes.reshape(b * n, l_, cc)).view(b, n, t, -1)
        cover = m | ~m.any(1, keepdim=True)  # uncovered tokens: any finite value, masked below
        alpha, pair = self._gate(h, codes, cover, tau)
        weights = m.to(alpha.dtype) * torch.where(ov[:, None], alpha, torch.ones_like(alpha))
        out = (weights.to(y.dtype).unsqueeze(-1) * y).sum(1)
        keys = ov | ~ov.any(1, keepdim=True)
        x_pair = attend(self.attn2, normed, pair, keys)
        back = attend(self.back_attn, self.back_norm(x_pair), h)
        out = out + ov.unsqueeze(-1).to(back.dtype) * back
        return out.to(h.dtype), weights

    def _sparse(self, h, codes, plan: RoutingPlan, tau, record: bool = False):
        b, t, c = h.shape
        n, l_, cc = codes.shape[1:]
        h_flat = h.reshape(b * t, c)
        out = torch.zeros_like(h_flat)
        weights_map = h.new_zeros(b, n, t, dtype=torch.float32) if record else None
        if plan.e_tok.numel() == 0:
            return out.view(b, t, c), weights_map
        e_w = None
        if plan.o_tok.numel():
            h_ov = h_flat[plan.o_tok]
            alpha, pair = self._gate(_pack(h_ov, plan.o_b, plan.o_pos, b, plan.o_rows), codes, plan.o_cover, tau)
            q_ov = _pack(self.norm2(h_ov), plan.o_b, plan.o_pos, b, plan.o_rows)
            x_pair = attend(self.attn2, q_ov, pair, plan.o_keys)
            back = attend(self.back_attn, self.back_norm(x_pair), h)
            out = out.index_add(0, plan.o_tok, back[plan.o_b, plan.o_pos].to(out.dtype))
            e_b = torch.div(plan.e_g, n, rounding_mode="floor")
            e_alpha = alpha[e_b, plan.e_g - e_b * n, plan.e_ovpos.clamp(min=0)]
            e_w = torch.where(plan.e_ovpos >= 0, e_alpha, torch.ones_like(e_alpha))
        rows = _pack(self.norm2(h_flat[plan.e_tok]), plan.e_g, plan.e_pos, b * n, plan.e_rows)
        y = self.attn2(rows, encoder_hidden_states=codes.reshape(b * n, l_, cc))
        y_e = y[plan.e_g, plan.e_pos]
        if e_w is not None:
            y_e = y_e * e_w.to(y_e.dtype).unsqueeze(-1)
        out = out.index_add(0, plan.e_tok, y_e.to(out.dtype))
        if record:
            e_b = torch.div(plan.e_g, n, rounding_mode="floor")
            w_vals = e_w if e_w is not None else torch.ones_like(plan.e_tok, dtype=torch.float32)
            weights_map = weights_map.index_put((e_b, plan.e_g - e_b * n, plan.e_tok - e_b * t), w_vals.float())
        return out.view(b, t, c), weights_map


# ----------------------------------------------------------------------------------------------

def convert_to_itb(model: nn.Module, tau: float = 0.5) -> list[InteractionTransformerBlock]:
    """Replace every transformer block of every `Transformer2DModel` inside `model` by an ITB.

    Returns the ITBs in module order. State-dict keys of the adopted parts do not change, so
    pretrained UNet/ControlNet weights load before or after conversion.
    """
    blocks = []
    for mod in model.modules():
        if isinstance(mod, Transformer2DModel):
            for i, blk in enumerate(mod.transformer_blocks):
                if isinstance(blk, InteractionTransformerBlock):
                    blocks.append(blk)
                    continue
                itb = InteractionTransformerBlock(blk, tau=tau)
                mod.transformer_blocks[i] = itb
                blocks.append(itb)
    return blocks


def itb_blocks(model: nn.Module) -> list[InteractionTransformerBlock]:
    return [m for m in model.modules() if isinstance(m, InteractionTransformerBlock)]
