"""``pics propose``: K plausible boxes for an object of a class in a background, from a saved model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pics_model.location_model import REGIONS, LocationModel
from tasks import atomic
from tasks.location.train import image_tensor


def _read_rgb(path: str | Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the {what} image ({e})") from None


def propose_boxes(model: LocationModel, background: np.ndarray, class_name: str, k: int,
                  patch: np.ndarray | None = None, region: str = "anywhere", temperature: float = 1.0,
                  top_p: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [k, 4] xyxy in the background's pixels, log-probability scores [k]), best first."""
    h, w = background.shape[:2]
    size = model.cfg.image_size
    with torch.no_grad():
        prefix = model.condition(image_tensor(background, size)[None], model.class_ids([class_name]),
                                 None if patch is None else image_tensor(patch, size)[None])
        tokens, logp = model.sample(prefix, k, temperature, top_p, region=region,
                                    generator=torch.Generator().manual_seed(seed))
    boxes = model.boxes_of(tokens).numpy() * np.array([w, h, w, h], np.float32)
    order = np.argsort(-logp.numpy(), kind="stable")
    return boxes[order], logp.numpy()[order]


def draw_boxes(background: np.ndarray, boxes: np.ndarray, scores: np.ndarray, scale: int = 1) -> Image.Image:
    """The background with each box outlined; the best box thicker and in green, the rest in red/orange."""
    im = Image.fromarray(background).resize((background.shape[1] * scale, background.shape[0] * scale))
    d = ImageDraw.Draw(im)
    for i, b in reversed(list(enumerate(boxes))):
        color = (40, 220, 40) if i == 0 else (255, 140 - min(i * 10, 140), 0)
        d.rectangle([float(v) * scale for v in b], outline=color, width=3 if i == 0 else 1)
    return im


def propose(background: str | Path, class_name: str, checkpoint: str | Path, k: int, out: str | Path,
            object_image: str | Path | None = None, region: str = "anywhere", temperature: float = 1.0,
            top_p: float = 0.95, seed: int = 0) -> dict:
    """Write ``out`` (JSON: boxes in the background's pixels, scores) and ``out`` with .png (boxes drawn)."""
    if region not in REGIONS:
        raise ValueError(f"--region {region!r}: choose one of {', '.join(REGIONS)}")
    model = LocationModel.from_pretrained(checkpoint)
    if class_name not in model.cfg.class_names:
        raise ValueError(f"--class {class_name!r}: the model at {checkpoint} knows {', '.join(model.cfg.class_names)}")
    bg = _read_rgb(background, "background")
    patch = None if object_image is None else _read_rgb(object_image, "object")
    boxes, scores = propose_boxes(model, bg, class_name, k, patch, region, temperature, top_p, seed)
    result = {"background": str(background), "class": class_name, "width": int(bg.shape[1]),
              "height": int(bg.shape[0]), "region": region,
              "boxes": [[round(float(v), 2) for v in b] for b in boxes],
              "scores": [round(float(s), 4) for s in scores]}
    out = Path(out)
    atomic.write_json(out, result)
    png = out.with_suffix(".png")
    with atomic.atomic_path(png) as tmp:
        draw_boxes(bg, boxes, scores, scale=max(1, 384 // max(bg.shape[:2]))).save(tmp, format="PNG")
    result["png"] = str(png)
    return result


def best_box(background: str | Path, object_image: str | Path, class_name: str, checkpoint: str | Path,
             k: int = 10, seed: int = 0) -> list[float]:
    """The highest-scoring of ``k`` proposed boxes (xyxy background pixels): ``pics composite``'s box
    for an object given without a mask or box."""
    model = LocationModel.from_pretrained(checkpoint)
    if class_name not in model.cfg.class_names:
        raise ValueError(f"--class {class_name!r}: the model at {checkpoint} knows {', '.join(model.cfg.class_names)}")
    boxes, _ = propose_boxes(model, _read_rgb(background, "background"), class_name, k,
                             _read_rgb(object_image, "object"), seed=seed)
    return [float(v) for v in boxes[0]]
