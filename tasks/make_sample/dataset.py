"""Render images and assemble the LVIS v1 file: the plain functions behind the make_sample flow.

Every image draws from its own generator, seeded by (seed, image index), so a chunk renders the
same pixels whichever worker gets it and the dataset does not depend on how it was split.
"""
from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from tasks import atomic
from tasks.make_sample.annotate import bbox_xywh, depth_order, encode_rle, segmentation
from tasks.make_sample.layout import build_scene, compose_scene, reframe, scene_points
from tasks.make_sample.renderer import get_renderer
from tasks.make_sample.shapes import CATEGORIES
from tasks.params import MakeSampleParams

ANNOTATIONS = "annotations.json"
IMAGES = "images"
SCENES = "scenes"  # each image's 3D scene as a labelled point set (.npz), for tasks/analogy
CAMERA_ATTEMPTS = 4  # a hidden object gets up to 3 higher cameras before it is left out


def file_name(index: int, fmt: str) -> str:
    return f"{index + 1:012d}.{fmt}"


def _encode_image(rgb: np.ndarray, p: MakeSampleParams) -> bytes:
    buf = io.BytesIO()
    if p.image_format == "jpg":
        Image.fromarray(rgb).save(buf, format="JPEG", quality=p.jpeg_quality)
    else:
        Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def render_views(p: MakeSampleParams, index: int):
    """Compose and render image ``index``: (scene spec, views, seconds spent composing)."""
    renderer = get_renderer(p.width, p.height)
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, index]))
    n = int(rng.integers(p.min_objects, p.max_objects + 1))
    spec = compose_scene(rng, renderer, n, p.width / p.height)
    t_layout = time.perf_counter() - t0
    return spec, view_scene(p, spec, rng), t_layout


def view_scene(p: MakeSampleParams, spec, rng: np.random.Generator):
    """Render a composed scene. A hidden object (fewer than ``min_visible_pixels`` visible) gets
    up to three higher cameras; the view showing most objects wins (and is left in ``spec``)."""
    renderer = get_renderer(p.width, p.height)
    n = len(spec.objects)
    aspect = p.width / p.height
    best = None
    for attempt in range(CAMERA_ATTEMPTS):
        if attempt:
            reframe(rng, spec, aspect)
        scene, nodes = build_scene(renderer.pyrender, spec, p.width, p.height)
        labels = renderer.labels(scene, nodes, p.width, p.height)
        shown = int(sum((labels == k + 1).sum() >= p.min_visible_pixels for k in range(n)))
        if best is None or shown > best[0]:
            best = (shown, spec.camera_pose, spec.yfov, spec.info["view_dir"], scene, nodes, labels)
        if shown == n:
            break
    _, spec.camera_pose, spec.yfov, spec.info["view_dir"], scene, nodes, labels = best
    return renderer.render(scene, nodes, p.width, p.height, shadows=p.shadows, labels=labels)


def render_image(p: MakeSampleParams, index: int, images_dir: Path) -> dict:
    """Render image ``index``, write it under ``images_dir``; return its image record, its
    annotations (ids still local to the image), the objects left out with their reason, and
    where the time went (not part of the dataset)."""
    t0 = time.perf_counter()
    spec, views, t_layout = render_views(p, index)
    t_render = time.perf_counter() - t0 - t_layout
    return write_sample(p, index, spec, views, images_dir, {"layout": t_layout, "render": t_render})


def write_sample(p: MakeSampleParams, index: int, spec, views, images_dir: Path, timing: dict) -> dict:
    """Annotate a rendered scene as image ``index`` and write its image and point set; returns
    what `render_image` does (``timing`` gains the annotate and write times)."""
    t1 = time.perf_counter()
    kept, omitted = [], []
    for k, obj in enumerate(spec.objects):
        vis = int((views.labels == k + 1).sum())
        amo = int(views.amodal[k].sum())
        if vis >= p.min_visible_pixels:
            kept.append(k)
            continue
        reason = "out_of_frame" if amo == 0 else ("fully_hidden" if vis == 0 else "too_few_visible_pixels")
        omitted.append({"image_id": index + 1, "object_index": k, "category_id": obj.category.id,
                        "reason": reason, "visible_pixels": vis, "amodal_pixels": amo})

    ranks = depth_order(views.amodal[kept], views.depth[kept]) if kept else []
    anns, formats = [], Counter()
    for r, k in zip(ranks, kept):
        vis = views.labels == k + 1
        amodal = views.amodal[k]
        segm, fmt = segmentation(vis, p.segmentation)
        formats[fmt] += 1
        # who covers part of this object: the labels seen inside its amodal silhouette
        cover = sorted({int(v) - 1 for v in np.unique(views.labels[amodal]) if v and v != k + 1})
        anns.append({
            "object_index": k,
            "category_id": spec.objects[k].category.id,
            "segmentation": segm,
            "area": float(vis.sum()),
            "bbox": bbox_xywh(vis),
            "amodal_segmentation": encode_rle(amodal),
            "amodal_area": float(amodal.sum()),
            "amodal_bbox": bbox_xywh(amodal),
            "depth_rank": int(r),
            "mean_depth": round(float(views.depth[k][amodal].mean()), 4),
            "visible_fraction": round(float(vis.sum()) / float(amodal.sum()), 4),
            "occluded_by_local": [c for c in cover if c in kept],
            "placement": spec.objects[k].mode,
        })
    t_annotate = time.perf_counter() - t1

    t2 = time.perf_counter()
    name = file_name(index, p.image_format)
    (images_dir / name).write_bytes(_encode_image(views.rgb, p))
    write_scene_points(images_dir.parent / SCENES / f"{Path(name).stem}.npz", spec, p.seed, index)
    image = {"id": index + 1, "width": p.width, "height": p.height, "file_name": name,
             "coco_url": f"{IMAGES}/{name}", "license": 1, "not_exhaustive_category_ids": []}
    timing = {**timing, "annotate": t_annotate, "encode_write": time.perf_counter() - t2}
    return {"image": image, "annotations": anns, "omitted": omitted, "formats": dict(formats), "timing": timing}


def write_scene_points(path: Path, spec, seed: int, index: int) -> None:
    """The scene's point set (layout.scene_points) as .npz; its own random stream, so the images
    do not change."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    buf = io.BytesIO()
    np.savez_compressed(buf, **scene_points(spec, rng))
    atomic.write_bytes(path, buf.getvalue())


def render_images(p: MakeSampleParams, indices: list[int], images_dir: str | Path) -> list[dict]:
    """One chunk of images, rendered in order with this process's renderer."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    return [render_image(p, i, images_dir) for i in indices]


def _frequency(image_count: int) -> str:
    # LVIS: rare 1-10 training images, common 11-100, frequent > 100
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def assemble(p: MakeSampleParams, results: list[dict]) -> dict:
    """The LVIS v1 dictionary from per-image results (in image order): global annotation ids,
    occluder ids, negative categories, category counts."""
    results = sorted(results, key=lambda r: r["image"]["id"])
    images, annotations, omitted = [], [], []
    img_count, inst_count = Counter(), Counter()
    next_id = 1
    for res in results:
        local_to_id = {a["object_index"]: next_id + i for i, a in enumerate(res["annotations"])}
        present = set()
        for a in res["annotations"]:
            rec = {"id": local_to_id[a["object_index"]], "image_id": res["image"]["id"]}
            rec.update({k: v for k, v in a.items() if k != "occluded_by_local"})
            rec["occluded_by"] = [local_to_id[c] for c in a["occluded_by_local"]]
            annotations.append(rec)
            present.add(a["category_id"])
            inst_count[a["category_id"]] += 1
        next_id += len(res["annotations"])
        for c in present:
            img_count[c] += 1
        image = dict(res["image"])
        # every category is exhaustively known here: the absent ones are verified negatives
        image["neg_category_ids"] = sorted(c.id for c in CATEGORIES if c.id not in present)
        images.append(image)
        omitted.extend(res["omitted"])
    categories = [{"id": c.id, "name": c.name, "synset": c.synset, "synonyms": list(c.synonyms),
                   "def": c.definition, "frequency": _frequency(img_count[c.id]),
                   "image_count": img_count[c.id], "instance_count": inst_count[c.id]} for c in CATEGORIES]
    formats = Counter()
    for res in results:
        formats.update(res["formats"])
    info = {"description": "pics embedded sample: procedurally rendered objects that rest on, touch "
                           "and occlude each other (trimesh + pyrender)",
            "version": "1.0", "seed": p.seed,
            # what shapes the data, not where or how fast it was made: same data, same bytes
            "params": p.model_dump(mode="json", exclude={"out", "chunk_size", "num_workers"}),
            "segmentation_formats": dict(sorted(formats.items())),
            "omitted_objects": dict(sorted(Counter(o["reason"] for o in omitted).items()))}
    return {"info": info,
            "licenses": [{"id": 1, "name": "generated by the pics project (same licence as the project)",
                          "url": ""}],
            "images": images, "annotations": annotations, "categories": categories,
            "omitted_objects": omitted}


def dumps(lvis: dict) -> bytes:
    """Compact, key-ordered JSON: the same dataset gives the same bytes."""
    return (json.dumps(lvis, sort_keys=True, separators=(",", ":")) + "\n").encode()


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]
