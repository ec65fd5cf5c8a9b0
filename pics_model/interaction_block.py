"""The Interaction Transformer Block (ITB): mask-routed experts with attention-gated alpha-blending.

An ITB replaces a diffusers `BasicTransformerBlock` in place and *adopts* its modules (norm1,
attn1, norm2, attn2, norm3, ff keep their state-dict keys and pretrained weights); it adds a gate
and a back-attention. For tokens h [B,T,C], object codes c [B,N,L,Cc] and per-object token masks
m_p [B,T] (expanded boxes resized to this block's grid):

    h = h + attn1(norm1(h))                                      # self-attention (vanilla)
    S(t) = the set of objects whose mask holds token t           # its "cover set"
    background (|S| = 0):   identity
    exclusive  (|S| = 1):   y_p = attn2(norm2(h), c_p)          # one cross-attention shared by objects
    overlap    (|S| >= 2):  q_g = gate_q(gate_norm(h))           # [.., Cc]
                            c~_p = Attn(q_g, gate_k(gate_context_norm(c_p)), gate_v(c_p))
                            s_p = <q_g, c~_p> / sqrt(Cc);  alpha = softmax_tau(s_p, p in S(t))
                            pair(t) = sum_p alpha_p c~_p         # one pair context per token
                            x_pair = attn2(norm2(h), {pair(t') : t' in K(t)})   # pair attention
                            out = [sum_p alpha_p y_p] + back_attn(back_norm(x_pair), h)
    h = h + out;  h = h + ff(norm3(h))

Expert modes (`RoutingContext.mode`, config `itb.expert_mode`):
  * ``sparse`` (default) and ``dense``: this project's design, the same numbers computed two ways
    (dense runs every expert on every token and masks; sparse gathers each expert's own rows).
    The bracketed term is added, and the pair keys K(t) are the overlap tokens with the *same*
    cover set S(t), so a third object never changes tokens covered only by two others.
  * ``reference``: the reference implementation's equations, row-sparse: no bracketed term (the
    overlap output is the back-attention alone), K(t) = every token of the sample (the gate runs
    over all tokens, restricted to S(t)), and on CUDA the gate (projections and the c~ attention,
    then s and alpha) runs under bf16 autocast as the reference's does. For two objects this is
    the reference block exactly; for more it applies the same rule per cover set.

Project choices (see pics_design_notes.md; the paper is silent on these details):
  * "Untrained ITB == vanilla block": `back_attn`'s output projection starts at zero, so an
    untrained overlap expert is the alpha-weighted vanilla cross-attention sum_p alpha_p y_p. It
    equals the vanilla block exactly whenever the covering objects share a code, and for N = 1 the
    ITB is the vanilla block on covered tokens. `gate_q` starts at zero, so an untrained gate is a
    tie (alpha = 1/|S| exactly) and its gradient is nonzero from step 0 (d s_p / d q_g = c~_p).
    gate_k/gate_v start as identities (pair contexts live in code space); they and gate_norm get
    gradient from the first update on, as does everything behind the zero projection.
  * Token masks (`mask_rule`): ``area`` (default) - a token joins an object's region when at
    least `threshold` of its area is covered; an object that would cover no token at a coarse
    level keeps every token it touches instead of vanishing. ``nearest`` - the reference's rule:
    each cell takes the one pixel nearest-neighbour resampling picks (F.interpolate 'nearest').
Order invariance: every object-indexed quantity is combined by a symmetric sum/softmax.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

ROUTING_KEY = "pics_routing"  # key in diffusers' cross_attention_kwargs
EXPERT_MODES = ("sparse", "dense", "reference")
MASK_RULES = ("area", "nearest")


# ----------------------------------------------------------------------------------------------
# routing state, shared by all blocks of one forward

@dataclass
class RoutingPlan:
    """Region layout at one token resolution (h x w = T).

    Overlap tokens are packed by *group* = (sample, cover set): G groups, O overlap tokens, a
    group's tile holds at most omax rows. E = the (object, token) rows of the exclusive experts.
    """

    hw: tuple[int, int]
    m: torch.Tensor  # [B,N,T] bool: token inside object p's (expanded) box
    ov: torch.Tensor  # [B,T] bool: covered by >= 2 objects
    cover_key: torch.Tensor  # [B,T] long: the cover set as a bit mask (bit p = object p covers)
    # row-sparse gather indices (None in dense mode)
    e_g: torch.Tensor | None = None  # [E] group b*N+p
    e_pos: torch.Tensor | None = None  # [E] row within the group's packed tile
    e_tok: torch.Tensor | None = None  # [E] flat token b*T+t
    e_og: torch.Tensor | None = None  # [E] overlap group of the row's token (0 if exclusive)
    e_opos: torch.Tensor | None = None  # [E] row in that overlap tile, -1 if exclusive
    lmax: int = 0
    e_rows: torch.Tensor | None = None  # [max(lmax,1)] carries the tile height as a tensor size, so a
    # compiled graph sees it as a (dynamic) shape instead of a specialised Python int
    g_b: torch.Tensor | None = None  # [G] sample of each overlap group
    g_cover: torch.Tensor | None = None  # [G,N,1] bool: the group's cover set
    o_g: torch.Tensor | None = None  # [O] group of each overlap token
    o_pos: torch.Tensor | None = None  # [O] row in the group's tile
    o_tok: torch.Tensor | None = None  # [O] flat token b*T+t
    o_t: torch.Tensor | None = None  # [G,max(omax,1)] token index t of each tile row (0 on padding)
    o_keys: torch.Tensor | None = None  # [G,max(omax,1)] bool: real (non-padding) rows
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


def token_masks(masks: torch.Tensor, hw: tuple[int, int], rule: str = "area", threshold: float = 0.5) -> torch.Tensor:
    """masks [B,N,H,W] 0/1 -> [B,N,h*w] bool token masks by `rule` (module docstring)."""
    if rule not in MASK_RULES:
        raise ValueError(f"routing: mask rule must be one of {MASK_RULES}, got {rule!r}")
    mk = masks.float()
    if rule == "nearest":
        if tuple(mk.shape[-2:]) != tuple(hw):
            mk = F.interpolate(mk, size=hw, mode="nearest")
        return (mk > 0).flatten(2)
    if tuple(mk.shape[-2:]) != tuple(hw):
        mk = F.interpolate(mk, size=hw, mode="area")
    m = mk >= threshold - 1e-6
    touched = mk > 0
    vanished = ~m.flatten(2).any(-1) & touched.flatten(2).any(-1)  # [B,N]: too small for this level
    m = torch.where(vanished[:, :, None, None], touched, m)
    return m.flatten(2)


def build_plan(masks: torch.Tensor, num_tokens: int, threshold: float = 0.5, sparse: bool = True,
               rule: str = "area", exclusive_rows_only: bool = False) -> RoutingPlan:
    """masks [B,N,H,W] float 0/1 (invalid objects already zeroed) -> the plan at T tokens.

    exclusive_rows_only: the exclusive experts' rows skip overlap tokens (reference mode, whose
    overlap output does not use them)."""
    b, n, hm, wm = masks.shape
    h, w = token_grid(num_tokens, hm, wm)
    m = token_masks(masks, (h, w), rule, threshold)
    ov = m.sum(1) >= 2
    bits = torch.pow(2, torch.arange(n, device=masks.device))
    cover_key = (m.long() * bits[None, :, None]).sum(1)
    plan = RoutingPlan(hw=(h, w), m=m, ov=ov, cover_key=cover_key)
    if not sparse:
        return plan
    dev, t_all = masks.device, h * w
    # overlap groups: one per (sample, cover set) present
    ob, ot = ov.nonzero(as_tuple=True)
    group_ids, o_group = torch.unique(ob * (1 << n) + cover_key[ob, ot], return_inverse=True)
    n_groups = group_ids.numel()
    flags = torch.zeros(n_groups, t_all, dtype=torch.bool, device=dev)
    flags[o_group, ot] = True
    og, ot2, opos, omax = _pack_positions(flags)
    plan.g_b = torch.div(group_ids, 1 << n, rounding_mode="floor")
    plan.g_cover = ((group_ids % (1 << n))[:, None] & bits[None]).ne(0)[:, :, None]
    rows = max(omax, 1)
    plan.o_g, plan.o_pos, plan.o_tok, plan.omax = og, opos, plan.g_b[og] * t_all + ot2, omax
    plan.o_t = torch.zeros(n_groups, rows, dtype=torch.long, device=dev).index_put((og, opos), ot2)
    plan.o_keys = torch.zeros(n_groups, rows, dtype=torch.bool, device=dev).index_put(
        (og, opos), torch.ones_like(og, dtype=torch.bool))
    plan.o_rows = torch.arange(rows, device=dev)
    # exclusive-expert rows, and where each sits in an overlap tile
    og_map = torch.zeros(b, t_all, dtype=torch.long, device=dev)
    opos_map = torch.full((b, t_all), -1, dtype=torch.long, device=dev)
    og_map[plan.g_b[og], ot2] = og
    opos_map[plan.g_b[og], ot2] = opos
    rows_of = m & ~ov[:, None] if exclusive_rows_only else m
    g, t, pos, lmax = _pack_positions(rows_of.reshape(b * n, t_all))
    bb = torch.div(g, n, rounding_mode="floor")
    plan.e_g, plan.e_pos, plan.e_tok, plan.lmax = g, pos, bb * t_all + t, lmax
    plan.e_og, plan.e_opos = og_map[bb, t], opos_map[bb, t]
    plan.e_rows = torch.arange(max(lmax, 1), device=dev)
    return plan


class RoutingContext:
    """What every ITB of one UNet/ControlNet forward needs; passed as
    ``cross_attention_kwargs={"pics_routing": ctx}`` and caches one plan per token resolution.

    codes [B,N,L,Cc]; masks [B,N,H,W] 0/1; object_valid [B,N] bool (padding objects are removed
    from every region); mode: one of EXPERT_MODES; mask_rule: one of MASK_RULES.
    alpha_sink: a list that receives ``(hw, weights [B,N,T])`` per block (weights = 1 on exclusive
    tokens, alpha on overlap tokens, 0 elsewhere).
    score_sink: a list that receives ``(hw, scores [B,N,T], covers [B,N,T] bool)`` per block: the
    gate scores s_p (before the temperature) on overlap tokens, where `covers` is True (object p
    covers an overlap token); scores are 0 wherever `covers` is False. They keep their autograd
    graph (the occlusion-order loss trains through them): read them under ``torch.no_grad()``
    when only looking.
    gate_autocast: run the reference mode's gate under bf16 autocast (None: on CUDA only, as the
    reference).
    """

    def __init__(self, codes: torch.Tensor, masks: torch.Tensor, object_valid: torch.Tensor | None = None,
                 mode: str = "sparse", threshold: float = 0.5, tau: float | None = None,
                 alpha_sink: list | None = None, mask_rule: str = "area", score_sink: list | None = None,
                 gate_autocast: bool | None = None):
        if codes.ndim != 4 or masks.ndim != 4 or codes.shape[:2] != masks.shape[:2]:
            raise ValueError(f"routing: codes [B,N,L,C] {tuple(codes.shape)} and masks [B,N,H,W] "
                             f"{tuple(masks.shape)} must agree on B and N")
        if mode not in EXPERT_MODES:
            raise ValueError(f"routing: expert mode must be one of {EXPERT_MODES}, got {mode!r}")
        if mask_rule not in MASK_RULES:
            raise ValueError(f"routing: mask rule must be one of {MASK_RULES}, got {mask_rule!r}")
        if object_valid is not None:
            masks = masks * object_valid.to(masks.dtype)[:, :, None, None]
        self.codes, self.masks, self.mode, self.threshold = codes, masks, mode, threshold
        self.mask_rule, self.tau, self.alpha_sink, self.score_sink = mask_rule, tau, alpha_sink, score_sink
        self.gate_autocast = gate_autocast
        self._plans: dict[int, RoutingPlan] = {}

    def plan(self, num_tokens: int) -> RoutingPlan:
        if num_tokens not in self._plans:
            self._plans[num_tokens] = build_plan(self.masks, num_tokens, self.threshold, self.mode != "dense",
                                                 self.mask_rule, exclusive_rows_only=self.mode == "reference")
        return self._plans[num_tokens]

    def precompute(self, token_counts) -> "RoutingContext":
        for t in token_counts:
            self.plan(int(t))
        return self

    def to(self, device) -> "RoutingContext":
        """A copy on `device` with the plans built so far (e.g. indices built on CPU, run on meta)."""
        ctx = RoutingContext(self.codes.to(device), self.masks.to(device), None, self.mode, self.threshold,
                             self.tau, self.alpha_sink, self.mask_rule, self.score_sink, self.gate_autocast)
        ctx._plans = {k: v.to(device) for k, v in self._plans.items()}
        return ctx


# ----------------------------------------------------------------------------------------------

def attend(attn: Attention, queries: torch.Tensor, context: torch.Tensor,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers `Attention` math (as AttnProcessor2_0) with a boolean key mask (True = keep),
    [B,Lk] or per query [B,Lq,Lk] (a query row must keep at least one key).

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
    mask = None if key_mask is None else (key_mask[:, None, None, :] if key_mask.ndim == 2 else key_mask[:, None])
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
        nn.init.zeros_(self.gate_q.weight)  # q_g = 0: every s_p = 0, a tie among the covering objects
        nn.init.zeros_(self.gate_q.bias)
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
        plan = routing.plan(h.shape[1])
        tau = routing.tau if routing.tau is not None else self.tau
        if routing.mode == "dense":
            out, weights, scores = self._dense(h, routing.codes, plan, tau)
        else:
            out, weights, scores = self._sparse(h, routing, plan, tau)
        if routing.alpha_sink is not None:
            routing.alpha_sink.append((plan.hw, weights.detach().float()))
        if routing.score_sink is not None:
            covers = plan.m & plan.ov[:, None]
            # scores keep their graph: the occlusion-order loss (pics_model/gate_loss.py) trains through them
            routing.score_sink.append((plan.hw, scores.float().masked_fill(~covers, 0.0), covers))
        return out

    def _gate(self, h_rows: torch.Tensor, codes: torch.Tensor, cover: torch.Tensor, tau: float,
              autocast: bool = False):
        """h_rows [G,M,C] (tokens), codes [G,N,L,Cc], cover [G,N,M] or [G,N,1] bool ->
        (alpha [G,N,M], pair [G,M,Cc] in the codes' dtype, s [G,N,M]).

        autocast: the reference's precision: projections and the c~ attention under bf16
        autocast, then s, alpha and the pair context in the dtype that leaves (instead of fp32).
        """
        g, n = codes.shape[:2]
        amp = torch.autocast(h_rows.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
        with amp:
            qg = self.gate_q(self.gate_norm(h_rows))  # [G,M,Cc]
            kg = self.gate_k(self.gate_context_norm(codes))  # [G,N,L,Cc]
            vg = self.gate_v(codes)
            q = qg[:, None].expand(g, n, *qg.shape[1:])
            c_tilde = F.scaled_dot_product_attention(q, kg.to(q.dtype), vg.to(q.dtype))  # [G,N,M,Cc]
        s = (q * c_tilde).sum(-1) / math.sqrt(qg.shape[-1])
        logits = (s if autocast else s.float()) / tau
        alpha = torch.softmax(logits.masked_fill(~cover, float("-inf")), dim=1)
        mix = alpha
        if autocast:
            # the reference blends alpha c~_a + (1 - alpha) c~_b: in reduced precision the last
            # covering object's weight is 1 - (the others'), not its own rounded softmax value
            last = (cover.long() * torch.arange(n, device=cover.device)[None, :, None]).argmax(1, keepdim=True)
            is_last = torch.arange(n, device=cover.device)[None, :, None] == last
            others = alpha.masked_fill(is_last, 0)
            mix = others + is_last * (1 - others.sum(1, keepdim=True))
        pair = (mix.to(c_tilde.dtype).unsqueeze(-1) * c_tilde).sum(1)
        return alpha, pair.to(codes.dtype), s

    def _dense(self, h, codes, plan: RoutingPlan, tau):
        """Every expert on every token, then masked (default design only)."""
        b, t, c = h.shape
        n, l_, cc = codes.shape[1:]
        m, ov = plan.m, plan.ov
        normed = self.norm2(h)
        y = self.attn2(normed[:, None].expand(b, n, t, c).reshape(b * n, t, c),
                       encoder_hidden_states=codes.reshape(b * n, l_, cc)).view(b, n, t, -1)
        cover = m | ~m.any(1, keepdim=True)  # uncovered tokens: any finite value, masked below
        alpha, pair, s = self._gate(h, codes, cover, tau)
        weights = m.to(alpha.dtype) * torch.where(ov[:, None], alpha, torch.ones_like(alpha))
        out = (weights.to(y.dtype).unsqueeze(-1) * y).sum(1)
        # pair keys: overlap tokens of the query token's own cover set
        keys = ov[:, None, :] & (plan.cover_key[:, :, None] == plan.cover_key[:, None, :])  # [B,Tq,Tk]
        keys = keys | ~keys.any(-1, keepdim=True)  # non-overlap query rows: anything, output unused
        x_pair = attend(self.attn2, normed, pair, keys)
        back = attend(self.back_attn, self.back_norm(x_pair), h)
        out = out + ov.unsqueeze(-1).to(back.dtype) * back
        return out.to(h.dtype), weights, s

    def _sparse(self, h, routing: RoutingContext, plan: RoutingPlan, tau):
        """Row-sparse experts: each expert runs on its own rows only (sparse and reference modes)."""
        codes, reference = routing.codes, routing.mode == "reference"
        b, t, c = h.shape
        n, l_, cc = codes.shape[1:]
        h_flat = h.reshape(b * t, c)
        out = torch.zeros_like(h_flat)
        record = routing.alpha_sink is not None or routing.score_sink is not None
        weights = h.new_zeros(b, n, t, dtype=torch.float32) if record else None
        scores = h.new_zeros(b, n, t, dtype=torch.float32) if record else None
        if plan.e_tok.numel() == 0 and plan.o_tok.numel() == 0:
            return out.view(b, t, c), weights, scores
        alpha = None
        if plan.o_tok.numel():
            out, alpha, s = self._overlap(h, out, codes, plan, tau, reference, routing.gate_autocast)
            if record:
                o_b, o_t = plan.g_b[plan.o_g], plan.o_tok % t
                with torch.no_grad():
                    weights[o_b, :, o_t] = alpha[plan.o_g, :, plan.o_pos].float()
                scores[o_b, :, o_t] = s[plan.o_g, :, plan.o_pos].float()  # with its graph (score_sink)
        if plan.e_tok.numel():
            rows = _pack(self.norm2(h_flat[plan.e_tok]), plan.e_g, plan.e_pos, b * n, plan.e_rows)
            y = self.attn2(rows, encoder_hidden_states=codes.reshape(b * n, l_, cc))
            y_e = y[plan.e_g, plan.e_pos]
            e_b = torch.div(plan.e_g, n, rounding_mode="floor")
            e_w = torch.ones_like(plan.e_tok, dtype=torch.float32)
            if alpha is not None and not reference:
                e_alpha = alpha[plan.e_og, plan.e_g - e_b * n, plan.e_opos.clamp(min=0)]
                e_w = torch.where(plan.e_opos >= 0, e_alpha.float(), e_w)
                y_e = y_e * e_w.to(y_e.dtype).unsqueeze(-1)
            out = out.index_add(0, plan.e_tok, y_e.to(out.dtype))
            if record:  # 1 on exclusive rows; on overlap rows (default design) the alpha written above
                with torch.no_grad():
                    weights[e_b, plan.e_g - e_b * n, plan.e_tok - e_b * t] = e_w
        return out.view(b, t, c), weights, scores

    def _overlap(self, h, out, codes, plan: RoutingPlan, tau, reference: bool, gate_autocast: bool | None):
        """The overlap expert on each (sample, cover set) group's tile; adds it into out [B*T,C].

        Returns (out, alpha [G,N,omax], s [G,N,omax]) on the tile rows."""
        g = plan.g_b.numel()
        h_ov = h.reshape(-1, h.shape[-1])[plan.o_tok]
        tile = _pack(h_ov, plan.o_g, plan.o_pos, g, plan.o_rows)  # [G,omax,C]
        g_codes, g_h = codes[plan.g_b], h[plan.g_b]  # [G,N,L,Cc], [G,T,C]
        queries = _pack(self.norm2(h_ov), plan.o_g, plan.o_pos, g, plan.o_rows)
        if reference:
            # the gate over every token of the sample: every token's pair context is a key
            amp = h.is_cuda if gate_autocast is None else gate_autocast
            alpha_all, pair_all, s_all = self._gate(g_h, g_codes, plan.g_cover, tau, autocast=amp)
            x_pair = attend(self.attn2, queries, pair_all)
            rows = plan.o_t[:, None].expand(-1, alpha_all.shape[1], -1)
            alpha, s = alpha_all.gather(2, rows), s_all.gather(2, rows)
        else:
            alpha, pair, s = self._gate(tile, g_codes, plan.g_cover, tau)
            x_pair = attend(self.attn2, queries, pair, plan.o_keys)
        back = attend(self.back_attn, self.back_norm(x_pair), g_h)
        out = out.index_add(0, plan.o_tok, back[plan.o_g, plan.o_pos].to(out.dtype))
        return out, alpha, s


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
