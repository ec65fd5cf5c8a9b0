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
from PIL import Image, ImageDraw

from tasks import atomic
from tasks.train.batches import rows_of_split


def _fit(img: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(img)
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (40, 40, 40))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


class SampleWriter:
    """Callable ``(model, step)``: renders the first ``sample_count`` held-out samples."""

    def __init__(self, spec, builder, heldout=None, cell: int = 128):
        rows = list(rows_of_split(spec.shards_dir, "test", spec.sample_count)) or \
            list(rows_of_split(spec.shards_dir, "train", spec.sample_count))
        self.samples = [builder.sample(r) for r in rows]
        self.spec = spec
        self.cell = cell
        self.out = Path(spec.run_dir) / "samples"

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
                           priors=s.get("priors"), num_inference_steps=self.spec.sample_steps,
                           guidance_scale=self.spec.sample_guidance, seed=self.spec.seed + i, output_type="np")
                comp = (res.images[0] * 255 + 0.5).clip(0, 255).astype(np.uint8)
                masked = s["image"].copy()
                masked[res.union_masks[0]] = 0
                rows.append([masked, *s["patches"], s["image"], comp])
        finally:
            model.train(was_training)
        cols = max(len(r) for r in rows)
        grid = Image.new("RGB", (cols * self.cell, len(rows) * self.cell + 14), (255, 255, 255))
        ImageDraw.Draw(grid).text((4, 1), f"step {step}: masked background | objects | real | composite",
                                  fill=(0, 0, 0))
        for y, r in enumerate(rows):
            for x, img in enumerate(r):
                grid.paste(_fit(img, self.cell), (x * self.cell, 14 + y * self.cell))
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        return atomic.write_bytes(self.out / f"step-{step:08d}.png", buf.getvalue())
