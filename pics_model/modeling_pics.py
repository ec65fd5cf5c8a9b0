"""PICSModel: SD-style latent diffusion + ControlNet whose transformer blocks are ITBs.

Submodules: `vae` (AutoencoderKL, frozen), `unet` (UNet2DConditionModel), `controlnet`
(ControlNetModel.from_unet, 4-channel hint), `object_encoder`, `shape_encoder` (or None), and
`noise_scheduler` (DDPMScheduler, not a module). Every `BasicTransformerBlock` of the UNet and the
ControlNet is an `InteractionTransformerBlock`; routing reaches them through diffusers'
``cross_attention_kwargs``.

Shapes: B batch, N objects, L tokens per object code, C context dim, R image resolution,
h = R / f latent side.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import PICSConfig, UNetConfig, VAEConfig
from .file_hashes import CONFIG_NAME, HASHES_NAME, WEIGHTS_NAME, mismatch, save_model_folder
from .interaction_block import ROUTING_KEY, InteractionTransformerBlock, RoutingContext, convert_to_itb, itb_blocks
from .gate_loss import occlusion_order_loss
from .data import collage_start
from .object_encoder import ObjectEncoder
from .pixel_autoencoder import PixelShuffleAutoencoder
from .shape_encoder import ShapeEncoder

log = logging.getLogger(__name__)

TRAINABLE_SPECS = ("reference", "full", "itb")


def _rand(shape, generator: torch.Generator | None, device, dtype=torch.float32, normal: bool = False):
    """torch.rand/randn honouring a generator that may live on another device."""
    gdev = generator.device if generator is not None else torch.device(device)
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


class WeightsError(ValueError):
    """A saved model folder whose files cannot be trusted: no recorded hashes, or bytes that
    differ from them (truncated, partly copied, corrupted)."""


def make_ddpm_scheduler(cfg: dict) -> DDPMScheduler:
    """DDPMScheduler from our scheduler config; DDIM-only keys (set_alpha_to_one) stay in the
    config for the pipeline's samplers."""
    accepted = inspect.signature(DDPMScheduler.__init__).parameters
    return DDPMScheduler(**{k: v for k, v in cfg.items() if k in accepted})


def build_vae(cfg: VAEConfig) -> nn.Module:
    """The configured latent autoencoder: an AutoencoderKL, or the exact space-to-depth map."""
    if cfg.kind == "pixel_shuffle":
        return PixelShuffleAutoencoder(cfg.in_channels, cfg.factor, cfg.scaling_factor)
    return AutoencoderKL(**cfg.to_diffusers())


class PICSModel(nn.Module):
    def __init__(self, config: PICSConfig, load_pretrained: bool = True):
        """Build from `config`. With ``load_pretrained`` the local SD folder / DINOv2 / MobileNetV2
        weights named by the config are read; `from_pretrained` passes False and loads everything
        from its own safetensors file instead."""
        super().__init__()
        config = config.model_copy(deep=True)
        sd_path = config.stable_diffusion_path if load_pretrained else None
        if sd_path:
            self.vae, self.unet, scheduler_cfg = self._load_stable_diffusion(sd_path, config)
        else:
            self.vae = build_vae(config.vae)
            self.unet = UNet2DConditionModel(**config.unet.to_diffusers())
            scheduler_cfg = config.scheduler.model_dump()
        self.config = config
        self.controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_channels=config.controlnet.conditioning_channels,
            conditioning_embedding_out_channels=tuple(config.controlnet.conditioning_embedding_out_channels))
        if config.itb.enabled:
            convert_to_itb(self.unet, tau=config.itb.tau)
            convert_to_itb(self.controlnet, tau=config.itb.tau)
        ctx_dim = config.unet.cross_attention_dim
        self.object_encoder = ObjectEncoder(config.object_encoder, ctx_dim, load_weights=load_pretrained)
        self.shape_encoder = ShapeEncoder(self.object_encoder.backbone_dim, ctx_dim, config.shape_encoder.hidden_dim) \
            if config.shape_encoder.enabled else None
        self.noise_scheduler = make_ddpm_scheduler(scheduler_cfg)
        self.vae.requires_grad_(False)

    @staticmethod
    def _load_stable_diffusion(path: str, config: PICSConfig):
        """unet/ vae/ scheduler/ from a local diffusers-format folder; the config adopts their layout."""
        root = Path(path)
        for sub in ("unet", "vae"):
            if not (root / sub / "config.json").is_file():
                raise FileNotFoundError(f"{root}: not a diffusers Stable Diffusion folder (missing {sub}/config.json)")
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
        config.unet = UNetConfig.from_diffusers(dict(unet.config))
        config.vae = VAEConfig.from_diffusers(dict(vae.config))
        sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True) \
            if (root / "scheduler").is_dir() else None
        scheduler_cfg = config.scheduler.model_dump()
        if sched is not None:
            scheduler_cfg.update({k: v for k, v in dict(sched.config).items() if k in scheduler_cfg})
            config.scheduler = type(config.scheduler)(**scheduler_cfg)
        return vae, unet, scheduler_cfg

    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def itb_blocks(self) -> list[InteractionTransformerBlock]:
        return itb_blocks(self.unet) + itb_blocks(self.controlnet)

    def set_tau(self, tau: float) -> None:
        self.config.itb.tau = tau
        for blk in self.itb_blocks():
            blk.tau = float(tau)

    def set_expert_mode(self, mode: str) -> None:
        self.config.itb.expert_mode = mode  # validated by the config

    def set_prediction_type(self, prediction_type: str) -> None:
        """What the network predicts ('epsilon' | 'v_prediction'): the config (saved with the
        weights, read by the samplers) and the training noise scheduler follow."""
        if self.config.collage_residual and prediction_type != "sample":
            raise ValueError(f"prediction_type {prediction_type!r}: a model with collage_residual predicts x0 "
                             "('sample') only")
        self.config.scheduler.prediction_type = prediction_type  # validated by the config
        self.noise_scheduler = make_ddpm_scheduler(self.config.scheduler.model_dump())

    # ------------------------------------------------------------------------------------------
    def encode_objects(self, objects: torch.Tensor, priors: torch.Tensor | None = None,
                       prior_valid: torch.Tensor | None = None) -> torch.Tensor:
        """objects [B,N,3,P,P] in [0,1]; priors [B,N,K,3,P,P] in [0,1] or None; prior_valid [B,N]
        -> codes [B,N,L,C]. The shape descriptor is added to every token of the object's code."""
        if objects.ndim != 5:
            raise ValueError(f"encode_objects: objects must be [B,N,3,P,P], got {tuple(objects.shape)}")
        b, n = objects.shape[:2]
        if n > self.config.itb.max_objects:
            raise ValueError(f"encode_objects: {n} objects > itb.max_objects={self.config.itb.max_objects}")
        tokens = self.object_encoder(objects.flatten(0, 1).to(self.dtype))
        codes = tokens.view(b, n, *tokens.shape[1:])
        if self.shape_encoder is not None and priors is not None:
            if priors.ndim != 6 or priors.shape[:2] != (b, n):
                raise ValueError(f"encode_objects: priors must be [B,N,K,3,P,P], got {tuple(priors.shape)}")
            k = priors.shape[2]
            views = priors.flatten(0, 2).to(self.dtype)
            vs = self.config.shape_encoder.view_size
            if vs and views.shape[-1] != vs:
                views = F.interpolate(views, size=(vs, vs), mode="bilinear", antialias=True, align_corners=False)
            feats = self.object_encoder.pooled(views, resize=vs is None).view(b, n, k, -1)
            codes = codes + self.shape_encoder(feats, prior_valid).unsqueeze(2).to(codes.dtype)
        return codes

    def routing(self, codes, routing_masks, object_valid=None, alpha_sink=None, mode=None,
                score_sink=None) -> RoutingContext:
        """The routing context of one forward, by this model's config (mode, mask rule, threshold)."""
        itb = self.config.itb
        return RoutingContext(codes, routing_masks, object_valid, mode=mode or itb.expert_mode,
                              threshold=itb.mask_threshold, alpha_sink=alpha_sink, mask_rule=itb.mask_rule,
                              score_sink=score_sink)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, hint: torch.Tensor,
                codes: torch.Tensor, routing_masks: torch.Tensor, object_valid: torch.Tensor | None = None,
                alpha_sink: list | None = None, expert_mode: str | None = None,
                conditioning_scale: float | None = None) -> torch.Tensor:
        """noisy_latents [B,4,h,h], timesteps [B] (or scalar), hint [B,4,R,R], codes [B,N,L,C],
        routing_masks [B,N,R,R] 0/1, object_valid [B,N] bool -> prediction [B,4,h,h]
        (epsilon or v, as trained)."""
        ctx = self.routing(codes, routing_masks, object_valid, alpha_sink, expert_mode)
        return self.denoise(noisy_latents, timesteps, hint, ctx, conditioning_scale)

    def token_counts(self, latent_hw: tuple[int, int]) -> list[int]:
        """Token counts of the transformer blocks' grids (one per UNet level)."""
        h, w = latent_hw
        return [(h >> i) * (w >> i) for i in range(len(self.config.unet.block_out_channels))]

    def denoise(self, noisy_latents, timesteps, hint, ctx: RoutingContext, conditioning_scale=None):
        """The UNet + ControlNet pass for a prepared routing context."""
        codes = ctx.codes
        ehs = codes.flatten(1, 2)  # only read by vanilla blocks (itb.enabled False): all objects' tokens
        kw = None
        if self.config.itb.enabled:
            # build every level's routing plan (host syncs) before the networks run, so a compiled
            # UNet/ControlNet sees ready index tensors
            ctx.precompute(self.token_counts(tuple(noisy_latents.shape[-2:])))
            kw = {ROUTING_KEY: ctx}
        scale = self.config.controlnet.conditioning_scale if conditioning_scale is None else conditioning_scale
        if self.config.hint_concat:
            folded = F.pixel_unshuffle(hint.to(noisy_latents.dtype), self.config.vae.downsample_factor)
            noisy_latents = torch.cat([noisy_latents, folded], 1)
        down, mid = self.controlnet(noisy_latents, timesteps, encoder_hidden_states=ehs,
                                    controlnet_cond=hint.to(noisy_latents.dtype), conditioning_scale=scale,
                                    cross_attention_kwargs=kw, return_dict=False)
        out = self.unet(noisy_latents, timesteps, encoder_hidden_states=ehs,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        cross_attention_kwargs=kw, return_dict=False)[0]
        if self.config.collage_residual:
            out = out + self.hint_latents(hint).to(out.dtype)
        return out

    def hint_latents(self, hint: torch.Tensor) -> torch.Tensor:
        """collage hint [B,5,R,R] -> the residual's starting point (`data.collage_start`: the background
        outside the boxes, the collage, the boxes' uncovered pixels filled from their surroundings)
        as scaled latents [B,lc,h,h] (the encoder's mean), so the network starts from the background
        there rather than from grey."""
        start = collage_start(hint).to(self.vae.dtype)
        return self.vae.encode(start).latent_dist.mean * self.config.vae.scaling_factor

    # ------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch: int, generator=None, device=None) -> torch.Tensor:
        """Design notes' schedule: with p = high_t_prob t ~ U[0, T), else t ~ U[0, low_t_max)."""
        o, total = self.config.objective, self.config.scheduler.num_train_timesteps
        device = device or self.device
        u = _rand((batch,), generator, device)
        hi = _rand((batch,), generator, device) < o.high_t_prob
        upper = torch.where(hi, torch.full_like(u, total), torch.full_like(u, min(o.low_t_max, total)))
        return (u * upper).long().clamp_(max=total - 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """images [B,3,R,R] in [-1,1] -> scaled latents [B,4,h,h] (a sample of the posterior)."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        noise = _rand(dist.mean.shape, generator, dist.mean.device, dist.mean.dtype, normal=True)
        return (dist.mean + dist.std * noise) * self.config.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """scaled latents -> images [B,3,R,R] in [-1,1] (unclamped: as decoded, inf included)."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.config.vae.scaling_factor).sample
        return images.clamp(-1, 1) if clamp else images

    def training_loss(self, batch: dict, generator: torch.Generator | None = None,
                      prediction_type: str | None = None, mask_weight: float = 0.0,
                      cond_drop_prob: float | None = None, gate_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
        """One denoising loss on a `collate` batch (target, hint, objects, routing_masks,
        object_valid, optional priors/prior_valid). prediction_type: 'epsilon' | 'v_prediction' | 'sample'
        (default: the scheduler config's). mask_weight w: per-latent-pixel weight 1 + w inside the
        union of boxes (0: the reference's plain MSE). cond_drop_prob: objects -> zero image, the
        unconditional input used by guidance (default: config.objective). gate_weight: weight of the
        occlusion-order loss on the alpha gate (pics_model/gate_loss.py; needs the batch's "visible"
        masks; 0: the reference's objective)."""
        dev = self.device
        pt = prediction_type or self.config.scheduler.prediction_type
        if pt not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"training_loss: prediction_type must be 'epsilon', 'v_prediction' or 'sample', "
                             f"got {pt!r}")
        if self.config.collage_residual and pt != "sample":
            raise ValueError(f"training_loss: prediction_type {pt!r}, but collage_residual predicts x0 ('sample')")
        target_img = batch["target"].to(dev)
        b = target_img.shape[0]
        latents = self.encode_images(target_img, generator).to(self.dtype)
        noise = _rand(latents.shape, generator, dev, latents.dtype, normal=True)
        t = self.sample_timesteps(b, generator, dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        objects = batch["objects"].to(dev)
        priors = batch.get("priors")
        prior_valid = batch.get("prior_valid")
        p_drop = self.config.objective.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
        keep = _rand((b,), generator, dev) >= p_drop
        objects = objects * keep.view(b, 1, 1, 1, 1).to(objects.dtype)
        if priors is not None:
            priors = priors.to(dev) * keep.view(b, 1, 1, 1, 1, 1).to(priors.dtype)
            pv = prior_valid.to(dev) if prior_valid is not None else torch.ones(priors.shape[:2], dtype=torch.bool,
                                                                                  device=dev)
            prior_valid = pv & keep[:, None]
        codes = self.encode_objects(objects, priors, prior_valid)
        masks = batch["routing_masks"].to(dev)
        valid = batch.get("object_valid")
        valid = valid.to(dev) if valid is not None else None
        gate_scores = [] if gate_weight > 0 and "visible" in batch and self.config.itb.enabled else None
        ctx = self.routing(codes, masks, valid, score_sink=gate_scores)
        pred = self.denoise(noisy, t, batch["hint"].to(dev), ctx)
        tgt = {"epsilon": noise, "sample": latents}.get(pt)
        if tgt is None:
            tgt = self.noise_scheduler.get_velocity(latents, noise, t)
        se = (pred.float() - tgt.float()).pow(2).mean(1)  # [B,h,h]
        m = masks if valid is None else masks * valid[:, :, None, None].to(masks.dtype)
        union = F.interpolate(m.float().amax(1, keepdim=True), size=se.shape[-2:], mode="area")[:, 0]
        w = 1.0 + mask_weight * union
        loss = (se * w).sum() / w.sum()
        gate_loss = None
        if gate_scores is not None:
            gate_loss = occlusion_order_loss(gate_scores, batch["visible"], self.config.itb.tau, rows=keep)
            if torch.is_grad_enabled() and gate_scores and not any(s.requires_grad for _, s, _ in gate_scores):
                raise RuntimeError("training_loss: gate_weight > 0 but the gate scores carry no gradient "
                                   "(reentrant gradient checkpointing drops them); set the gate weight to 0")
            loss = loss + gate_weight * gate_loss
        with torch.no_grad():
            cover = (F.interpolate(m.float(), size=se.shape[-2:], mode="area") >= 0.5).sum(1)
            inside = union > 0.5
            stats = {
                "loss": float(loss.detach()),
                "mse": float(se.mean()),
                "mse_union": float(se[inside].mean()) if inside.any() else float("nan"),
                "mse_background": float(se[~inside].mean()) if (~inside).any() else float("nan"),
                "t_mean": float(t.float().mean()),
                "overlap_frac": float((cover >= 2).float().mean()),
                "cond_dropped": int((~keep).sum()),
            }
            if gate_loss is not None:
                stats["gate_loss"] = float(gate_loss)
        return loss, stats

    # ------------------------------------------------------------------------------------------
    def set_trainable(self, spec: str = "reference") -> list[nn.Parameter]:
        """Freeze everything, then unfreeze by spec; returns the trainable parameters.

        reference: ControlNet (with its ITBs), UNet decoder (up blocks, out norm/conv), the new
                   parameters of *every* ITB (UNet encoder/mid included, unlike the reference,
                   whose encoder ITBs kept random weights), projector, shape encoder.
        full:      UNet + ControlNet + projector + shape encoder.
        itb:       only the new ITB parameters + projector + shape encoder.
        The object encoder's appearance embedding (if any) trains with the projector.
        The VAE and a pretrained object backbone stay frozen ('small' backbones train).
        """
        if spec not in TRAINABLE_SPECS:
            raise ValueError(f"set_trainable: unknown spec {spec!r}; choose one of {TRAINABLE_SPECS}")
        self.requires_grad_(False)
        groups: list[nn.Module] = [self.object_encoder.projector]
        if self.object_encoder.appearance is not None:
            groups.append(self.object_encoder.appearance)
            self.object_encoder.appearance_pos.requires_grad_(True)
        if self.object_encoder.trains_backbone:
            groups.append(self.object_encoder.backbone)
        if self.shape_encoder is not None:
            groups.append(self.shape_encoder)
        if spec == "reference":
            groups += [self.controlnet, self.unet.up_blocks, self.unet.conv_norm_out, self.unet.conv_out]
        elif spec == "full":
            groups += [self.controlnet, self.unet]
        for g in groups:
            g.requires_grad_(True)
        for blk in self.itb_blocks():
            for p in blk.new_parameters():
                p.requires_grad_(True)
        seen, params = set(), []
        for p in self.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def compile_denoiser(self, backend: str = "inductor", mode: str | None = None, recompile_limit: int = 32) -> None:
        """torch.compile the UNet and the ControlNet in place (dynamic=None: shapes start static;
        the routing index sizes, which change every batch, turn symbolic after their first
        change - plans carry tile heights as tensor sizes for that). The UNet and ControlNet share
        diffusers' decorated forward code object, hence the higher recompile limit. dynamic=True
        on the whole UNet hit an inductor sympy error (torch 2.13, CPU)."""
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, recompile_limit)
        self.unet.compile(backend=backend, mode=mode)
        self.controlnet.compile(backend=backend, mode=mode)

    @torch.no_grad()
    def calibrate_vae_scaling(self, images: torch.Tensor) -> float:
        """Set the latent scaling factor to 1/std of the VAE posterior means of `images` [B,3,R,R]
        in [-1,1] (how SD's 0.18215 was chosen); for a freshly fitted tiny VAE."""
        mean = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.mean
        factor = float(1.0 / mean.float().std().clamp_min(1e-6))
        self.config.vae.scaling_factor = factor
        self.vae.register_to_config(scaling_factor=factor)
        return factor

    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors (every tensor of the model, frozen parts included), then
        sha256.json with both files' size and SHA-256, which `from_pretrained` checks."""
        return save_model_folder(directory, self, self.config.to_json(), {"pics_model": "1"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        verify: bool = True) -> "PICSModel":
        """The model saved in ``directory`` by `save_pretrained`. Its files are first checked
        against sha256.json (`verify_saved`); ``verify=False`` skips that, only to re-save a
        folder of an older version that you trust (it has no sha256.json)."""
        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d}: not a saved PICSModel (missing {name})")
        if verify:
            verify_saved(d)
        model = cls(PICSConfig.load(d / CONFIG_NAME), load_pretrained=False)
        try:
            state = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
        except SafetensorError as e:
            raise WeightsError(f"{d / WEIGHTS_NAME}: not a readable safetensors file ({e}); {_REFETCH}") from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{d / WEIGHTS_NAME}: weights do not match {d / CONFIG_NAME}: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")
        return model.to(map_location)

    # ------------------------------------------------------------------------------------------
    def flops_per_sample(self, resolution: int | None = None, training: bool = True, num_objects: int = 2,
                         overlap: float = 0.46, expert_mode: str | None = None, with_priors: bool = False,
                         device: str = "meta") -> dict:
        """See `flops_per_sample` (module level); ``device="cpu"`` counts on a real copy of this model."""
        return flops_per_sample(self.config, resolution, training, num_objects, overlap, expert_mode, with_priors,
                                device, model=self)


_REFETCH = "copy or download the model folder again, or re-run the stage that wrote it (e.g. `pics train`)"


def verify_saved(directory: str | Path) -> None:
    """Raise `WeightsError` naming the file and the fix unless config.json and model.safetensors
    of ``directory`` have the size and SHA-256 that sha256.json recorded when they were saved.
    A folder without sha256.json (saved before hashes were recorded) is refused too: nothing
    would tell a flipped byte in it from a trained weight."""
    d = Path(directory)
    try:
        records = json.loads((d / HASHES_NAME).read_text())
    except FileNotFoundError:
        raise WeightsError(
            f"{d / HASHES_NAME}: missing, so the weights cannot be verified (the folder was saved by an older "
            f"version, or not by PICSModel.save_pretrained); {_REFETCH}; or, if you trust these files, record "
            f"their hashes: PICSModel.from_pretrained('{d}', verify=False).save_pretrained('{d}')") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{d / HASHES_NAME}: unreadable ({e}); {_REFETCH}") from None
    if not isinstance(records, dict) or not {CONFIG_NAME, WEIGHTS_NAME} <= set(records):
        raise WeightsError(f"{d / HASHES_NAME}: does not list {CONFIG_NAME} and {WEIGHTS_NAME}; {_REFETCH}")
    problem = mismatch(d, {n: records[n] for n in (CONFIG_NAME, WEIGHTS_NAME)}, HASHES_NAME)
    if problem is not None:
        raise WeightsError(f"{problem}; {_REFETCH}")


def flops_per_sample(config: PICSConfig, resolution: int | None = None, training: bool = True,
                     num_objects: int = 2, overlap: float = 0.46, expert_mode: str | None = None,
                     with_priors: bool = False, device: str = "meta", model: PICSModel | None = None) -> dict:
    """FLOPs for one sample, counted by `torch.utils.flop_counter.FlopCounterMode` (2 per MAC):
    UNet + ControlNet forward (+ backward over the `reference` trainable set when `training`),
    VAE encode and object encoding forward. On the default meta device nothing is allocated or
    computed (slow-ish Python dispatch, fine for the SD presets); ``device="cpu"`` counts on a
    real copy of `model` (quicker for the tiny preset).

    Layout: `num_objects` equal square boxes in a row, neighbours sharing `overlap` of a box
    width (default 0.46 -> ~11% of the image in overlaps with 2 objects, as in the issue's
    profile), so the sparse count reflects that overlap fraction.
    Returns {"object_encoder", "vae_encode", "denoiser", "total"}.
    """
    import copy

    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from .data import rasterize_boxes

    cfg = config.model_copy(deep=True)
    r = resolution or cfg.resolution
    cfg.resolution = r
    mode = expert_mode or cfg.itb.expert_mode
    cfg.itb.expert_mode = mode
    if device == "meta" or model is None:
        device = "meta"
        with torch.device("meta"):
            net = PICSModel(cfg, load_pretrained=False)
    else:
        net = copy.deepcopy(model).to(device)
        net.config = cfg
    if training:
        net.set_trainable("reference")
    lat = r // cfg.vae.downsample_factor
    n = num_objects
    side = r / (n - (n - 1) * overlap + 0.5)
    boxes = np.array([(side * (0.25 + i * (1 - overlap)), r * 0.3, side * (1.25 + i * (1 - overlap)),
                       r * 0.3 + side) for i in range(n)], np.float32)
    masks = torch.from_numpy(rasterize_boxes(boxes, r))[None]
    s_obj = cfg.object_encoder.image_size
    out = {}
    with torch.device(device):
        objects = torch.zeros(1, n, 3, s_obj, s_obj)
        priors = torch.zeros(1, n, cfg.shape_encoder.num_views, 3, s_obj, s_obj) if with_priors else None
        with torch.no_grad():
            codes = net.encode_objects(objects)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net.encode_objects(objects, priors)
        out["object_encoder"] = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net.vae.encode(torch.zeros(1, 3, r, r))
        out["vae_encode"] = counter.get_total_flops()
    ctx = RoutingContext(codes, masks.to(codes.device) if device != "meta" else masks, mode=mode,
                         threshold=cfg.itb.mask_threshold, mask_rule=cfg.itb.mask_rule)
    ctx.precompute([(lat >> i) ** 2 for i in range(len(cfg.unet.block_out_channels))])
    ctx = ctx.to(device)
    with torch.device(device):
        noisy = torch.zeros(1, cfg.vae.latent_channels, lat, lat)
        hint = torch.zeros(1, cfg.controlnet.conditioning_channels, r, r)
        counter = FlopCounterMode(display=False)
        with counter, torch.set_grad_enabled(training):
            pred = net.denoise(noisy, torch.zeros(1, dtype=torch.long), hint, ctx)
            if training:
                pred.float().pow(2).mean().backward()
        out["denoiser"] = counter.get_total_flops()
    out["total"] = sum(out.values())
    return out
