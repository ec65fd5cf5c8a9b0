"""PICSPipeline: background + N objects (+ masks or boxes) -> one composite, diffusers-style.

Inputs go through `data.build_item` (the training geometry: square pad, resize, hint, routing
masks), with tight boxes expanded about their centres by `box_expand` (default: the midpoint of
the training range U[1.1, 1.2)). Classifier-free guidance runs the unconditional branch (object
codes of zero images, as the reference) and the conditional branch in one batched pass per step;
routing plans are built once per composite. The decoded frame is pasted back only inside the
union of the expanded boxes.

With the collage residual (the tiny preset) the frame is R px for the whole image, five times
coarser than a 320 px scene. There the composite is taken at the source's resolution: the
residual's starting point drawn at full resolution (`data.collage_start` of the full-resolution
hint: sharp silhouettes, the filled background) plus the network's change to it, upsampled
(decoded frame minus the area-averaged start). What the network changes is kept, at R px; what
it leaves alone stays sharp (docs/fidelity_log.md, fourth round). `full_resolution=False` pastes
the upsampled frame alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from .data import (
    build_item, collage_start, collate, expand_boxes, silhouette_from_white, square_geometry, tight_box_from_mask,
)
from .modeling_pics import PICSModel

SCHEDULERS = ("ddim", "dpmsolver++")


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or inf (broken weights, e.g. a diverged training run): no image is
    made of that, where the paste-back would have turned it into a black region."""


def check_finite(values: torch.Tensor, what: str) -> None:
    bad = int((~torch.isfinite(values)).sum())  # one host sync per composite
    if bad:
        raise NonFiniteOutputError(f"PICSPipeline: {bad} of {values.numel()} values of {what} are NaN or inf; "
                                   "the model's weights are broken (re-train, or use another checkpoint)")


@dataclass
class PICSPipelineOutput:
    """images: composites at the background's size (PIL, or float [H,W,3] in [0,1] for 'np');
    generated: the decoded frames before paste-back (same type); union_masks: [H,W] bool pasted
    region; boxes: [N,4] expanded boxes used (source px); alpha_maps: per denoising step a float
    array [N,h,w] on the latent grid - each object's routing weight (1 exclusive, alpha in
    overlaps, 0 elsewhere) averaged over all ITBs, conditional branch - or None; gate_maps: per
    denoising step, per ITB call, (weights [N,g,g], routed [N,g,g] bool) of the conditional branch
    on that block's own token grid (see `block_gates`) - or None."""

    images: list
    generated: list
    union_masks: list[np.ndarray]
    boxes: list[np.ndarray]
    alpha_maps: list[np.ndarray] | None = field(default=None)
    gate_maps: list[list[tuple[np.ndarray, np.ndarray]]] | None = field(default=None)


def block_gates(sink: list, ctx, row: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The alpha sink of one forward -> per ITB call, in call order, batch row ``row``'s routing
    weights [N,g,g] (float32: 1 exclusive, alpha in overlaps, 0 elsewhere) and the block's routing
    masks [N,g,g] bool (the plan's token regions: where both objects' masks hold, the gate ran)."""
    out = []
    for (hh, ww), wts in sink:
        routed = ctx.plan(hh * ww).m[row].view(-1, hh, ww)
        out.append((wts[row].view(-1, hh, ww).cpu().numpy(), routed.cpu().numpy()))
    return out


def _square(img: np.ndarray, size: int, resample) -> np.ndarray:
    """A square patch (or mask) at ``size`` x ``size``."""
    return img if img.shape[:2] == (size, size) else np.asarray(Image.fromarray(img).resize((size, size), resample))


def make_scheduler(name: str, model: PICSModel):
    cfg = model.noise_scheduler.config
    sc = model.config.scheduler
    if name == "ddim":
        return DDIMScheduler.from_config(cfg, set_alpha_to_one=sc.set_alpha_to_one, steps_offset=sc.steps_offset,
                                         clip_sample=False)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                       steps_offset=sc.steps_offset)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")


def _rgb_uint8(img, what: str) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what}: expected an RGB image (PIL or uint8 [H,W,3]), got {img.dtype} {img.shape}")
    return img


class PICSPipeline:
    def __init__(self, model: PICSModel, scheduler_name: str = "ddim", box_expand: float | None = None,
                 full_resolution: bool = True):
        self.model = model
        self.scheduler_name = scheduler_name
        self.scheduler = make_scheduler(scheduler_name, model)
        self.box_expand = model.config.box_expand if box_expand is None else float(box_expand)
        # only a collage-residual model has a starting point to take at full resolution (module doc)
        self.full_resolution = bool(full_resolution) and model.config.collage_residual

    def prepare(self, background, objects, masks=None, boxes=None, priors: np.ndarray | None = None,
                box_expand: float | None = None, patch_masks=None) -> tuple[dict, np.ndarray, np.ndarray]:
        """The model's inputs for one composite, built by `build_item` as in training (arguments as
        `__call__`). Returns (a `collate` batch of one, the expanded boxes [N,4], the background)."""
        cfg = self.model.config
        bg = _rgb_uint8(background, "background")
        h, w = bg.shape[:2]
        patches = [_rgb_uint8(o, f"objects[{i}]") for i, o in enumerate(objects)]
        n = len(patches)
        if not 1 <= n <= cfg.itb.max_objects:
            raise ValueError(f"PICSPipeline: {n} objects; this model takes 1..{cfg.itb.max_objects}")
        if boxes is None:
            if masks is None:
                raise ValueError("PICSPipeline: give masks or boxes for the objects")
            boxes = np.stack([tight_box_from_mask(np.asarray(m) > 0) for m in masks])
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(boxes) != n:
            raise ValueError(f"PICSPipeline: {n} objects but {len(boxes)} boxes/masks")
        if patch_masks is None:
            patch_masks = [silhouette_from_white(p) for p in patches]
        if len(patch_masks) != n:
            raise ValueError(f"PICSPipeline: {n} objects but {len(patch_masks)} patch masks")
        expanded = expand_boxes(boxes, self.box_expand if box_expand is None else box_expand, w, h)
        size = max(p.shape[0] for p in patches)
        patches = np.stack([_square(p, size, Image.Resampling.BICUBIC) for p in patches])
        pmasks = []
        for i, m in enumerate(patch_masks):
            m = np.asarray(m)
            if m.ndim != 2:
                raise ValueError(f"PICSPipeline: patch_masks[{i}] must be [P,P], got shape {m.shape}")
            pmasks.append(_square(((m > 0) * 255).astype(np.uint8), size, Image.Resampling.NEAREST))
        sample = {"image": bg, "boxes_expanded": expanded, "boxes_tight": boxes, "patches": patches,
                  "patch_masks": np.stack(pmasks), "priors": None if priors is None else np.asarray(priors)}
        batch = collate([build_item(sample, cfg.resolution, None, None, object_size=cfg.object_encoder.image_size,
                                    source="PICSPipeline input", collage=cfg.collage_hint)])
        if self.full_resolution:  # the collage hint at the source's square size S (module doc)
            s = square_geometry(h, w)[0]
            batch["hint_full"] = build_item(sample, s, None, None, source="PICSPipeline input",
                                            collage=True)["hint"][None]
        return batch, expanded, bg

    @torch.no_grad()
    def __call__(self, background, objects, masks=None, boxes=None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, generator: torch.Generator | None = None, seed: int | None = None,
                 record_alpha: bool = False, priors: np.ndarray | None = None, box_expand: float | None = None,
                 output_type: str = "pil", patch_masks=None) -> PICSPipelineOutput:
        """background: PIL / uint8 [H,W,3] scene (the boxed regions are masked out here);
        objects: N patches, PIL / uint8 [P,P,3] on white (or uint8 [N,P,P,3]);
        masks: N full-image instance masks [H,W] (tight boxes are taken from them) or boxes: [N,4]
        tight xyxy boxes in background pixels; priors: optional uint8 [N,K,V,V,3] prior views;
        patch_masks: N silhouettes [P,P] of the patches (> 0 inside), for a model with the collage
        hint; default: the patches' non-white pixels (`data.silhouette_from_white`);
        generator/seed: the initial noise (drawn on CPU, so a seed gives the same noise on any device).
        """
        model, cfg = self.model, self.model.config
        batch, expanded, bg = self.prepare(background, objects, masks, boxes, priors, box_expand, patch_masks)
        h, w = bg.shape[:2]
        dev, dt = model.device, model.dtype
        objs = batch["objects"].to(dev, dt)
        pri = batch.get("priors")
        codes = model.encode_objects(objs, None if pri is None else pri.to(dev, dt),
                                     None if pri is None else batch["prior_valid"].to(dev))
        cfg_guidance = guidance_scale > 1.0
        reps = 2 if cfg_guidance else 1
        if cfg_guidance:
            codes = torch.cat([model.encode_objects(torch.zeros_like(objs)), codes])
        hint = batch["hint"].to(dev, dt).repeat(reps, 1, 1, 1)
        routing = batch["routing_masks"].to(dev, dt).repeat(reps, 1, 1, 1)
        sink: list | None = [] if record_alpha else None
        ctx = model.routing(codes, routing, batch["object_valid"].to(dev).repeat(reps, 1), sink)

        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        lat = cfg.latent_size
        latents = torch.randn((1, cfg.vae.latent_channels, lat, lat), generator=generator,
                              device=generator.device, dtype=torch.float32).to(dev, dt)
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=dev)
        latents = latents * sched.init_noise_sigma
        alphas = [] if record_alpha else None
        gates = [] if record_alpha else None
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([latents] * reps), t)
            pred = model.denoise(x_in, t.expand(reps).to(dev), hint, ctx)
            if cfg_guidance:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = sched.step(pred, t, latents).prev_sample
            if record_alpha:
                alphas.append(self._reduce_alpha(sink, reps, lat))
                gates.append(block_gates(sink, ctx, row=reps - 1))  # the conditional sample
                sink.clear()

        check_finite(latents, "the denoised latents")
        frame = model.decode_latents(latents, clamp=False)[0].float()  # clamped below, once checked
        check_finite(frame, "the decoded image")
        frame = frame.clamp(-1, 1)
        x0, y0, x1, y1 = [int(round(v)) for v in batch["crop"][0].tolist()]

        def upsample(img_r: torch.Tensor) -> torch.Tensor:  # [3,R,R] frame -> [3,H,W] image window
            return F.interpolate(img_r[None, :, y0:y1, x0:x1], size=(h, w), mode="bicubic", align_corners=False)[0]

        if self.full_resolution:
            start = collage_start(batch["hint_full"]).to(frame)[0]  # [3,S,S] in [-1,1]
            _, top, left = square_geometry(h, w)
            change = frame - F.adaptive_avg_pool2d(start[None], cfg.resolution)[0]
            frame = start[:, top:top + h, left:left + w] + upsample(change)
        else:
            frame = upsample(frame)
        gen = frame.add(1).div(2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        union = self._union_src(expanded, h, w)
        comp = np.where(union[..., None], gen, bg.astype(np.float32) / 255.0)
        if output_type == "pil":
            to_pil = lambda a: Image.fromarray((a * 255.0 + 0.5).clip(0, 255).astype(np.uint8))  # noqa: E731
            images, generated = [to_pil(comp)], [to_pil(gen)]
        elif output_type == "np":
            images, generated = [comp.astype(np.float32)], [gen.astype(np.float32)]
        else:
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        return PICSPipelineOutput(images=images, generated=generated, union_masks=[union], boxes=[expanded],
                                  alpha_maps=alphas, gate_maps=gates)

    @staticmethod
    def _union_src(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
        """Union of xyxy boxes on the H x W source grid (pixel centre inside)."""
        ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None] + 0.5
        u = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in boxes:
            u |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        return u

    @staticmethod
    def _reduce_alpha(sink: list, reps: int, lat: int) -> np.ndarray:
        """Mean over ITBs of each object's routing weight, conditional branch, on the latent grid."""
        acc = None
        for (hh, ww), wts in sink:
            cond = wts[-(wts.shape[0] // reps):][0]  # [N,T] of the conditional sample
            grid = F.interpolate(cond.view(1, -1, hh, ww), size=(lat, lat), mode="nearest")[0]
            acc = grid if acc is None else acc + grid
        return (acc / max(len(sink), 1)).cpu().numpy()
