"""The baselines evaluated beside PICS, on the same samples, boxes and seeds.

* ``copy_paste``: the union of the expanded boxes (the region every method must fill) is erased
  and inpainted from its surroundings (OpenCV Telea), then each object's patch is cut to its
  silhouette, scaled onto the object's tight box and pasted inside its mask, in the sample's
  object order (copy-paste knows no depth order).
* ``sequential``: the painter's algorithm with the same model: starting from that inpainted
  background, objects are inserted one at a time, far to near, each a single-object call of the
  pipeline whose output becomes the next background. Far-to-near uses ``depth_ranks`` where the
  dataset has them, else the ground-plane heuristic (a box whose bottom edge is lower is nearer).
* ``untrained``: the full PICS pipeline with the model the training run started from
  (``<train.out>/init``, exported by train), so the comparison isolates what training learned.
"""
from __future__ import annotations

import cv2
import numpy as np

from pics_model.data import silhouette_on_box

from pics_model.data import box_masks


def union_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W] bool: pixel centres inside any xyxy box (the pipeline's paste-back rule)."""
    return box_masks(boxes, height, width).any(0)


def erase_and_inpaint(image: np.ndarray, boxes: np.ndarray, radius: int = 5) -> np.ndarray:
    """uint8 [H, W, 3] with the union of ``boxes`` inpainted (Telea): the empty-scene estimate."""
    hole = union_mask(boxes, *image.shape[:2]).astype(np.uint8)
    return cv2.inpaint(np.ascontiguousarray(image), hole, radius, cv2.INPAINT_TELEA)


def paste_object(canvas: np.ndarray, patch: np.ndarray, patch_mask: np.ndarray, box) -> np.ndarray:
    """Paste ``patch`` [P, P, 3] (object on white) inside its mask [P, P] onto ``canvas`` at the
    tight xyxy ``box``: the silhouette's own bounding box in the patch is scaled onto ``box``
    (`pics_model.data.silhouette_on_box`, the rule the collage hint uses too)."""
    placed = silhouette_on_box(patch, patch_mask, box, *canvas.shape[:2])
    if placed is None:
        return canvas
    (x0, y0, x1, y1), obj, m = placed
    out = canvas.copy()
    region = out[y0:y1, x0:x1]
    region[m] = obj[m]
    return out


def copy_paste(sample: dict, boxes_expanded: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """The copy-paste composite, uint8 [H, W, 3]; ``background`` defaults to the inpainted scene."""
    canvas = erase_and_inpaint(sample["image"], boxes_expanded) if background is None else background
    for patch, pmask, box in zip(sample["patches"], sample["patch_masks"], sample["boxes_tight"]):
        canvas = paste_object(canvas, patch, pmask, box)
    return canvas


def far_to_near(sample: dict) -> list[int]:
    """Object indices in painter's order (farthest first)."""
    n = len(sample["boxes_tight"])
    ranks = sample.get("depth_ranks")
    if ranks is not None and len(ranks) == n and all(r is not None for r in ranks):
        return sorted(range(n), key=lambda i: (-int(ranks[i]), i))  # rank 0 = nearest: goes last
    bottoms = np.asarray(sample["boxes_tight"], np.float64)[:, 3]
    return sorted(range(n), key=lambda i: (bottoms[i], i))


def sequential(pipe, sample: dict, boxes_expanded: np.ndarray, *, steps: int, guidance: float, seed: int,
               background: np.ndarray | None = None, priors: np.ndarray | None = None) -> np.ndarray:
    """Painter's-algorithm composite with ``pipe`` (a PICSPipeline), one object per call, uint8 [H, W, 3].

    Each call gets the object's tight box and the same box expansion as the one-pass methods, so
    the regenerated regions are the same boxes; the seed differs per insertion step.
    """
    canvas = erase_and_inpaint(sample["image"], boxes_expanded) if background is None else background
    for k, i in enumerate(far_to_near(sample)):
        out = pipe(canvas, sample["patches"][i:i + 1], boxes=sample["boxes_tight"][i:i + 1],
                   num_inference_steps=steps, guidance_scale=guidance, seed=seed + 7919 * k,
                   priors=None if priors is None else priors[i:i + 1], output_type="pil",
                   patch_masks=sample["patch_masks"][i:i + 1])
        canvas = np.asarray(out.images[0])
    return canvas
