"""Converter from the reference ControlLDM state dict (synthetic, in the reference's key layout)."""
from __future__ import annotations

import pytest
import torch

from pics_model.convert_reference import convert_reference_state_dict
from pics_model.modeling_pics import PICSModel
from pics_model.testing import reference_state_dict, sd_layout_test_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_converter_maps_every_reference_tensor():
    torch.manual_seed(0)
    src = PICSModel(sd_layout_test_config())
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # distinct values everywhere, zero-init layers included
    ref = reference_state_dict(src)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm2g.weight" in ref
    assert "control_model.input_hint_block.14.weight" in ref and "first_stage_model.encoder.mid.attn_1.q.weight" in ref
    assert ref["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # ldm stores it as a 1x1 conv
    ref["model.diffusion_model.some_new_layer.weight"] = torch.randn(3)

    torch.manual_seed(1)
    dst = PICSModel(sd_layout_test_config())
    report = convert_reference_state_dict(ref, dst)

    reasons = set(report.unmapped_source.values())
    assert reasons == {"unused in the reference forward", "diffusion schedule buffer (checked, not loaded)",
                       "no mapping rule"}
    assert [k for k, r in report.unmapped_source.items() if r == "no mapping rule"] == \
        ["model.diffusion_model.some_new_layer.weight"]
    assert all(".blend_mlp." in k for k, r in report.unmapped_source.items() if r.startswith("unused"))
    assert report.shape_mismatch == []
    assert report.missing_target and all(k.startswith("shape_encoder.") for k in report.missing_target)
    assert report.schedule_max_abs_diff < 1e-5
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn_bg.to_out.0.weight"
    assert report.mapping[key] == "unet.down_blocks.1.attentions.0.transformer_blocks.0.back_attn.to_out.0.weight"
    assert report.mapping["control_model.zero_convs.3.0.bias"] == "controlnet.controlnet_down_blocks.3.bias"
    assert report.mapping["cond_stage_model.projector.weight"] == "object_encoder.projector.weight"

    a, b = src.state_dict(), dst.state_dict()
    diff = [k for k in a if not k.startswith("shape_encoder.") and not torch.equal(a[k], b[k])]
    assert diff == []
    assert "mapped" in report.summary() and report.to_json().startswith("{")


def test_converted_model_in_reference_mode_equals_the_reference_equations():
    """A small SD-layout model converted from a reference checkpoint: every ITB of the UNet and the
    ControlNet, run in the written config (reference mode, nearest masks), equals the reference's
    equations (tests/reference_equations.py, fed the checkpoint's own tensors) on every token class,
    and so does the whole denoiser output."""
    import copy

    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from pics_model.convert_reference import reference_config
    from pics_model.interaction_block import RoutingContext
    from tests.reference_equations import ReferenceBlock, block_weights, nearest_token_masks

    torch.manual_seed(0)
    src = PICSModel(sd_layout_test_config())
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-initialised layers (back_attn out, gate_q) come alive
    ref = reference_state_dict(src)
    dst = PICSModel(reference_config(sd_layout_test_config()))
    report = convert_reference_state_dict(ref, dst)
    assert (dst.config.itb.expert_mode, dst.config.itb.mask_rule) == ("reference", "nearest")

    oracle = copy.deepcopy(dst)
    ref_key = {ours: theirs for theirs, ours in report.mapping.items()}
    for net_name in ("unet", "controlnet"):
        for name, mod in getattr(oracle, net_name).named_modules():
            if isinstance(mod, Transformer2DModel):
                for i, blk in enumerate(mod.transformer_blocks):
                    gate = ref_key[f"{net_name}.{name}.transformer_blocks.{i}.gate_q.weight"]
                    weights = block_weights(ref, gate[: -len("gate_q.weight")])
                    mod.transformer_blocks[i] = ReferenceBlock(weights, blk.attn2.heads, dst.config.itb.tau)

    def record(model):
        outs = []
        for m in model.modules():
            if isinstance(m, Transformer2DModel):
                for blk in m.transformer_blocks:
                    blk.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
        return outs

    ours_blocks, ref_blocks = record(dst), record(oracle)
    r, ctx_dim = dst.config.resolution, dst.config.unet.cross_attention_dim
    masks = torch.zeros(2, 2, r, r)  # box edges off the 8 px token grid; per-sample layouts
    masks[0, 0, 5:37, 3:41], masks[0, 1, 21:59, 27:61] = 1, 1
    masks[1, 0, 30:60, 9:50], masks[1, 1, 2:35, 18:45] = 1, 1
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(2, 2, 5, ctx_dim, generator=g)
    noisy, hint = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, r, r, generator=g)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        out = dst.denoise(noisy, t, hint, dst.routing(codes, masks))
        expected = oracle.denoise(noisy, t, hint, RoutingContext(codes, masks))
        ours_design = dst.denoise(noisy, t, hint, dst.routing(codes, masks, mode="sparse"))

    assert len(ours_blocks) == 2 * len(ref_blocks) > 0  # two runs of ours: reference mode, then sparse
    seen = set()
    for a, b in zip(ours_blocks, ref_blocks):
        side = int(a.shape[1] ** 0.5)
        cover = nearest_token_masks(masks, side, side).sum(1)
        for cls, sel in (("background", cover == 0), ("exclusive", cover == 1), ("overlap", cover == 2)):
            if sel.any():
                seen.add((side, cls))
                tol = 1e-5 + 1e-4 * b.abs().max()
                assert (a[sel] - b[sel]).abs().max() <= tol, (side, cls, (a[sel] - b[sel]).abs().max())
    assert {(8, c) for c in ("background", "exclusive", "overlap")} <= seen
    assert {(4, c) for c in ("background", "exclusive", "overlap")} <= seen
    assert (out - expected).abs().max() <= 1e-5 + 1e-4 * expected.abs().max()
    assert (ours_design - expected).abs().max() > 1e-3 * expected.abs().max()  # the mode matters here


def test_cli_writes_a_folder_that_runs_as_the_reference(tmp_path, monkeypatch):
    """`pics convert-reference CKPT OUT`: the folder's config selects the reference
    expert mode, its nearest mask rule and its inference boxes, so loading it needs no flags."""
    from pics_model import config as model_config
    from pics_model.config import get_preset
    from tasks.params import ModelParams
    from typer.testing import CliRunner

    from flows.cli import app
    from pics_model.pipeline_pics import PICSPipeline

    # a reference checkpoint carries an AutoencoderKL and no appearance tokens: the tiny preset with
    # its KL latent and without them stands in
    tiny_kl = ModelParams(latent="kl", collage_hint=False).pics_config()  # the reference's 4-channel hint
    tiny_kl = tiny_kl.model_copy(update={"object_encoder": tiny_kl.object_encoder.model_copy(update={"appearance_grid": 0})})
    monkeypatch.setitem(model_config.PRESETS, "tiny", lambda: tiny_kl)
    torch.manual_seed(0)
    src = PICSModel(get_preset("tiny"))
    torch.save({"state_dict": reference_state_dict(src)}, tmp_path / "reference.ckpt")  # Lightning layout
    r = CliRunner().invoke(app, ["convert-reference", str(tmp_path / "reference.ckpt"), str(tmp_path / "out"),
                                 "--preset", "tiny"])
    assert r.exit_code == 0, r.output
    model = PICSModel.from_pretrained(tmp_path / "out")
    cfg = model.config
    assert (cfg.itb.expert_mode, cfg.itb.mask_rule, cfg.box_expand) == ("reference", "nearest", 1.1)
    assert PICSPipeline(model).box_expand == 1.1
    assert model.routing(torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 64, 64)).mode == "reference"
    a, b = src.state_dict(), model.state_dict()
    assert [k for k in a if not k.startswith("shape_encoder.") and not torch.equal(a[k], b[k])] == []


def test_converting_into_a_model_without_a_kl_autoencoder_is_refused(tmp_path):
    from pics_model.convert_reference import convert

    torch.save({"state_dict": {}}, tmp_path / "reference.ckpt")
    with pytest.raises(ValueError, match="AutoencoderKL"):
        convert(tmp_path / "reference.ckpt", tmp_path / "out", "tiny")
