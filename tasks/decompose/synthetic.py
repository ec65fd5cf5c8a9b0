"""Cheap random LVIS-v1-format data: star-shaped polygons on smooth noisy backgrounds.

For tests and the benchmark only (fast, and independent of the embedded ``make_sample`` dataset).
Objects are placed next to earlier ones so that many overlap or touch; annotations are polygons
(as in LVIS) with area and bbox computed by pycocotools from the polygon itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils

CATEGORIES = [
    {"id": i + 1, "name": n, "synset": f"{n}.n.01", "frequency": "f", "synonyms": [n], "def": n,
     "image_count": 0, "instance_count": 0}
    for i, n in enumerate(["cup", "plate", "book", "ball", "box", "bottle", "lamp", "shoe"])
]


def _star(rng: np.random.Generator, cx: float, cy: float, r: float, w: int, h: int) -> np.ndarray:
    k = int(rng.integers(6, 14))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = r * rng.uniform(0.6, 1.0, k)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
    return np.clip(pts, 0, [w - 1, h - 1])


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.normal(0, 6, (h, w, 1)).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_lvis(out: str | Path, n_images: int = 20, width: int = 640, height: int = 480, seed: int = 0,
                         objects: tuple[int, int] = (2, 5), quality: int = 90, first_id: int = 1) -> tuple[Path, Path]:
    """Write ``out/images/*.jpg`` and ``out/annotations.json``; returns (annotation file, image root)."""
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    ann_id = 1
    for n in range(n_images):
        iid = first_id + n
        img = _background(rng, width, height)
        polys: list[np.ndarray] = []
        for k in range(int(rng.integers(objects[0], objects[1] + 1))):
            r = float(rng.uniform(0.10, 0.25) * min(width, height))
            if polys:
                prev = polys[int(rng.integers(len(polys)))].mean(0)
                ang = rng.uniform(0, 2 * np.pi)
                d = r * rng.uniform(0.6, 1.6)
                cx, cy = prev[0] + d * np.cos(ang), prev[1] + d * np.sin(ang)
            else:
                cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
            poly = _star(rng, cx, cy, r, width, height)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.fillPoly(img, [np.round(poly).astype(np.int32)], color)
            polys.append(poly)
            flat = [round(float(v), 2) for v in poly.reshape(-1)]
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
            anns.append({"id": ann_id, "image_id": iid, "category_id": int(rng.integers(1, len(CATEGORIES) + 1)),
                         "segmentation": [flat], "area": float(mask_utils.area(rle)),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
            ann_id += 1
        name = f"{iid:012d}.jpg"
        cv2.imwrite(str(img_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        images.append({"id": iid, "width": width, "height": height,
                       "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                       "not_exhaustive_category_ids": [], "neg_category_ids": []})
    ann_path = out / "annotations.json"
    ann_path.write_text(json.dumps({"info": {"description": "synthetic"}, "images": images, "annotations": anns,
                                    "categories": CATEGORIES, "licenses": []}))
    return ann_path, img_dir
