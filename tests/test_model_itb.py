"""The Interaction Transformer Block on its own: vanilla equivalence, dense == sparse, order
invariance, alpha behaviour, background identity, gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from pics_model.interaction_block import InteractionTransformerBlock, RoutingContext, build_plan

C, CTX, HEADS, L = 32, 24, 4, 5
H = W = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _block(seed=0):
    torch.manual_seed(seed)
    return BasicTransformerBlock(C, HEADS, C // HEADS, cross_attention_dim=CTX)


def _trained_like(itb: InteractionTransformerBlock, seed=1):
    """Move the zero-initialised parameters off zero, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in itb.new_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return itb


def _layout(b=2, n=3):
    m = torch.zeros(b, n, H, W)
    m[:, 0, 0:5, 0:5] = 1
    m[:, 1, 3:8, 3:8] = 1
    if n > 2:
        m[:, 2, 2:6, 1:4] = 1
    if n > 3:
        m[:, 3, 4:8, 0:6] = 1
    return m


def _run(itb, x, codes, masks, valid=None, mode="sparse", tau=None, sink=None):
    ctx = RoutingContext(codes, masks, valid, mode=mode, tau=tau, alpha_sink=sink)
    return itb(x, cross_attention_kwargs={"pics_routing": ctx})


def test_no_routing_is_the_vanilla_block():
    vanilla = _block()
    itb = InteractionTransformerBlock(copy.deepcopy(vanilla))
    x, ctx = torch.randn(2, H * W, C), torch.randn(2, L, CTX)
    assert torch.equal(itb(x, encoder_hidden_states=ctx), vanilla(x, encoder_hidden_states=ctx))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_untrained_itb_equals_vanilla_block(mode):
    vanilla = _block()
    itb = InteractionTransformerBlock(copy.deepcopy(vanilla))
    x, code = torch.randn(2, H * W, C), torch.randn(2, 1, L, CTX)
    # one object covering every token: the ITB is the vanilla block
    out = _run(itb, x, code, torch.ones(2, 1, H, W), mode=mode)
    assert torch.allclose(out, vanilla(x, encoder_hidden_states=code[:, 0]), atol=1e-6)
    # three overlapping objects sharing one code, union = everything: untrained overlap expert is
    # the alpha-weighted vanilla cross-attention, i.e. vanilla again
    masks = torch.ones(2, 3, H, W)
    masks[:, 0, :, 5:] = 0
    masks[:, 1, :3] = 0
    out = _run(itb, x, code.expand(2, 3, L, CTX), masks, mode=mode)
    assert torch.allclose(out, vanilla(x, encoder_hidden_states=code[:, 0]), atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_dense_equals_sparse(n):
    itb = _trained_like(InteractionTransformerBlock(_block()))
    x = torch.randn(2, H * W, C, requires_grad=True)
    codes = torch.randn(2, n, L, CTX)
    masks = _layout(2, n)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, -1] = False  # a padding object in the second sample
    sinks = {"sparse": [], "dense": []}
    outs, grads = {}, {}
    for mode in ("sparse", "dense"):
        out = _run(itb, x, codes, masks, valid, mode, sink=sinks[mode])
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        outs[mode], grads[mode] = out, gx
    assert torch.allclose(outs["sparse"], outs["dense"], atol=1e-5, rtol=1e-5)
    assert torch.allclose(grads["sparse"], grads["dense"], atol=1e-4, rtol=1e-4)
    assert torch.allclose(sinks["sparse"][0][1], sinks["dense"][0][1], atol=1e-6)


def test_dense_equals_sparse_without_overlap_and_without_objects():
    itb = _trained_like(InteractionTransformerBlock(_block()))
    x, codes = torch.randn(2, H * W, C), torch.randn(2, 2, L, CTX)
    disjoint = torch.zeros(2, 2, H, W)
    disjoint[:, 0, :3] = 1
    disjoint[:, 1, 5:] = 1
    for masks in (disjoint, torch.zeros(2, 2, H, W)):
        assert torch.allclose(_run(itb, x, codes, masks, mode="sparse"), _run(itb, x, codes, masks, mode="dense"),
                              atol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_order_invariance(mode):
    itb = _trained_like(InteractionTransformerBlock(_block()))
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 3, L, CTX), _layout(2, 3)
    ref = _run(itb, x, codes, masks, mode=mode)
    for perm in ([1, 0, 2], [2, 1, 0], [1, 2, 0]):
        assert torch.allclose(_run(itb, x, codes[:, perm], masks[:, perm], mode=mode), ref, atol=1e-5)
    # and the result does depend on the objects (the test above can fail)
    assert not torch.allclose(_run(itb, x, codes.flip(0), masks, mode=mode), ref, atol=1e-3)


def test_alpha_in_unit_interval_and_sharper_as_tau_falls():
    itb = _trained_like(InteractionTransformerBlock(_block()), seed=3)
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 3, L, CTX) * 3, _layout(2, 3)
    plan = build_plan(masks, H * W)
    entropies = []
    for tau in (2.0, 0.5, 0.1, 0.02):
        sink = []
        _run(itb, x, codes, masks, tau=tau, sink=sink)
        w = sink[0][1]  # [B,N,T]
        assert w.min() >= 0 and w.max() <= 1
        ov = plan.ov
        cover = plan.m.float()
        # weights are a distribution over the covering objects at covered tokens, zero elsewhere
        assert torch.allclose(w.sum(1)[cover.sum(1) > 0], torch.ones(()), atol=1e-5)
        assert (w[cover == 0] == 0).all()
        a = w.permute(0, 2, 1)[ov]  # [overlap tokens, N]
        entropies.append(float(-(a.clamp_min(1e-12).log() * a).sum(-1).mean()))
    assert all(e1 > e2 for e1, e2 in zip(entropies, entropies[1:])), entropies
    assert entropies[-1] < 0.2 * entropies[0]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_background_tokens_untouched_by_experts(mode):
    itb = _trained_like(InteractionTransformerBlock(_block()))
    x, masks = torch.randn(2, H * W, C), _layout(2, 2)
    bg = (build_plan(masks, H * W).m.sum(1) == 0)  # [B,T]
    assert bg.any()
    h = x + itb.attn1(itb.norm1(x))
    delta = itb.experts(h, RoutingContext(torch.randn(2, 2, L, CTX), masks, mode=mode))
    assert (delta[bg] == 0).all() and (delta[~bg].abs().sum(-1) > 0).all()
    # background rows of the block output do not depend on the objects at all
    a = _run(itb, x, torch.randn(2, 2, L, CTX), masks, mode=mode)
    b = _run(itb, x, torch.randn(2, 2, L, CTX), masks, mode=mode)
    assert torch.equal(a[bg], b[bg]) and not torch.allclose(a[~bg], b[~bg])


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_every_new_parameter_gets_gradient(mode):
    itb = InteractionTransformerBlock(_block())
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 2, L, CTX), _layout(2, 2)
    opt = torch.optim.SGD(list(itb.new_parameters()), lr=0.1)
    for _ in range(2):  # after one update the zero-initialised back-attention opens the gate path
        opt.zero_grad()
        _run(itb, x, codes, masks, mode=mode).square().mean().backward()
        opt.step()
    for name, p in itb.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rejects_unsupported_blocks():
    blk = BasicTransformerBlock(C, HEADS, C // HEADS, cross_attention_dim=None)
    with pytest.raises(ValueError, match="layer_norm blocks"):
        InteractionTransformerBlock(blk)


# -- reference mode: the reference's equations (oracle: tests/reference_equations.py) ------------

REF_NAMES = {"gate_norm.": "norm2g.", "gate_context_norm.": "norm_c.", "gate_k.": "k_proj.", "gate_v.": "v_proj.",
             "back_norm.": "norm2b.", "back_attn.": "attn_bg."}
PX = 4 * H  # pixel masks at 4 px per token: box edges below fall inside cells


def _reference_weights(seed=5) -> dict[str, torch.Tensor]:
    """Random weights of one block, named as in the reference checkpoint."""
    g = torch.Generator().manual_seed(seed)
    shapes = InteractionTransformerBlock(_block()).state_dict()
    out = {}
    for k, v in shapes.items():
        for ours, ref in REF_NAMES.items():
            if k.startswith(ours):
                k = ref + k[len(ours):]
        norm_weight = "norm" in k and k.endswith("weight")
        out[k] = (1.0 if norm_weight else 0.0) + torch.randn(v.shape, generator=g) * 0.3
    return out


def _converted_block(ref_weights) -> InteractionTransformerBlock:
    """Our block with the reference weights loaded through the converter's renaming."""
    from pics_model.convert_reference import _rename_itb

    itb = InteractionTransformerBlock(_block())
    prefix = "block.transformer_blocks.0."
    state = {_rename_itb(prefix + k)[len(prefix):]: v for k, v in ref_weights.items()}
    itb.load_state_dict(state, strict=True)
    return itb


def _unaligned_masks(b=2):
    """Pixel masks [B,2,PX,PX] of two overlapping boxes whose edges are not on the token grid;
    the second sample's layout differs from the first's (per-sample routing)."""
    m = torch.zeros(b, 2, PX, PX)
    m[0, 0, 3:19, 2:21] = 1
    m[0, 1, 10:30, 13:31] = 1
    if b > 1:
        m[1, 0, 14:29, 5:27] = 1
        m[1, 1, 1:18, 9:23] = 1
    return m


def _token_classes(masks):
    from tests.reference_equations import nearest_token_masks

    tm = nearest_token_masks(masks, H, W)
    cover = tm.sum(1)
    return {"background": cover == 0, "exclusive": cover == 1, "overlap": cover == 2}


def test_reference_mode_block_equals_the_reference_equations():
    from tests.reference_equations import nearest_token_masks, reference_block

    ref_w = _reference_weights()
    itb = _converted_block(ref_w)
    torch.manual_seed(0)
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 2, L, CTX), _unaligned_masks()
    expected = reference_block(x, codes, nearest_token_masks(masks, H, W), ref_w, HEADS)
    ctx = RoutingContext(codes, masks, mode="reference", mask_rule="nearest")
    out = itb(x, cross_attention_kwargs={"pics_routing": ctx})
    classes = _token_classes(masks)
    for name, sel in classes.items():
        assert sel.any(), name
        assert torch.allclose(out[sel], expected[sel], atol=1e-4, rtol=1e-5), (name, (out - expected)[sel].abs().max())
    # and the three differences are real: our default design, or the area rule, computes otherwise
    ours = itb(x, cross_attention_kwargs={"pics_routing": RoutingContext(codes, masks, mask_rule="nearest")})
    assert (ours - expected)[classes["overlap"]].abs().max() > 1e-2
    area = itb(x, cross_attention_kwargs={"pics_routing": RoutingContext(codes, masks, mode="reference")})
    assert (area - expected).abs().max() > 1e-2


def test_reference_mode_gate_autocast_matches_the_reference_precision():
    """The reference computes its gate under bf16 autocast on CUDA; `gate_autocast=True` applies
    the same on any device (here CPU autocast, the same dtype rules for these ops)."""
    from tests.reference_equations import nearest_token_masks, reference_block

    ref_w = _reference_weights()
    itb = _converted_block(ref_w)
    torch.manual_seed(0)
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 2, L, CTX), _unaligned_masks()
    tm = nearest_token_masks(masks, H, W)
    fp32 = reference_block(x, codes, tm, ref_w, HEADS)
    bf16 = reference_block(x, codes, tm, ref_w, HEADS, gate_autocast=True)
    ctx = RoutingContext(codes, masks, mode="reference", mask_rule="nearest", gate_autocast=True)
    out = itb(x, cross_attention_kwargs={"pics_routing": ctx})
    ov = _token_classes(masks)["overlap"]
    gap_precision = (bf16 - fp32)[ov].abs().max()
    gap_ours = (out - bf16)[ov].abs().max()
    assert gap_precision > 1e-4  # reduced precision is visible on overlap tokens...
    assert gap_ours < 1e-3 * gap_precision, (gap_ours, gap_precision)  # ...and we reproduce it


def test_reference_mode_routes_each_sample_with_its_own_masks():
    ref_w = _reference_weights()
    itb = _converted_block(ref_w)
    torch.manual_seed(0)
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 2, L, CTX), _unaligned_masks()
    both = itb(x, cross_attention_kwargs={"pics_routing": RoutingContext(codes, masks, mode="reference")})
    second = itb(x[1:], cross_attention_kwargs={"pics_routing": RoutingContext(codes[1:], masks[1:], mode="reference")})
    assert torch.allclose(both[1:], second, atol=1e-5)


# -- issue 12: neutral gate, no crosstalk for N >= 3, small objects -------------------------------

def test_untrained_gate_is_a_tie_and_trains():
    itb = InteractionTransformerBlock(_block())
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 3, L, CTX) * 3, _layout(2, 3)
    sink = []
    out = _run(itb, x, codes, masks, sink=sink)
    plan = build_plan(masks, H * W)
    w = sink[0][1].permute(0, 2, 1)[plan.ov]  # [overlap tokens, N]
    cover = plan.m.permute(0, 2, 1)[plan.ov]
    assert torch.equal(w, cover.float() / cover.sum(-1, keepdim=True))  # alpha = 1/|S| exactly
    out.square().mean().backward()
    assert itb.gate_q.weight.grad.abs().sum() > 0 and itb.gate_q.bias.grad.abs().sum() > 0


def _three_objects():
    """a and b overlap in rows 0-3 / cols 3-5 without c; c overlaps a elsewhere (rows 5-7)."""
    m = torch.zeros(2, 3, H, W)
    m[:, 0, 0:8, 0:6] = 1
    m[:, 1, 0:4, 3:8] = 1
    m[:, 2, 5:8, 2:8] = 1
    return m


@pytest.mark.parametrize("mode", ["sparse", "dense", "reference"])
def test_a_third_object_does_not_change_the_pair_only_overlap(mode):
    itb = _trained_like(InteractionTransformerBlock(_block()), seed=2)
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 3, L, CTX), _three_objects()
    plan = build_plan(masks, H * W)
    ab_only = (plan.m[:, 0] & plan.m[:, 1] & ~plan.m[:, 2])  # [B,T]
    ac = plan.m[:, 0] & plan.m[:, 2]
    assert ab_only.any() and ac.any()
    ref = _run(itb, x, codes, masks, mode=mode)
    other = codes.clone()
    other[:, 2] = torch.randn(2, L, CTX) * 3
    moved = masks.clone()
    moved[:, 2] = 0
    moved[:, 2, 4:8, 0:3] = 1  # c elsewhere, still off the a-and-b-only tokens
    for codes2, masks2 in ((other, masks), (codes, moved)):
        out = _run(itb, x, codes2, masks2, mode=mode)
        assert torch.allclose(out[ab_only], ref[ab_only], atol=1e-5), (out - ref)[ab_only].abs().max()
        assert not torch.allclose(out[ac], ref[ac], atol=1e-3)  # c's own overlaps do change


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_object_too_small_for_a_coarse_level_keeps_the_tokens_it_touches(mode):
    masks = torch.zeros(1, 2, 32, 32)
    masks[0, 0, 2:20, 2:20] = 1
    masks[0, 1, 13:15, 13:15] = 1  # 2x2 px inside token (3, 3): a quarter of its 4x4 px
    m = build_plan(masks, H * W, sparse=mode == "sparse").m
    assert m[0, 1].any()
    assert m[0, 1].sum() == 1  # the single token (3, 3) it touches
    assert torch.equal(m[0, 0], (torch.nn.functional.avg_pool2d(masks[:, :1], 4) >= 0.5).flatten(1)[0])


@pytest.mark.parametrize("mode", ["sparse", "dense", "reference"])
def test_score_sink_holds_the_gate_scores_behind_alpha(mode):
    """Per block, the gate scores s_p on overlap tokens: softmax(s / tau) over the covering objects
    is the alpha the block used (for the occlusion metric)."""
    itb = _trained_like(InteractionTransformerBlock(_block()), seed=4)
    x, codes, masks = torch.randn(2, H * W, C), torch.randn(2, 3, L, CTX) * 3, _three_objects()
    alphas, scores = [], []
    ctx = RoutingContext(codes, masks, mode=mode, tau=0.7, alpha_sink=alphas, score_sink=scores)
    itb(x, cross_attention_kwargs={"pics_routing": ctx})
    (hw, s, covers), (_, w) = scores[0], alphas[0]
    plan = build_plan(masks, H * W)
    assert hw == (H, W) and torch.equal(covers, plan.m & plan.ov[:, None])
    assert (s[~covers] == 0).all() and s[covers].abs().min() > 0
    expected = torch.softmax((s / 0.7).masked_fill(~covers, float("-inf")), dim=1)
    ov = plan.ov[:, None].expand_as(w)
    assert torch.allclose(w[ov], expected[ov], atol=1e-6)
