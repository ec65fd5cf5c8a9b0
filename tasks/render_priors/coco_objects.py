"""Real object patches cut from COCO/LVIS-format annotations, and SAMPLE_SCHEMA shards made of them.

Test and benchmark inputs only: the decompose stage is the real producer of sample shards. The
cut follows decompose's patch convention (tight mask box, white background, padded by
``pad`` and to a centred square, resized to ``size``) so that the shapes seen here are the
shapes render_priors sees in a run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from tasks import atomic
from tasks.codec import png_bytes
from tasks.schema import SAMPLE_SCHEMA


def cut_patch(image: np.ndarray, mask: np.ndarray, pad: float = 1.2, size: int = 224):
    """(patch uint8 [size, size, 3] on white, mask uint8 [size, size] in {0, 255})."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = mask[y0:y1, x0:x1].astype(bool)
    bh, bw = m.shape
    side = max(int(math.ceil(max(bh, bw) * pad)), 1)
    canvas = np.full((side, side, 3), 255, np.uint8)
    mcanvas = np.zeros((side, side), np.uint8)
    oy, ox = (side - bh) // 2, (side - bw) // 2
    canvas[oy:oy + bh, ox:ox + bw][m] = image[y0:y1, x0:x1][m]
    mcanvas[oy:oy + bh, ox:ox + bw] = m * 255
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    patch = cv2.resize(canvas, (size, size), interpolation=interp)
    pmask = cv2.resize(mcanvas, (size, size), interpolation=interp)
    return patch, np.where(pmask >= 128, 255, 0).astype(np.uint8)


def load_objects(annotations: str | Path, image_dir: str | Path, size: int = 224, pad: float = 1.2,
                 min_area: float = 0.0) -> list[dict]:
    """Every polygon/RLE instance of every image present in ``image_dir`` (missing images are
    skipped): dicts with image_id, annotation_id, category_id, image_path, patch, mask."""
    from pycocotools import mask as mask_utils

    data = json.loads(Path(annotations).read_text())
    images = {im["id"]: im for im in data["images"]}
    out = []
    cache: dict[int, np.ndarray] = {}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        name = im.get("file_name") or Path(im.get("coco_url", "")).name
        path = Path(image_dir) / name
        if not path.is_file() or ann.get("area", 1.0) < min_area:
            continue
        if ann["image_id"] not in cache:
            cache[ann["image_id"]] = np.asarray(Image.open(path).convert("RGB"))
        image = cache[ann["image_id"]]
        h, w = image.shape[:2]
        seg = ann["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else (
            mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg)
        mask = mask_utils.decode(rle)
        if not mask.any():
            continue
        patch, pmask = cut_patch(image, mask, pad, size)
        out.append(dict(image_id=ann["image_id"], annotation_id=ann["id"], category_id=ann["category_id"],
                        image_path=str(path), patch=patch, mask=pmask, full_mask_rle=rle))
    return out


def sample_row(sample_id: str, image_id: int, objects: list[dict], patches: list[bytes] | None = None,
               masks: list[bytes] | None = None) -> dict:
    """A SAMPLE_SCHEMA row holding ``objects``; ``patches``/``masks`` override their PNG bytes
    (to plant broken inputs). Columns render_priors never reads are left null."""
    return {
        "sample_id": sample_id, "split": "train", "source_image": Path(objects[0]["image_path"]).name
        if objects and "image_path" in objects[0] else "", "image_id": image_id, "width": None, "height": None,
        "image_bytes": None, "n_objects": len(objects),
        "annotation_ids": [o["annotation_id"] for o in objects],
        "category_ids": [o["category_id"] for o in objects], "category_names": None, "masks_rle": None,
        "boxes_tight": None, "boxes_expanded": None,
        "patches": patches if patches is not None else [png_bytes(o["patch"]) for o in objects],
        "patch_masks": masks if masks is not None else [png_bytes(o["mask"]) for o in objects],
        "region_map": None, "pair_box_iou": None, "pair_mask_iou": None, "pair_contact_px": None,
        "depth_ranks": None, "amodal_rle": None,
    }


def write_sample_shard(path: str | Path, rows: list[dict]) -> Path:
    return atomic.write_parquet(path, pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
