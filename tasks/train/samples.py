"""Sample composites during training: a few held-out scenes through PICSPipeline, as one PNG.

Each row of ``<run_dir>/samples/step-XXXXXXXX.png``: the masked background the model is given,
the object patches, the real image (target) and the composite. Rank 0 renders them with its local
(unwrapped) model, so no collective runs while the other ranks wait at their next step.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import ImageDraw

from tasks import atomic
from tasks.grid import fit_cell, grid
from tasks.params import TrainParams
from tasks.train.batches import heldout_rows


class SampleWriter:
    """Callable ``(model, step)``: renders the first ``train.sample_count`` held-out samples into ``out``."""

    def __init__(self, t: TrainParams, builder, shards_dir: Path, out: Path, cell: int = 128):
        self.samples = [builder.sample(r) for r in heldout_rows(shards_dir, t.sample_count)]
        self.t = t
        self.cell = cell
        self.out = out

    @torch.no_grad()
    def __call__(self, model, step: int) -> Path:
        from pics_model.pipeline_pics import PICSPipeline

        was_training = model.training
        model.eval()
        try:
            pipe = PICSPipeline(model, "ddim")
            rows = []
            for i, s in enumerate(self.samples):
                res = pipe(s["image"], list(s["patches"]), masks=list(s["masks"]), patch_masks=s["patch_masks"],
                           priors=s.get("priors"), num_inference_steps=self.t.sample_steps,
                           guidance_scale=self.t.sample_guidance, seed=self.t.seed + i, output_type="np")
                comp = (res.images[0] * 255 + 0.5).clip(0, 255).astype(np.uint8)
                masked = s["image"].copy()
                masked[res.union_masks[0]] = 0
                rows.append([masked, *s["patches"], s["image"], comp])
        finally:
            model.train(was_training)
        cols = max(len(r) for r in rows)
        canvas = grid([[fit_cell(img, self.cell) for img in r] for r in rows], self.cell, cols, header=14)
        ImageDraw.Draw(canvas).text((4, 1), f"step {step}: masked background | objects | real | composite",
                                    fill=(0, 0, 0))
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        return atomic.write_bytes(self.out / f"step-{step:08d}.png", buf.getvalue())
