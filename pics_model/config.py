"""Typed configuration of the PICS network and its presets.

`PICSConfig` is the one source of truth for building, saving and reloading a `PICSModel`: it is
serialised next to the weights (`config.json`) by `save_pretrained`. Sub-configs mirror the
diffusers constructors they feed (`UNetConfig.to_diffusers()` -> `UNet2DConditionModel(**...)`).

Presets (`get_preset`):
  * ``tiny``  - CPU, seconds per step: 64 px, VAE f=4 (16x16x4 latents), a 2-level UNet and its
                ControlNet (10 interaction blocks), the real ImageNet MobileNetV2 as object encoder.
  * ``sd21``  - the paper's layout: SD 2.1-base UNet/VAE (context 1024, f=8, 512 px, 23 ITBs per
                forward), DINOv2 ViT-g/14 object tokens (CLS + 256 patches, 1536-d) -> 1024.
  * ``sd15``  - the same with the SD 1.5 UNet (context 768).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VAEConfig(_Cfg):
    """The latent autoencoder. kind "kl": `diffusers.AutoencoderKL` constructor arguments,
    f = 2 ** (len(block_out_channels) - 1). kind "pixel_shuffle": the exactly invertible
    space-to-depth map (`PixelShuffleAutoencoder`), f = `factor`, latent_channels = 3 f^2; the
    AutoencoderKL fields are then unused."""

    kind: Literal["kl", "pixel_shuffle"] = "kl"
    factor: int = Field(4, ge=1)  # pixel_shuffle only
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    # SD's value; a tiny VAE fitted by the train stage should be recalibrated
    # (PICSModel.calibrate_vae_scaling) so latents have unit variance.
    scaling_factor: float = 0.18215

    @model_validator(mode="after")
    def _pixel_channels(self):
        if self.kind == "pixel_shuffle" and self.latent_channels != self.in_channels * self.factor ** 2:
            raise ValueError(f"vae.kind='pixel_shuffle': latent_channels must be in_channels * factor^2 = "
                             f"{self.in_channels * self.factor ** 2}, got {self.latent_channels}")
        return self

    @property
    def downsample_factor(self) -> int:
        if self.kind == "pixel_shuffle":
            return self.factor
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers(self) -> dict[str, Any]:
        """AutoencoderKL constructor arguments (kind "kl" only)."""
        return self.model_dump(exclude={"kind", "factor"})

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        from diffusers import AutoencoderKL
        return cls(**_adopt(cfg, cls, AutoencoderKL, "vae"))


def _adopt(cfg: Mapping[str, Any], ours: type, diffusers_cls: type, what: str) -> dict[str, Any]:
    """The fields of a diffusers config.json that `ours` models; any other field must hold the
    constructor's default, else rebuilding from our config would silently change the network."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(diffusers_cls.__init__).parameters.items()}
    norm = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    odd = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ours.model_fields
           and k in defaults and norm(v) != norm(defaults[k])}
    if odd:
        raise ValueError(f"{what} config: fields PICS cannot reproduce (non-default): {odd}")
    return {k: norm(v) for k, v in cfg.items() if k in ours.model_fields}


class UNetConfig(_Cfg):
    """`diffusers.UNet2DConditionModel` constructor arguments (the subset SD uses)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers' historical naming: this is the number of heads per level (SD 2.x: head dim 64)
    attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    use_linear_projection: bool = True
    norm_num_groups: int = 32
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    act_fn: str = "silu"

    def to_diffusers(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "UNetConfig":
        """Keep the fields we model from a diffusers unet/config.json; reject layouts we can't wrap."""
        from diffusers import UNet2DConditionModel
        return cls(**_adopt(cfg, cls, UNet2DConditionModel, "unet"))


class ControlNetConfig(_Cfg):
    conditioning_channels: int = 4  # masked background RGB + mask channel (+ coverage: collage hint)
    # one entry per VAE downsampling level (+1) so the image-resolution hint lands on the latent grid
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_scale: float = 1.0


class DinoV2Arch(_Cfg):
    """Architecture of a DINOv2 ViT (torch-hub layout); defaults are ViT-g/14."""

    embed_dim: int = 1536
    depth: int = 40
    num_heads: int = 24
    patch_size: int = 14
    mlp_ratio: float = 4.0
    ffn: Literal["mlp", "swiglu"] = "swiglu"
    num_register_tokens: int = 0
    pos_embed_size: int = 518  # pretraining resolution: 37 x 37 position grid
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False


class ObjectEncoderConfig(_Cfg):
    kind: Literal["dinov2", "mobilenetv2", "small"] = "dinov2"
    image_size: int = 224  # P': objects (and prior views) are resized to this before encoding
    weights_path: str | None = None  # DINOv2: hub .pth/.safetensors or an HF-format folder
    dinov2: DinoV2Arch = DinoV2Arch()
    small_channels: tuple[int, ...] = (32, 64, 128)  # 'small' trainable CNN
    train_backbone: bool = False  # 'small' always trains; pretrained backbones stay frozen by default
    # appearance tokens: a learned patch embedding of the object image on an appearance_grid^2 grid
    # (appearance_patch px per cell), appended to the backbone's tokens. A frozen ImageNet
    # backbone's 3 x 3 tokens keep little colour; these let the experts copy it. 0: none.
    appearance_grid: int = Field(0, ge=0)
    appearance_patch: int = Field(4, ge=1)
    # kind 'mobilenetv2': keep only its first n feature blocks (None: all 19, the 1280-d stride-32
    # map). A mid-level map (e.g. 14: 96-d at stride 16) still says where things are in the image.
    feature_blocks: int | None = Field(None, ge=1, le=19)

    @model_validator(mode="after")
    def _size(self):
        if self.kind == "mobilenetv2" and self.image_size % 32:
            raise ValueError("object_encoder.image_size must be a multiple of 32 for mobilenetv2")
        if self.feature_blocks is not None and self.kind != "mobilenetv2":
            raise ValueError("object_encoder.feature_blocks applies to kind='mobilenetv2' only")
        if self.kind == "dinov2" and self.image_size % self.dinov2.patch_size:
            raise ValueError("object_encoder.image_size must be a multiple of the DINOv2 patch size")
        return self


class ShapeEncoderConfig(_Cfg):
    enabled: bool = True  # the ablation switch (paper Table: single-view vs multi-view prior)
    num_views: int = 6  # K rendered views (traces of the reference show K = 6)
    hidden_dim: int = 256
    view_size: int | None = None  # views are encoded at this size (None: object_encoder.image_size)


class ITBConfig(_Cfg):
    # False keeps diffusers' vanilla blocks, every token cross-attending to all objects' tokens
    # (the "plain UNet + ControlNet" baseline of the benchmark, and an ablation)
    enabled: bool = True
    tau: float = Field(0.5, gt=0.0)  # alpha-blend temperature (reference: 0.5)
    # sparse/dense: this project's block (same numbers two ways); reference: the reference
    # implementation's equations (see interaction_block.py)
    expert_mode: Literal["sparse", "dense", "reference"] = "sparse"
    max_objects: int = Field(4, ge=1)
    mask_threshold: float = Field(0.5, gt=0.0, le=1.0)  # token joins a region if >= this share is covered
    # area: coverage >= mask_threshold (an object too small for a level keeps the tokens it touches);
    # nearest: the reference's nearest-neighbour resampling of the pixel masks
    mask_rule: Literal["area", "nearest"] = "area"


class SchedulerConfig(_Cfg):
    """`diffusers.DDPMScheduler` arguments (SD 2.1-base / 1.5 training schedule)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # sample: the network predicts the clean latent x0 (no noise to reproduce at low t)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    clip_sample: bool = False
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    # where a sampler's few steps sit: "leading" (SD's) never starts at t = T - 1 (with 4 steps:
    # 751, 501, 251, 1); "trailing" does (999, 749, 499, 249), as pure-noise inputs need
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"


class ObjectiveConfig(_Cfg):
    """Training objective knobs (design notes: AnyDoor's still-image timestep schedule)."""

    high_t_prob: float = Field(0.3, ge=0.0, le=1.0)  # P(t ~ U[0, T)); else t ~ U[0, low_t_max)
    low_t_max: int = 500
    cond_drop_prob: float = Field(0.1, ge=0.0, le=1.0)  # objects -> zero image, for guidance


class PICSConfig(_Cfg):
    preset: str = "custom"
    resolution: int = 512  # R: square training/inference resolution in pixels
    box_expand: float = Field(1.15, ge=1.0)  # inference box expansion: midpoint of training U[1.1, 1.2)
    # The hint (masked background + mask), folded onto the latent grid (space-to-depth by the VAE
    # factor), is also concatenated to the UNet's and ControlNet's input, as SD's inpainting UNet
    # does with its masked latent. For a denoiser trained from scratch: the ControlNet reaches the
    # UNet only through zero-initialised layers, and 600 CPU steps did not open them far enough
    # for the background to be copied; this input path works from the first step.
    hint_concat: bool = False
    # The collage hint (pics_model/data.py): each object cut to its silhouette and drawn on its
    # tight box in the hint (mean colour where several overlap, plus a coverage channel), as
    # AnyDoor's hint carries the object's detail map. A deviation from PICS for the tiny preset,
    # which has to learn appearance from ~200 pairs: the network is left with harmonisation and
    # the occlusion order. Off for the sd15/sd21 presets (the paper's 4-channel hint).
    collage_hint: bool = False
    # The x0 estimate is the hint's RGB (encoded: the background outside the boxes, the collage on
    # the objects) plus the network's output, so the network learns the corrections (the occlusion
    # order in overlaps, shading, the background left inside the boxes) instead of re-deriving every
    # pixel it was given. Needs the collage hint, x0 prediction and the exact pixel-shuffle latent
    # (encoding the hint every step is a reshape). Tiny preset only, a deviation from PICS.
    collage_residual: bool = False
    vae: VAEConfig = VAEConfig()
    unet: UNetConfig = UNetConfig()
    controlnet: ControlNetConfig = ControlNetConfig()
    object_encoder: ObjectEncoderConfig = ObjectEncoderConfig()
    shape_encoder: ShapeEncoderConfig = ShapeEncoderConfig()
    itb: ITBConfig = ITBConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    stable_diffusion_path: str | None = None  # local diffusers-format SD folder (unet/, vae/, scheduler/)

    @model_validator(mode="after")
    def _consistent(self):
        f = self.vae.downsample_factor
        if self.resolution % (f * 2 ** (len(self.unet.block_out_channels) - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by the VAE factor {f} "
                             f"times the UNet downsampling {2 ** (len(self.unet.block_out_channels) - 1)}")
        levels = f.bit_length()  # log2(f) + 1: the ControlNet hint embedding halves per extra entry
        if f != 1 << (levels - 1):
            raise ValueError(f"the VAE factor {f} must be a power of 2")
        if len(self.controlnet.conditioning_embedding_out_channels) != levels:
            raise ValueError("controlnet.conditioning_embedding_out_channels needs one entry per VAE level "
                             f"({levels}) so the hint lands on the latent grid")
        from .data import hint_channels

        if self.controlnet.conditioning_channels != hint_channels(self.collage_hint):
            raise ValueError(f"controlnet.conditioning_channels must be {hint_channels(self.collage_hint)} with "
                             f"collage_hint={self.collage_hint}, got {self.controlnet.conditioning_channels}")
        if self.collage_residual and not (self.collage_hint and self.vae.kind == "pixel_shuffle"
                                          and self.scheduler.prediction_type == "sample"):
            raise ValueError("collage_residual needs collage_hint, the pixel_shuffle latent and "
                             f"scheduler.prediction_type 'sample'; got {self.collage_hint}, {self.vae.kind!r}, "
                             f"{self.scheduler.prediction_type!r}")
        lc = self.vae.latent_channels
        need = lc + (self.controlnet.conditioning_channels * f * f if self.hint_concat else 0)
        if self.unet.in_channels != need or self.unet.out_channels != lc:
            raise ValueError(f"unet.in_channels must be {need} (vae.latent_channels"
                             f"{' + the hint folded onto the latent grid' if self.hint_concat else ''}) and "
                             f"unet.out_channels {lc}; got {self.unet.in_channels} and {self.unet.out_channels}")
        if self.unet.block_out_channels[0] < lc:
            # conv_out would read the latent off fewer features than it has channels: the
            # denoiser could never remove the noise of the rest (the composites stay noisy)
            raise ValueError(f"unet.block_out_channels[0]={self.unet.block_out_channels[0]} must be >= the "
                             f"{lc} latent channels")
        vs, oe = self.shape_encoder.view_size, self.object_encoder
        if vs and oe.kind == "dinov2" and vs % oe.dinov2.patch_size:
            raise ValueError("shape_encoder.view_size must be a multiple of the DINOv2 patch size")
        return self

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae.downsample_factor

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PICSConfig":
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | Path) -> "PICSConfig":
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a valid PICS config: {e}") from e


# ----------------------------------------------------------------------------------------------
# presets

# The tiny preset's former latent (model.latent=kl): a small AutoencoderKL, f = 4, 16 x 16 x 4
# at 64 px, fitted on the run's training images by the train stage (about 20 dB held-out).
TINY_KL_VAE = dict(kind="kl", down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64,
                   latent_channels=4, scaling_factor=1.0)

def _tiny() -> PICSConfig:
    return PICSConfig(
        preset="tiny",
        resolution=64,
        # f = 4 space-to-depth: 64 px -> 16 x 16 x 48 latents, reconstructed exactly (a fitted tiny
        # AutoencoderKL reached 20 dB without colours: the latent was the ceiling)
        vae=VAEConfig(kind="pixel_shuffle", factor=4, latent_channels=48, sample_size=64, scaling_factor=1.0),
        hint_concat=True,
        collage_hint=True,
        unet=UNetConfig(
            sample_size=16,
            in_channels=48 + 5 * 16,  # latent + the 5-channel collage hint folded by f = 4
            out_channels=48,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            # level 0 at least as wide as the 48 latent channels: at 32 the network could not pass
            # 16 of them through (rank 32) and left their noise in every composite
            block_out_channels=(48, 64),
            layers_per_block=1,
            attention_head_dim=4,  # 4 heads
            cross_attention_dim=64,
            norm_num_groups=8,
        ),
        controlnet=ControlNetConfig(conditioning_channels=5, conditioning_embedding_out_channels=(16, 32, 32)),
        object_encoder=ObjectEncoderConfig(kind="mobilenetv2", image_size=96, appearance_grid=6),
        # prior views at 32 px: the shape descriptor uses only the pooled feature
        shape_encoder=ShapeEncoderConfig(hidden_dim=64, view_size=32),
        # trained from scratch: every timestep equally often (AnyDoor's low-t bias suits a pretrained
        # SD; here the high-noise steps, where a composite's layout and colours are decided, need data)
        objective=ObjectiveConfig(high_t_prob=1.0),
        # few-step sampling from pure noise: 1 step from t = 999 left the box at half the error
        # of 4 "leading" steps (latent MSE 0.46 vs 0.84, step-600 checkpoint)
        scheduler=SchedulerConfig(timestep_spacing="trailing"),
    )


def _sd21() -> PICSConfig:
    return PICSConfig(preset="sd21", resolution=512)


def _sd15() -> PICSConfig:
    return PICSConfig(
        preset="sd15",
        resolution=512,
        unet=UNetConfig(attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False),
    )


PRESETS = {"tiny": _tiny, "sd21": _sd21, "sd15": _sd15}
_SECTIONS = ("vae", "unet", "controlnet", "object_encoder", "shape_encoder", "itb", "scheduler", "objective")


def _merge(base: dict, upd: Mapping) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def get_preset(name: str, **overrides: Any) -> PICSConfig:
    """A preset config with overrides.

    An override is a top-level field (``resolution=128``), a whole or partial section as a dict
    (``itb={"tau": 0.3}``), or a leaf name that is unique across sections (``tau=0.3``,
    ``expert_mode="dense"``, ``num_views=4``). Unknown or ambiguous names raise ``ValueError``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    data = PRESETS[name]().model_dump()
    for key, value in overrides.items():
        if key in PICSConfig.model_fields:
            data = _merge(data, {key: value}) if isinstance(value, Mapping) else {**data, key: value}
            continue
        owners = [s for s in _SECTIONS if key in data[s]]
        if len(owners) != 1:
            why = "ambiguous between " + ", ".join(owners) if owners else "unknown"
            raise ValueError(f"get_preset({name!r}): override {key!r} is {why}")
        data[owners[0]][key] = value
    return PICSConfig.model_validate(data)


def hint_layout(over: dict[str, Any], base: PICSConfig, collage: bool) -> None:
    """Set collage_hint in ``over`` with what follows from it: the ControlNet's hint channels and,
    where the hint is folded onto the UNet input, the UNet's input channels."""
    from .data import hint_channels

    ch = hint_channels(collage)
    over["collage_hint"] = collage
    over["controlnet"] = {"conditioning_channels": ch}
    if base.hint_concat:
        vae = VAEConfig(**over["vae"]) if "vae" in over else base.vae
        unet = over.setdefault("unet", {})
        unet["in_channels"] = vae.latent_channels + ch * vae.downsample_factor ** 2
