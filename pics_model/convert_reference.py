"""Convert the reference implementation's Lightning checkpoint (ControlLDM) into a PICSModel.

Key-mapping table (reference prefix -> ours; the ldm->diffusers layout conversion itself is
diffusers' own `loaders.single_file_utils` converters, not re-implemented here):

| reference keys                      | ours                               | how                                   |
|-------------------------------------|------------------------------------|---------------------------------------|
| model.diffusion_model.*             | unet.*                             | convert_ldm_unet_checkpoint           |
| control_model.*                     | controlnet.*                       | convert_controlnet_checkpoint         |
| first_stage_model.*                 | vae.*                              | convert_ldm_vae_checkpoint            |
| cond_stage_model.model.*            | object_encoder.backbone.*          | same names (DINOv2 torch-hub layout)  |
| cond_stage_model.projector.*        | object_encoder.projector.*         | same names                            |
| ...transformer_blocks.J.norm2g.*    | ...transformer_blocks.J.gate_norm.*          | ITB rename (ITB_RENAMES)    |
| ...transformer_blocks.J.gate_q.*    | ...gate_q.*                        |                                       |
| ...transformer_blocks.J.norm_c.*    | ...gate_context_norm.*             |                                       |
| ...transformer_blocks.J.k_proj/v_proj | ...gate_k / gate_v               |                                       |
| ...transformer_blocks.J.norm2b.*    | ...back_norm.*                     |                                       |
| ...transformer_blocks.J.attn_bg.*   | ...back_attn.*                     |                                       |
| ...transformer_blocks.J.blend_mlp.* | (none)                             | unused by the reference's forward     |
| betas, alphas_cumprod, ... buffers  | (none)                             | checked against our DDPM schedule     |

Everything not consumed is listed in the report (`unmapped_source`), as is every parameter of
ours left at its initial value (`missing_target`, e.g. the shape encoder, which the reference
does not have). Semantics: the written model folder computes what the reference computed
(`REFERENCE_ITB`): the ITBs run in the ``reference`` expert mode (the overlap output is the
back-attention alone, pair keys span every token, the gate runs in bf16 on CUDA), token masks use
the reference's nearest-neighbour rule, and inference boxes are expanded as the reference's
inference scripts expand them. To fine-tune under this project's design instead, set
``itb.expert_mode``/``itb.mask_rule``/``box_expand`` back (`PICSConfig` defaults).

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors; a Lightning file that
needs arbitrary unpickling is refused (extract its ``state_dict`` in a trusted environment).

CLI: ``pics convert-reference CKPT OUT_DIR [--preset sd21] [--dinov2 PATH]`` (flows/cli.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from .config import PICSConfig
from .dinov2 import read_state_dict
from .modeling_pics import PICSModel

PREFIXES = {
    "unet": "model.diffusion_model.",
    "controlnet": "control_model.",
    "vae": "first_stage_model.",
    "object_encoder": "cond_stage_model.",
}
ITB_RENAMES = {
    "norm2g.": "gate_norm.", "gate_q.": "gate_q.", "norm_c.": "gate_context_norm.", "k_proj.": "gate_k.",
    "v_proj.": "gate_v.", "norm2b.": "back_norm.", "attn_bg.": "back_attn.",
}
UNUSED_IN_REFERENCE = ("blend_mlp.",)  # defined in the reference block, never called in its forward
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar",
}
_ITB_KEY = re.compile(r"^(.*\.transformer_blocks\.\d+\.)(.*)$")
# The reference's inference scripts (run_test.py and the others) expand the tight mask box with
# expand_bbox(ratio=[1.1, 1.2]), which draws np.random.randint(11, 12) / 10: always 1.1.
REFERENCE_BOX_EXPAND = 1.1
REFERENCE_ITB = {"expert_mode": "reference", "mask_rule": "nearest"}


def reference_config(config: PICSConfig) -> PICSConfig:
    """`config` set to compute what the reference computed (see the module docstring)."""
    data = config.model_dump()
    data["itb"].update(REFERENCE_ITB)
    data["box_expand"] = REFERENCE_BOX_EXPAND
    return PICSConfig.model_validate(data)


@dataclass
class ConversionReport:
    mapping: dict[str, str] = field(default_factory=dict)  # reference key -> our key
    unmapped_source: dict[str, str] = field(default_factory=dict)  # reference key -> reason
    missing_target: list[str] = field(default_factory=list)  # our keys not filled
    shape_mismatch: list[tuple[str, str, list[int], list[int]]] = field(default_factory=list)
    schedule_max_abs_diff: float | None = None  # |alphas_cumprod(reference) - ours|

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.unmapped_source.values():
            r = r.split(":")[0]
            reasons[r] = reasons.get(r, 0) + 1
        groups: dict[str, int] = {}
        for k in self.missing_target:
            g = k.split(".")[0]
            groups[g] = groups.get(g, 0) + 1
        return (f"mapped {len(self.mapping)} tensors; unmapped reference keys: {reasons or 0}; "
                f"our tensors left at init: {groups or 0}; shape mismatches: {len(self.shape_mismatch)}; "
                f"schedule max|d alphas_cumprod|: {self.schedule_max_abs_diff}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _rename_itb(key: str) -> str:
    m = _ITB_KEY.match(key)
    if not m:
        return key
    head, tail = m.groups()
    for old, new in ITB_RENAMES.items():
        if tail.startswith(old):
            return head + new + tail[len(old):]
    return key


def _candidates(ref: dict[str, torch.Tensor], model: PICSModel) -> dict[str, torch.Tensor]:
    """Our key -> tensor (sharing storage with the reference tensor it came from)."""
    out: dict[str, torch.Tensor] = {}
    conv = {
        "unet": lambda: convert_ldm_unet_checkpoint(ref, dict(model.unet.config)),
        "controlnet": lambda: convert_controlnet_checkpoint(ref, dict(model.controlnet.config)),
        "vae": lambda: convert_ldm_vae_checkpoint(ref, dict(model.vae.config)),
    }
    for name, fn in conv.items():
        if not any(k.startswith(PREFIXES[name]) for k in ref):
            continue
        for k, v in fn().items():
            if v is not None:
                out[f"{name}.{_rename_itb(k)}"] = v
    for k, v in ref.items():
        if k.startswith("cond_stage_model.model."):
            out["object_encoder.backbone." + k[len("cond_stage_model.model."):]] = v
        elif k.startswith("cond_stage_model.projector."):
            out["object_encoder.projector." + k[len("cond_stage_model.projector."):]] = v
    return out


def convert_reference_state_dict(ref: dict[str, torch.Tensor], model: PICSModel) -> ConversionReport:
    """Load the reference state dict into `model` (in place, non-strict) and report what mapped."""
    ref = {k: v for k, v in ref.items() if torch.is_tensor(v)}
    report = ConversionReport()
    by_ptr: dict[int, list[str]] = {}
    for k, v in ref.items():
        by_ptr.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    ours = model.state_dict()
    load: dict[str, torch.Tensor] = {}
    for key, val in _candidates(ref, model).items():
        srcs = by_ptr.get(val.untyped_storage().data_ptr(), ["?"])
        if key not in ours:
            unused = any(f".{u}" in key for u in UNUSED_IN_REFERENCE)
            for s in srcs:
                report.unmapped_source.setdefault(s, "unused in the reference forward" if unused
                                                  else f"no destination: {key}")
            continue
        if tuple(val.shape) != tuple(ours[key].shape):
            report.shape_mismatch.append((srcs[0], key, list(val.shape), list(ours[key].shape)))
            continue
        load[key] = val
        for s in srcs:
            report.mapping[s] = key
    for k in ref:
        if k in report.mapping or k in report.unmapped_source:
            continue
        if k in SCHEDULE_BUFFERS:
            report.unmapped_source[k] = "diffusion schedule buffer (checked, not loaded)"
        elif any(f".{u}" in k for u in UNUSED_IN_REFERENCE):
            report.unmapped_source[k] = "unused in the reference forward"
        elif k.startswith("model_ema."):
            report.unmapped_source[k] = "EMA copy (not used)"
        else:
            report.unmapped_source[k] = "no mapping rule"
    if "alphas_cumprod" in ref:
        a = model.noise_scheduler.alphas_cumprod.double()
        r = ref["alphas_cumprod"].double().flatten()
        report.schedule_max_abs_diff = float((a - r).abs().max()) if a.shape == r.shape else float("inf")
    with torch.no_grad():
        missing, _ = model.load_state_dict(load, strict=False)
    report.missing_target = sorted(missing)
    return report


def load_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a reference checkpoint (Lightning `state_dict` unwrapped), without unpickling objects."""
    return read_state_dict(path)


def convert(checkpoint: str | Path, out_dir: str | Path, preset: str = "sd21", dinov2: str | None = None,
            stable_diffusion: str | None = None) -> ConversionReport:
    """Convert a reference checkpoint into a model folder at ``out_dir`` (plus
    ``conversion_report.json``) that computes what the reference computed. ``dinov2`` and
    ``stable_diffusion``: local weights (otherwise the checkpoint's and the preset's)."""
    from .config import get_preset

    over: dict = {"stable_diffusion_path": stable_diffusion}
    if dinov2:
        over["object_encoder"] = {"weights_path": dinov2}
    config = reference_config(get_preset(preset, **over))
    if config.vae.kind != "kl":
        raise ValueError(f"preset {preset!r} has a {config.vae.kind} latent; a reference checkpoint "
                         "carries an AutoencoderKL: convert into a preset with a KL autoencoder (sd15, sd21)")
    model = PICSModel(config)
    report = convert_reference_state_dict(load_reference_checkpoint(checkpoint), model)
    out = model.save_pretrained(out_dir)
    (out / "conversion_report.json").write_text(report.to_json())
    return report
