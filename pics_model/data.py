"""Turn one decoded sample into model tensors, and batch them.

The same geometry is used at training (`build_item`) and inference (`PICSPipeline` calls
`build_item` too), so boxes, hint and routing masks can never drift apart between the two.

Geometry: the image is padded to a centred square of side S = max(H, W) (black padding) and
resized to R. A box in source pixels maps to ``(x + left) * R / S``. Routing masks and the hint's
mask channel use the *expanded* boxes (design notes: the reference's "overlap" is the
intersection of the expanded boxes, not of the silhouettes).

The collage hint (``build_item(..., collage=True)``, `PICSConfig.collage_hint`): as AnyDoor puts
the object's detail map at the target location in its ControlNet hint, each object patch, cut to
its silhouette, is scaled onto its *tight* box (`silhouette_on_box`, the copy-paste baseline's
rule) and drawn into the hint. Where several silhouettes cover a pixel the hint holds their mean
and a channel counts them, so the hint does not depend on the objects' order: who is in front in
the overlap is left to the network (the gate). The collage is drawn from the patches as given,
before augmentation: at inference the patches are not augmented, and a flipped or rotated
collage would contradict the target the loss compares with; augmentation still reaches the
object encoder, whose codes must not learn pixel positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "AugmentConfig", "rotate_object", "augment_object", "expand_boxes", "tight_box_from_mask",
    "square_geometry", "to_square_frame", "content_window", "box_masks", "region_map", "rasterize_boxes",
    "silhouette_on_box", "silhouette_from_white", "collage_layer", "collage_start", "hint_channels", "build_item", "collate",
]


@dataclass(frozen=True)
class AugmentConfig:
    """Object-side augmentation, applied identically to a patch, its mask and its prior views.

    Defaults: the reference's probabilities; the rotation range is the paper's U(-pi/6, pi/6)
    (the reference code used +-15 deg).
    """

    flip_p: float = 0.2
    color_p: float = 0.3
    brightness: float = 0.1  # additive, as a fraction of full range
    contrast: float = 0.1  # multiplicative around the mean
    rotate_p: float = 0.5
    rotate_max_deg: float = math.degrees(math.pi / 6)


def _check(cond: bool, source: str | None, field: str, msg: str) -> None:
    if not cond:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}sample field {field!r}: {msg}")


def rotate_object(patch: np.ndarray, mask: np.ndarray | None, priors: np.ndarray | None,
                  angle_deg: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """In-plane rotation about the centre, counter-clockwise, same canvas size.

    patch [P,P,3] uint8 and priors [K,R,R,3] uint8 are refilled with white (the object patches'
    background); mask [P,P] uint8 is refilled with 0. Bilinear for images, nearest for the mask.
    """
    out = np.asarray(Image.fromarray(patch).rotate(angle_deg, Image.Resampling.BILINEAR,
                                                   fillcolor=(255, 255, 255)))
    m = None if mask is None else np.asarray(
        Image.fromarray(mask).rotate(angle_deg, Image.Resampling.NEAREST, fillcolor=0))
    pr = None if priors is None else np.stack([
        np.asarray(Image.fromarray(v).rotate(angle_deg, Image.Resampling.BILINEAR, fillcolor=(255, 255, 255)))
        for v in priors])
    return out, m, pr


def augment_object(patch, mask, priors, rng: np.random.Generator, cfg: AugmentConfig):
    """Random flip / brightness-contrast / rotation, one draw shared by patch, mask and priors."""
    if rng.random() < cfg.flip_p:
        patch = patch[:, ::-1].copy()
        mask = None if mask is None else mask[:, ::-1].copy()
        priors = None if priors is None else priors[:, :, ::-1].copy()
    if rng.random() < cfg.color_p:
        b = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
        c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)

        def bc(x):
            xf = x.astype(np.float32)
            return np.clip((xf - xf.mean()) * c + xf.mean() + b, 0, 255).astype(np.uint8)
        patch = bc(patch)
        priors = None if priors is None else np.stack([bc(v) for v in priors])
    if rng.random() < cfg.rotate_p:
        patch, mask, priors = rotate_object(patch, mask, priors,
                                            float(rng.uniform(-cfg.rotate_max_deg, cfg.rotate_max_deg)))
    return patch, mask, priors


def expand_boxes(boxes: np.ndarray, factor: float | np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale xyxy boxes about their centres by ``factor`` (scalar or per box), clipped to the image.

    The decompose stage draws factor ~ U[1.1, 1.2) per box; inference uses the midpoint 1.15.
    Computed in the boxes' float type (float32 for anything else): decompose's float64 boxes keep
    the exact values its shards store.
    """
    b = np.asarray(boxes)
    b = b.astype(b.dtype if b.dtype.kind == "f" else np.float32).reshape(-1, 4)
    f = np.broadcast_to(np.asarray(factor, b.dtype), (len(b),))[:, None]
    c = (b[:, :2] + b[:, 2:]) / 2
    half = (b[:, 2:] - b[:, :2]) / 2 * f
    out = np.concatenate([c - half, c + half], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def tight_box_from_mask(mask: np.ndarray) -> np.ndarray:
    """xyxy (exclusive max) box of a non-empty [H,W] mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty object mask: no box")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def square_geometry(height: int, width: int) -> tuple[int, int, int]:
    """(S, top, left): the centred square pad of an H x W image; source (x, y) lands at
    ((x + left) * R / S, (y + top) * R / S) once the square is resized to R."""
    s = max(height, width)
    return s, (s - height) // 2, (s - width) // 2


def to_square_frame(boxes, height: int, width: int, resolution: int) -> np.ndarray:
    """xyxy boxes in source pixels -> the same boxes (float64) on the square-padded target resized
    to ``resolution``."""
    s, top, left = square_geometry(height, width)
    return (np.asarray(boxes, np.float64).reshape(-1, 4) + [left, top, left, top]) * (resolution / s)


def content_window(height: int, width: int, resolution: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the pixels of the square frame that the image covers (the rest is padding)."""
    x0, y0, x1, y1 = to_square_frame([0, 0, width, height], height, width, resolution)[0]
    return int(math.floor(x0)), int(math.floor(y0)), int(math.ceil(x1)), int(math.ceil(y1))


def box_masks(boxes, height: int, width: int, rule: str = "centre") -> np.ndarray:
    """[N, 4] xyxy boxes (pixel units) -> bool [N, height, width], the one box rasteriser.

    ``rule="centre"``: pixel (x, y) is in a box iff x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1 (the
    model's routing masks, the metrics' regions, the paste-back). ``rule="cover"``: every pixel the
    box touches, floor(x0) <= x < ceil(x1) (the region map of decompose's preview).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    if rule == "centre":
        in_x = (xs + 0.5 >= b[:, 0:1]) & (xs + 0.5 < b[:, 2:3])
        in_y = (ys + 0.5 >= b[:, 1:2]) & (ys + 0.5 < b[:, 3:4])
    elif rule == "cover":
        in_x = (xs + 1 > b[:, 0:1]) & (xs < b[:, 2:3])
        in_y = (ys + 1 > b[:, 1:2]) & (ys < b[:, 3:4])
    else:
        raise ValueError(f"rule: 'centre' or 'cover', not {rule!r}")
    return in_y[:, :, None] & in_x[:, None, :]


def region_map(boxes, height: int, width: int, resolution: int) -> np.ndarray:
    """uint8 [R, R]; bit i set in every pixel that expanded box i covers on the square-padded,
    resized target (at most 8 boxes)."""
    masks = box_masks(to_square_frame(boxes, height, width, resolution), resolution, resolution, rule="cover")
    out = np.zeros((resolution, resolution), np.uint8)
    for i, m in enumerate(masks):
        out[m] |= np.uint8(1 << i)
    return out


def rasterize_boxes(boxes: np.ndarray, size: int) -> np.ndarray:
    """[N,4] xyxy boxes in pixel units of a size x size grid -> [N,size,size] float32 0/1.

    A pixel belongs to a box when its centre is inside; a box too small to hold a pixel centre
    still gets the pixel under its centre, so no object silently loses its region.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    m = box_masks(b, size, size).astype(np.float32)
    for i in np.nonzero(m.reshape(len(b), -1).sum(1) == 0)[0]:
        cx = int(np.clip((b[i, 0] + b[i, 2]) / 2, 0, size - 1))
        cy = int(np.clip((b[i, 1] + b[i, 3]) / 2, 0, size - 1))
        m[i, cy, cx] = 1.0
    return m


def silhouette_on_box(patch: np.ndarray, patch_mask: np.ndarray, box, height: int, width: int):
    """``patch`` [P,P,3] uint8 cut to ``patch_mask`` [P,P] (> 0 inside), its silhouette's own
    bounding box scaled onto the xyxy ``box`` (rounded to whole pixels) of an H x W canvas.

    Returns ``((x0, y0, x1, y1), rgb uint8 [y1-y0, x1-x0, 3], inside bool [y1-y0, x1-x0])``: the
    part of the box on the canvas (a box reaching past the edge keeps its scale and is cut there),
    or None when the mask is empty or the box misses the canvas.
    """
    ys, xs = np.nonzero(np.asarray(patch_mask) > 0)
    bx0, by0, bx1, by1 = (int(round(float(v))) for v in box)
    if len(xs) == 0 or bx1 <= bx0 or by1 <= by0:
        return None
    x0, y0, x1, y1 = max(bx0, 0), max(by0, 0), min(bx1, width), min(by1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    crop = patch[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    cmask = (patch_mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] > 0).astype(np.uint8) * 255
    size = (bx1 - bx0, by1 - by0)
    rgb = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BICUBIC))
    inside = np.asarray(Image.fromarray(cmask).resize(size, Image.Resampling.BILINEAR)) >= 128
    window = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
    return (x0, y0, x1, y1), rgb[window], inside[window]


def silhouette_from_white(patch: np.ndarray, tolerance: int = 8) -> np.ndarray:
    """uint8 [P,P] mask (255 inside) of an object patch on white: the pixels whose any channel is
    more than ``tolerance`` below 255. For inputs that come without their patch mask (an object
    image from a user); white parts of the object are lost, so the dataset's masks are preferred."""
    return ((np.asarray(patch) < 255 - tolerance).any(-1) * 255).astype(np.uint8)


def collage_layer(patches: np.ndarray, patch_masks: np.ndarray, boxes: np.ndarray,
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every object's silhouette on its xyxy box (`silhouette_on_box`) on a size x size canvas.

    Returns (rgb float32 [size,size,3] in [0,1]: the mean of the silhouettes covering a pixel, 0
    where none does; coverage float32 [size,size]: how many cover it). Summed in integers, so the
    result is bit-identical under any order of the objects.
    """
    total = np.zeros((size, size, 3), np.int32)
    count = np.zeros((size, size), np.int32)
    for patch, pmask, box in zip(patches, patch_masks, np.asarray(boxes, np.float32).reshape(-1, 4)):
        placed = silhouette_on_box(patch, pmask, box, size, size)
        if placed is None:
            continue
        (x0, y0, x1, y1), rgb, inside = placed
        total[y0:y1, x0:x1][inside] += rgb[inside]
        count[y0:y1, x0:x1] += inside
    rgb = total.astype(np.float32) / (np.float32(255.0) * np.maximum(count, 1)[..., None])
    return rgb.astype(np.float32), count.astype(np.float32)


def push_pull_fill(rgb: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """rgb [B,C,H,W], known [B,1,H,W] in [0,1] -> rgb with the unknown pixels
    filled by a smooth extension of the known ones (push-pull: average the known pixels down a
    pyramid, then blend each level's own colour over the coarser fill, up to full resolution)."""
    levels = []
    x, w = rgb * known, known
    while x.shape[-1] > 1:
        levels.append((x, w))
        x, w = F.avg_pool2d(x, 2), F.avg_pool2d(w, 2)
    fill = x / w.clamp_min(1e-6)
    for x, w in reversed(levels):
        up = F.interpolate(fill, size=x.shape[-2:], mode="bilinear", align_corners=False)
        fill = x + (1 - w) * up  # x is premultiplied by w: known pixels keep their colour
    return fill


def collage_start(hint: torch.Tensor) -> torch.Tensor:
    """collage hint [B,5,R,R] -> the collage residual's starting point [B,3,R,R] in [-1,1]: inside the
    boxes (mask channel 1) the collage over the background filled in from the image outside the
    boxes (mask 0; `push_pull_fill`), each pixel blending the silhouettes' colour over that fill by its coverage
    (1 inside a silhouette, a fraction at its edge, 0 where none covers); outside, the hint's RGB.
    The fill reads only the background: filled from the silhouettes too, the objects' colours
    bled into the boxes' background (2 dB of mPSNR, docs/fidelity_log.md)."""
    rgb, mask = hint[:, :3].float(), hint[:, 3:4]
    inside = mask >= 0.5
    background = push_pull_fill(rgb, (mask.abs() < 0.5).float())  # not the square padding (-1) either
    cover = hint[:, 4:5].float().clamp(0, 1)
    return torch.where(inside, cover * rgb + (1 - cover) * background, rgb)


def hint_channels(collage: bool) -> int:
    """Channels of `build_item`'s hint: masked RGB + mask (4), + the collage's coverage (5)."""
    return 5 if collage else 4


def _resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def _to_unit(img: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).float().div_(255.0).movedim(-1, -3)


def build_item(sample: dict, resolution: int, rng: np.random.Generator | None,
               augment: AugmentConfig | None = None, object_size: int | None = None,
               source: str | None = None, collage: bool = False) -> dict[str, torch.Tensor]:
    """One decoded sample -> tensors for `PICSModel.training_loss` / the pipeline.

    sample: {"image": uint8 [H,W,3], "boxes_expanded": float [N,4] xyxy source px,
             "patches": uint8 [N,P,P,3] (white background), "patch_masks": uint8 [N,P,P] (255 inside;
             optional), "priors": uint8 [N,K,V,V,3] or None (optional)}
    resolution: R. rng/augment: object augmentation (both needed; None -> deterministic).
    object_size: P' for "objects"/"priors" (default: keep P; the model resizes to its encoder size).
    source: a file/sample name to put in error messages.

    Returns: "target" [3,R,R] in [-1,1]; "hint" [4,R,R] (RGB in [-1,1] with every expanded box
    set to 0, then the mask channel: 1 in the union of boxes, 0 background, -1 square padding);
    "objects" [N,3,P',P'] in [0,1]; "routing_masks" [N,R,R] 0/1; "valid" [R,R] (1 inside the
    original image); "boxes" [N,4] expanded boxes in R px; "crop" [4] = the image's xyxy in R px;
    "priors" [N,K,3,P',P'] in [0,1] when the sample has priors; "visible" [N,R,R] in [0,1] (each
    object's instance mask, area-resized on the square frame) when the sample has "masks" [N,H,W].
    """
    img = sample.get("image")
    _check(isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8,
           source, "image", f"expected uint8 [H,W,3], got {getattr(img, 'dtype', type(img))} "
                            f"{getattr(img, 'shape', '')}")
    h, w = img.shape[:2]
    boxes = np.asarray(sample.get("boxes_expanded"), dtype=np.float32)
    _check(boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) >= 1, source, "boxes_expanded",
           f"expected float [N,4] xyxy with N >= 1, got shape {boxes.shape}")
    _check(bool(np.isfinite(boxes).all()), source, "boxes_expanded", "non-finite coordinates")
    boxes = boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    _check(bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()), source, "boxes_expanded",
           f"empty box after clipping to the {w}x{h} image: {boxes.tolist()}")
    n = len(boxes)
    patches = sample.get("patches")
    _check(isinstance(patches, np.ndarray) and patches.dtype == np.uint8 and patches.ndim == 4
           and patches.shape[0] == n and patches.shape[3] == 3 and patches.shape[1] == patches.shape[2],
           source, "patches", f"expected uint8 [N={n},P,P,3], got {getattr(patches, 'dtype', type(patches))} "
                              f"{getattr(patches, 'shape', '')}")
    pmasks = sample.get("patch_masks")
    if pmasks is not None:
        _check(isinstance(pmasks, np.ndarray) and pmasks.shape == patches.shape[:3], source, "patch_masks",
               f"expected [N,P,P] = {patches.shape[:3]}, got {getattr(pmasks, 'shape', type(pmasks))}")
    priors = sample.get("priors")
    if priors is not None:
        _check(isinstance(priors, np.ndarray) and priors.dtype == np.uint8 and priors.ndim == 5
               and priors.shape[0] == n and priors.shape[4] == 3, source, "priors",
               f"expected uint8 [N={n},K,V,V,3], got {getattr(priors, 'dtype', type(priors))} "
               f"{getattr(priors, 'shape', '')}")

    r = int(resolution)
    s, top, left = square_geometry(h, w)
    canvas = np.zeros((s, s, 3), np.uint8)
    canvas[top:top + h, left:left + w] = img
    target = _to_unit(_resize_rgb(canvas, r)) * 2.0 - 1.0

    scale = r / s
    boxes_r = (boxes + np.array([left, top, left, top], np.float32)) * scale
    routing = rasterize_boxes(boxes_r, r)
    crop = np.array([left, top, left + w, top + h], np.float32) * scale
    valid = rasterize_boxes(crop[None], r)[0]
    union = routing.max(0)
    mask_ch = np.where(valid > 0, union, -1.0).astype(np.float32)
    hint_rgb = target * torch.from_numpy(1.0 - union)[None]
    hint = [hint_rgb, torch.from_numpy(mask_ch)[None]]
    if collage:  # from the patches as given, before augmentation (module doc)
        hint = _with_collage(hint, sample, pmasks, patches, left, top, s, r, source)
    hint = torch.cat(hint, 0)

    size = object_size or patches.shape[1]
    objs, pri = [], []
    for i in range(n):
        p = patches[i]
        m = None if pmasks is None else pmasks[i]
        pr = None if priors is None else priors[i]
        if rng is not None and augment is not None:
            p, m, pr = augment_object(p, m, pr, rng, augment)
        objs.append(_to_unit(_resize_rgb(p, size)))
        if pr is not None:
            pri.append(_to_unit(np.stack([_resize_rgb(v, size) for v in pr])))
    out = {
        "target": target.contiguous(),
        "hint": hint.contiguous(),
        "objects": torch.stack(objs),
        "routing_masks": torch.from_numpy(routing),
        "valid": torch.from_numpy(valid),
        "boxes": torch.from_numpy(boxes_r),
        "crop": torch.from_numpy(crop),
    }
    if pri:
        out["priors"] = torch.stack(pri)
    if sample.get("masks") is not None:
        out["visible"] = _visible_masks(sample["masks"], n, h, w, s, top, left, r, source)
    return out


def _visible_masks(masks, n: int, h: int, w: int, s: int, top: int, left: int, r: int,
                   source: str | None) -> torch.Tensor:
    """Instance masks uint8 [N,H,W] -> [N,R,R] float32: the covered fraction of each pixel of the
    R x R square frame (the occlusion-order loss's target, pics_model/gate_loss.py)."""
    masks = np.asarray(masks)
    _check(masks.shape == (n, h, w), source, "masks", f"expected [N={n},H={h},W={w}] instance masks, "
                                                       f"got {masks.shape}")
    frame = torch.zeros(n, s, s)
    frame[:, top:top + h, left:left + w] = torch.from_numpy(masks > 0).float()
    return F.adaptive_avg_pool2d(frame[None], r)[0]


def _with_collage(hint: list[torch.Tensor], sample: dict, pmasks, patches: np.ndarray, left: int, top: int,
                  s: int, r: int, source: str | None) -> list[torch.Tensor]:
    """[masked RGB, mask] -> [RGB with the collage's mean colours where it covers, mask, coverage].

    The collage is drawn at the source's resolution (on the S x S square frame) and area-averaged
    down to R, like the target: drawn at R instead, a silhouette on a box a dozen pixels wide is
    cut to whole pixels, shifts by up to half a pixel and loses its anti-aliased edge, which cost
    about 2 dB inside the overlaps before the network even ran (docs/fidelity_log.md). The RGB is
    the silhouettes' mean colour over their covered part of each pixel (not premultiplied), the
    coverage channel the area-averaged count of silhouettes: a fraction at an edge, 2 where two
    overlap fully."""
    n = len(patches)
    _check(pmasks is not None, source, "patch_masks", "the collage hint needs each object's patch mask")
    tight = sample.get("boxes_tight")
    tight = None if tight is None else np.asarray(tight, np.float32)
    _check(tight is not None and tight.shape == (n, 4) and bool(np.isfinite(tight).all()), source, "boxes_tight",
           f"the collage hint needs finite [N={n},4] xyxy tight boxes, got {getattr(tight, 'shape', None)}")
    rgb, count = collage_layer(patches, pmasks, tight + np.array([left, top, left, top], np.float32), s)
    covered = torch.from_numpy(count > 0).float()[None]
    fraction = F.adaptive_avg_pool2d(covered[None], r)[0]
    # rgb is 0 where no silhouette covers, so its area average is premultiplied by the coverage
    rgb_r = F.adaptive_avg_pool2d(torch.from_numpy(rgb).permute(2, 0, 1)[None], r)[0] / fraction.clamp_min(1e-6)
    coverage = F.adaptive_avg_pool2d(torch.from_numpy(count)[None, None], r)[0]
    hint_rgb = torch.where(fraction > 0, rgb_r * 2.0 - 1.0, hint[0])
    return [hint_rgb, hint[1], coverage]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items; pad the object axis to the largest N with zeros and mark it in "object_valid".

    Batch: target [B,3,R,R], hint [B,4 or 5,R,R], valid [B,R,R], crop [B,4], objects [B,N,3,P,P],
    routing_masks [B,N,R,R], boxes [B,N,4], object_valid [B,N] bool; when any item has priors:
    priors [B,N,K,3,P,P] (zeros where absent) and prior_valid [B,N] bool; when every item has
    visible masks: visible [B,N,R,R].
    """
    if not items:
        raise ValueError("collate: empty batch")
    b = len(items)
    n = max(it["objects"].shape[0] for it in items)
    out = {k: torch.stack([it[k] for it in items]) for k in ("target", "hint", "valid", "crop")}
    obj0 = items[0]["objects"]
    objects = obj0.new_zeros((b, n) + tuple(obj0.shape[1:]))
    routing = items[0]["routing_masks"].new_zeros((b, n) + tuple(items[0]["routing_masks"].shape[1:]))
    boxes = torch.zeros(b, n, 4)
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, it in enumerate(items):
        k = it["objects"].shape[0]
        if it["objects"].shape[1:] != obj0.shape[1:]:
            raise ValueError(f"collate: item {i} objects {tuple(it['objects'].shape)} vs {tuple(obj0.shape)}")
        objects[i, :k] = it["objects"]
        routing[i, :k] = it["routing_masks"]
        boxes[i, :k] = it["boxes"]
        valid[i, :k] = True
    out.update(objects=objects, routing_masks=routing, boxes=boxes, object_valid=valid)
    if all("visible" in it for it in items):
        visible = routing.new_zeros(routing.shape)
        for i, it in enumerate(items):
            visible[i, :it["visible"].shape[0]] = it["visible"]
        out["visible"] = visible
    with_priors = [it for it in items if "priors" in it]
    if with_priors:
        shape = with_priors[0]["priors"].shape[1:]
        if any(it["priors"].shape[1:] != shape for it in with_priors):
            raise ValueError("collate: items disagree on the priors' shape [K,3,P,P]")
        priors = torch.zeros((b, n) + tuple(shape))
        pvalid = torch.zeros(b, n, dtype=torch.bool)
        for i, it in enumerate(items):
            if "priors" in it:
                k = it["priors"].shape[0]
                priors[i, :k] = it["priors"]
                pvalid[i, :k] = True
        out.update(priors=priors, prior_valid=pvalid)
    return out
