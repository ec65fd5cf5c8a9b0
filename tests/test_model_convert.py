"""Converter from the reference ControlLDM state dict (synthetic, in the reference's key layout)."""
from __future__ import annotations

import pytest
import torch

from pics_model.convert_reference import convert_reference_state_dict
from pics_model.modeling_pics import PICSModel
from pics_model.testing import reference_state_dict, sd_layout_test_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
