"""Helpers for tests and benchmarks: synthetic samples, a small SD-layout config, and a synthetic
reference (ControlLDM / ldm-layout) state dict.

`reference_state_dict` writes a model's weights in the reference's key layout with an explicit
diffusers->ldm table written here independently of diffusers' ldm->diffusers converters, so the
converter test checks one against the other.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .config import PICSConfig, get_preset


def synthetic_sample(rng: np.random.Generator, n: int = 2, height: int = 48, width: int = 80, patch: int = 64,
                     views: int | None = 6, view_size: int = 32, boxes: np.ndarray | None = None) -> dict:
    """A decoded-sample dict as `data.build_item` expects, with overlapping boxes by default."""
    if boxes is None:
        base = np.array([[4, 4, 44, 40], [28, 8, 76, 46], [10, 18, 34, 47], [50, 2, 79, 30]], np.float32)
        boxes = base[:n] * np.array([width / 80, height / 48, width / 80, height / 48], np.float32)
    masks = np.zeros((n, patch, patch), np.uint8)
    masks[:, patch // 8: -patch // 8, patch // 8: -patch // 8] = 255
    patches = np.full((n, patch, patch, 3), 255, np.uint8)
    patches[masks > 0] = rng.integers(0, 255, (int((masks > 0).sum()), 3), dtype=np.uint8)
    boxes = np.asarray(boxes, np.float32)
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2 / 1.15
    return {
        "image": rng.integers(0, 255, (height, width, 3), dtype=np.uint8),
        "boxes_expanded": boxes,
        "boxes_tight": np.concatenate([centre - half, centre + half], 1),  # expanded = tight x 1.15
        "patches": patches,
        "patch_masks": masks,
        "priors": None if not views else rng.integers(0, 255, (n, views, view_size, view_size, 3), dtype=np.uint8),
    }


def sd_layout_test_config(**overrides) -> PICSConfig:
    """The SD 2.1 layout (4 UNet levels, f=8 VAE, ViT object encoder) at toy widths: fast on CPU,
    same key structure as the real model, for converter and layout tests."""
    base = dict(
        resolution=64,
        vae={"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
        unet={"block_out_channels": (8, 16, 16, 16), "attention_head_dim": (2, 2, 2, 2), "cross_attention_dim": 16,
              "norm_num_groups": 4, "sample_size": 8},
        controlnet={"conditioning_embedding_out_channels": (4, 4, 8, 8)},
        object_encoder={"kind": "dinov2", "image_size": 28,
                        "dinov2": {"embed_dim": 16, "depth": 2, "num_heads": 2, "pos_embed_size": 28}},
        shape_encoder={"hidden_dim": 8},
    )
    base.update(overrides)
    return get_preset("sd21", **base)


# ----------------------------------------------------------------------------------------------
# diffusers -> ldm (reference) key layout

_RES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_ITB = [("gate_norm.", "norm2g."), ("gate_context_norm.", "norm_c."), ("gate_k.", "k_proj."),
        ("gate_v.", "v_proj."), ("back_norm.", "norm2b."), ("back_attn.", "attn_bg.")]
_VAE_RES = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _sub(rest: str, table) -> str:
    for a, b in table:
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def _attn_rest(rest: str) -> str:
    m = re.match(r"(transformer_blocks\.\d+\.)(.*)", rest)
    return m.group(1) + _sub(m.group(2), _ITB) if m else rest


def _unet_key(k: str, lpb: int, attn_levels: set[int], controlnet: bool) -> str | None:
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.1.": "middle_block.2.", "controlnet_mid_block.": "middle_block_out.0.",
             "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
             "controlnet_cond_embedding.conv_out.": "input_hint_block.14."}
    for a, b in fixed.items():
        if k.startswith(a):
            rest = k[len(a):]
            if a.startswith("mid_block.resnets"):
                rest = _sub(rest, _RES)
            elif a.startswith("mid_block.attentions"):
                rest = _attn_rest(rest)
            return b + rest
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        lv, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + lv * (lpb + 1) + j}.0.{_sub(rest, _RES)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
        lv, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + lv * (lpb + 1) + j}.1.{_attn_rest(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
        return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[2])}.0.{_sub(m[3], _RES)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
        return f"output_blocks.{int(m[1]) * (lpb + 1) + int(m[2])}.1.{_attn_rest(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
        lv = int(m[1])
        return f"output_blocks.{lv * (lpb + 1) + lpb}.{2 if lv in attn_levels else 1}.conv.{m[2]}"
    if controlnet and (m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", k)):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if controlnet and (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", k)):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    return None


def _vae_key(k: str, n_up: int) -> tuple[str, bool] | None:
    """-> (ldm key, is a mid-attention linear that the reference stores as a 1x1 conv)."""
    fixed = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for a, b in fixed.items():
        if k.startswith(a):
            return b + k[len(a):], False
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.|quant_conv\.|post_quant_conv\.", k):
        return k, False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_sub(m[3], _VAE_RES)}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_sub(m[3], _VAE_RES)}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_sub(m[3], _VAE_RES)}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k):
        rest = _sub(m[2], _VAE_ATTN)
        return f"{m[1]}.mid.attn_1.{rest}", rest.endswith("weight") and not rest.startswith("norm.")
    return None


def reference_state_dict(model, with_extras: bool = True) -> dict[str, torch.Tensor]:
    """`model`'s weights (cloned) in the reference's ControlLDM key layout, plus (with_extras) what
    a real reference checkpoint also holds: the unused `blend_mlp` of each block and the DDPM
    schedule buffers. The shape encoder has no reference counterpart and is left out."""
    out: dict[str, torch.Tensor] = {}
    lpb = model.unet.config.layers_per_block
    attn_up = {i for i, t in enumerate(model.unet.config.up_block_types) if "CrossAttn" in t}
    for prefix, mod, cn in (("model.diffusion_model.", model.unet, False), ("control_model.", model.controlnet, True)):
        for k, v in mod.state_dict().items():
            lk = _unet_key(k, lpb, attn_up, cn)
            if lk is None:
                raise KeyError(f"no ldm name for {prefix}{k}")
            out[prefix + lk] = v.clone()
    n_up = len(model.vae.config.up_block_types)
    for k, v in model.vae.state_dict().items():
        res = _vae_key(k, n_up)
        if res is None:
            raise KeyError(f"no ldm name for vae {k}")
        lk, conv = res
        out["first_stage_model." + lk] = v.clone()[:, :, None, None] if conv else v.clone()
    for k, v in model.object_encoder.backbone.state_dict().items():
        out["cond_stage_model.model." + k] = v.clone()
    for k, v in model.object_encoder.projector.state_dict().items():
        out["cond_stage_model.projector." + k] = v.clone()
    if with_extras:
        for k in [k for k in out if k.endswith("transformer_blocks.0.norm2g.weight")]:
            dim = out[k].shape[0]
            head = k[: -len("norm2g.weight")]
            hid = int(dim * 1.3)
            out[head + "blend_mlp.0.weight"] = torch.randn(hid, 2 * dim)
            out[head + "blend_mlp.0.bias"] = torch.randn(hid)
            out[head + "blend_mlp.2.weight"] = torch.randn(dim, hid)
            out[head + "blend_mlp.2.bias"] = torch.randn(dim)
        sc = model.config.scheduler
        betas = torch.linspace(sc.beta_start ** 0.5, sc.beta_end ** 0.5, sc.num_train_timesteps,
                               dtype=torch.float64) ** 2
        out["betas"] = betas.float()
        out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
        out["alphas_cumprod_prev"] = torch.cat([torch.ones(1, dtype=torch.float64),
                                                torch.cumprod(1 - betas, 0)[:-1]]).float()
    return out


def dinov2_hf_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our (torch-hub) DINOv2 keys -> transformers' Dinov2Model keys: the inverse of
    `dinov2.hf_to_hub_state_dict`, written independently so the loader test checks one against the other."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"][0:1].reshape(1, -1),
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
             "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
             "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for ours, hf in names.items():
            for k, v in sd.items():
                if k.startswith(f"blocks.{i}.{ours}"):
                    out[f"encoder.layer.{i}.{hf}{k[len(f'blocks.{i}.{ours}'):]}"] = v
        for kind in ("weight", "bias"):
            q, k_, v_ = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, 0)
            for name, t in (("query", q), ("key", k_), ("value", v_)):
                out[f"encoder.layer.{i}.attention.attention.{name}.{kind}"] = t.contiguous()
    return out


def write_dinov2_hf_folder(model, folder: str | Path) -> Path:
    """``model`` (a `dinov2.DinoV2ViT`) saved as a Hugging Face DINOv2 folder: config.json + model.safetensors."""
    from safetensors.torch import save_file

    a = model.arch
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(dinov2_hf_state_dict(sd, a.depth), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": a.embed_dim, "num_hidden_layers": a.depth, "num_attention_heads": a.num_heads,
        "patch_size": a.patch_size, "image_size": a.pos_embed_size, "mlp_ratio": a.mlp_ratio,
        "use_swiglu_ffn": a.ffn == "swiglu", "num_register_tokens": a.num_register_tokens}))
    return folder
