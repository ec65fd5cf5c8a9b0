"""What the tiny preset can reach before its network runs (docs/fidelity_log.md, fourth round).

Scores, on a decompose output's test split, the overlap-region PSNR (mPSNR, docs/metrics.md) of
composites that need no trained model:

* ``ground_truth@R``: the target itself through the square R px frame and back (the pipeline's
  resize and paste-back): the ceiling of a perfect model at that resolution;
* ``copy_paste``: the evaluation's copy-paste baseline (full resolution, the sample's object order),
  and ``copy_paste_far_to_near``: the same pasted in the true depth order;
* ``start_pics``: the collage residual's starting point at R px (`data.collage_start` of
  `build_item`'s hint), i.e. what a network that outputs zero composites in one pass (with
  `evaluate.full_resolution` false: the R px frame upsampled);
* ``start_sequential``: the same zero network run as the sequential baseline, one object per call;
* ``..._full_resolution``: the same two at the source's resolution (the pipeline's default composite
  where the network changes nothing).

    python docs/collage_probe.py data/decomposed [--resolution 64]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pics_model.data import build_item, collage_start, expand_boxes, square_geometry
from tasks.evaluate import baselines, metrics
from tasks.shards import iter_samples

BOX_EXPAND = 1.15  # the evaluation's (the tiny preset's box_expand)


def through_frame(image: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [H,W,3] -> float [3,H,W]: padded to its square, resized to R and back (bicubic)."""
    h, w = image.shape[:2]
    s, top, left = square_geometry(h, w)
    canvas = np.zeros((s, s, 3), np.uint8)
    canvas[top:top + h, left:left + w] = image
    small = np.asarray(Image.fromarray(canvas).resize((resolution, resolution), Image.Resampling.BICUBIC))
    t = torch.from_numpy(small.astype(np.float32) / 255).permute(2, 0, 1)
    k = resolution / s
    y0, y1, x0, x1 = (int(round(v * k)) for v in (top, top + h, left, left + w))
    return F.interpolate(t[None, :, y0:y1, x0:x1], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


class ZeroNetwork:
    """A `PICSPipeline` stand-in whose network outputs zero: the composite is the residual's start,
    at R px upsampled, or at the source's resolution (``full_resolution``: what the pipeline's
    full-resolution composite is where the network changes nothing)."""

    def __init__(self, resolution: int, full_resolution: bool = False):
        self.resolution, self.full_resolution = resolution, full_resolution

    def __call__(self, background, objects, boxes, patch_masks, **_):
        h, w = background.shape[:2]
        expanded = expand_boxes(boxes, BOX_EXPAND, w, h)
        size = square_geometry(h, w)[0] if self.full_resolution else self.resolution
        item = build_item({"image": background, "boxes_expanded": expanded, "boxes_tight": np.asarray(boxes),
                           "patches": np.asarray(objects), "patch_masks": np.asarray(patch_masks)},
                          size, None, collage=True)
        frame = collage_start(item["hint"][None])[0].add(1).div(2).clamp(0, 1)
        x0, y0, x1, y1 = (int(round(v)) for v in item["crop"].tolist())
        frame = F.interpolate(frame[None, :, y0:y1, x0:x1], size=(h, w), mode="bicubic", align_corners=False)[0]
        union = baselines.union_mask(expanded, h, w)
        comp = np.where(union[..., None], frame.clamp(0, 1).permute(1, 2, 0).numpy(), background / 255.0)
        return type("Output", (), {"images": [Image.fromarray((comp * 255 + 0.5).astype(np.uint8))]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples")
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()
    zero, zero_full = ZeroNetwork(args.resolution), ZeroNetwork(args.resolution, full_resolution=True)
    scores: dict[str, list[float]] = {}
    for s in iter_samples(args.samples, split="test"):
        h, w = s["image"].shape[:2]
        expanded = expand_boxes(s["boxes_tight"], BOX_EXPAND, w, h)
        overlap = metrics.overlap_mask(torch.from_numpy(expanded), h, w)
        if not overlap.any():
            continue
        gt = torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255
        union = torch.from_numpy(baselines.union_mask(expanded, h, w))
        inpainted = baselines.erase_and_inpaint(s["image"], expanded)
        images = {
            f"ground_truth@{args.resolution}": torch.where(union, through_frame(s["image"], args.resolution), gt),
            "copy_paste": baselines.copy_paste(s, expanded, inpainted),
            "copy_paste_far_to_near": baselines.copy_paste(
                {**s, **{k: [s[k][i] for i in baselines.far_to_near(s)] for k in ("patches", "patch_masks",
                                                                                   "boxes_tight")}},
                expanded, inpainted),
            "start_pics": np.asarray(zero(s["image"], s["patches"], s["boxes_tight"], s["patch_masks"]).images[0]),
            "start_sequential": baselines.sequential(zero, s, expanded, steps=1, guidance=1.0, seed=0,
                                                     background=inpainted),
            "start_pics_full_resolution": np.asarray(
                zero_full(s["image"], s["patches"], s["boxes_tight"], s["patch_masks"]).images[0]),
            "start_sequential_full_resolution": baselines.sequential(zero_full, s, expanded, steps=1, guidance=1.0,
                                                                     seed=0, background=inpainted),
        }
        for name, img in images.items():
            if isinstance(img, np.ndarray):
                img = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)
            scores.setdefault(name, []).append(float(metrics.psnr(img[None], gt[None], overlap[None])))
    n = len(scores.get("copy_paste", []))
    print(f"mPSNR over {n} test samples with overlapping boxes ({args.samples}):")
    for name, v in scores.items():
        print(f"  {name:34s} {np.mean(v):6.2f} dB")
    for suffix in ("", "_full_resolution"):
        d = np.array(scores[f"start_pics{suffix}"]) - np.array(scores[f"start_sequential{suffix}"])
        print(f"  start_pics{suffix} - start_sequential{suffix}: {d.mean():+.2f} dB, better on {(d > 0).sum()}/{n}")


if __name__ == "__main__":
    main()
