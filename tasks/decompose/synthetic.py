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


def _start(out: str | Path, seed: int) -> tuple[Path, Path, np.random.Generator]:
    """(out, its images/ folder, created; the writer's random generator)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    return out, out / "images", np.random.default_rng(seed)


def write_synthetic_lvis(out: str | Path, n_images: int = 20, width: int = 640, height: int = 480, seed: int = 0,
                         objects: tuple[int, int] = (2, 5), quality: int = 90, first_id: int = 1) -> tuple[Path, Path]:
    """Write ``out/images/*.jpg`` and ``out/annotations.json``; returns (annotation file, image root)."""
    out, img_dir, rng = _start(out, seed)
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


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """A rectangle (xyxy) as an LVIS polygon segmentation."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_dataset(out: str | Path, images: list[dict], fmt: str = "lvis_v1", categories: list[dict] | None = None,
                  image_ext: str = "png", seed: int = 0) -> tuple[Path, Path]:
    """Write a small hand-specified dataset; returns (annotation file, image root).

    ``images``: ``{"id", "width", "height", "objects": [ann fields...], "file": True}``. Each object
    needs ``segmentation`` and may give ``category_id`` (default 1), ``iscrowd``, ``area``, ``bbox``,
    ``id`` or any extra field; area and bbox default to pycocotools' values for the segmentation.
    The image is noise with each valid object filled in its own colour; ``"file": False`` writes
    no image file. ``fmt``: ``lvis_v1`` (coco_url only), ``lvis_v0.5`` (COCO-2014 file_name) or ``coco``.
    """
    from tasks.decompose.masks import MaskError, to_rle

    out, img_dir, rng = _start(out, seed)
    recs, anns = [], []
    next_id = 1
    for spec in images:
        iid, w, h = spec["id"], spec["width"], spec["height"]
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for obj in spec.get("objects", []):
            ann = {k: v for k, v in obj.items()}
            ann.setdefault("id", next_id)
            next_id = max(next_id, ann["id"]) + 1
            ann.setdefault("image_id", iid)
            ann.setdefault("category_id", 1)
            if fmt == "coco":
                ann.setdefault("iscrowd", 0)
            try:
                rle, m = to_rle(ann["segmentation"], h, w)
                m = mask_utils.decode(rle) if m is None else m
                ann.setdefault("area", float(mask_utils.area(rle)))
                ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
                img[m.astype(bool)] = rng.integers(0, 256, 3, dtype=np.uint8)
            except MaskError:
                ann.setdefault("area", 0.0)
                ann.setdefault("bbox", [0.0, 0.0, 0.0, 0.0])
            anns.append(ann)
        name = f"{iid:012d}.{image_ext}"
        if spec.get("file", True):
            code = cv2.IMWRITE_JPEG_QUALITY if image_ext == "jpg" else cv2.IMWRITE_PNG_COMPRESSION
            cv2.imwrite(str(img_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [code, 95 if image_ext == "jpg" else 1])
        rec = {"id": iid, "width": w, "height": h}
        if fmt == "lvis_v1":
            rec["coco_url"] = f"http://images.cocodataset.org/train2017/{name}"
        elif fmt == "lvis_v0.5":
            rec["file_name"] = f"COCO_train2014_{name}"
            rec["coco_url"] = f"http://images.cocodataset.org/train2017/{name}"
        else:
            rec["file_name"] = name
        recs.append(rec)
    cats = categories or (CATEGORIES if fmt.startswith("lvis") else
                          [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in CATEGORIES])
    ann_path = out / "annotations.json"
    ann_path.write_text(json.dumps({"images": recs, "annotations": anns, "categories": cats}))
    return ann_path, img_dir


def write_reference_tar(path: str | Path, n_good: int = 2, seed: int = 0) -> dict[str, tuple[bytes, list[np.ndarray]]]:
    """A tar laid out like the reference's WebDataset shards (``bg.jpg``, ``objK.png`` = the object
    cropped to its box on white, ``maskK.png`` = full-size mask), with ``n_good`` complete samples
    and one more that lacks ``mask1.png``. Returns key -> (bg.jpg bytes, [mask0, mask1] in {0, 1})."""
    import io
    import tarfile

    from PIL import Image

    def png(arr) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(seed)
    expect = {}
    with tarfile.open(path, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for k in range(n_good + 1):
            key = f"lvis/{k:06d}"
            bg = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(bg).save(buf, format="JPEG")
            add(f"{key}.bg.jpg", buf.getvalue())
            masks = []
            for j, (x0, y0, x1, y1) in enumerate([(10, 10, 60, 70), (40, 30, 110, 80)]):
                m = np.zeros((90, 120), np.uint8)
                m[y0:y1, x0:x1] = 255
                crop = np.where(m[y0:y1, x0:x1, None] > 0, bg[y0:y1, x0:x1], 255).astype(np.uint8)
                add(f"{key}.obj{j}.png", png(crop))
                if not (k == n_good and j == 1):
                    add(f"{key}.mask{j}.png", png(m))
                masks.append(m // 255)
            expect[key] = (buf.getvalue(), masks)
    return expect
