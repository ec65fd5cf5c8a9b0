"""Import the reference implementation's WebDataset tar shards into our shard schema.

A reference sample is the members ``<key>.bg.jpg`` (the full target image), ``<key>.obj0.png``,
``<key>.obj1.png`` (each object cropped on white) and ``<key>.mask0.png``, ``<key>.mask1.png``
(full-resolution instance masks). The WebDataset key is the member path up to the first dot of
its file name. We keep the target's bytes unchanged, encode the masks as RLE, and derive boxes,
patches and region maps with the same code and parameters as ``decompose`` (the reference's own
patches are re-padded from its object crops). The reference carries no category or COCO ids:
category ids are -1 and ids are derived from the tar name and key. Python's ``tarfile`` reads the
tars, so no webdataset dependency is needed.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, UnidentifiedImageError

from tasks import atomic, quarantine
from tasks.decompose import masks as M
from tasks.decompose import pairing, sample
from tasks.decompose.shard import SHARDS_DIR, _rng, decode_rgb, shard_name, write_samples
from tasks.quarantine import QuarantineRecord
from tasks.schema import SCHEMA_VERSION
from tasks.decompose.inputs import InputError
from tasks.decompose.pipeline import GRID_FILES
from tasks.shards import claim_output, content_hash

STAGE = "import_webdataset"
REQUIRED = ("bg.jpg", "obj0.png", "mask0.png", "obj1.png", "mask1.png")


def split_key(member_name: str) -> tuple[str, str]:
    """``"a/b/000123.obj0.png"`` -> (``"a/b/000123"``, ``"obj0.png"``), as WebDataset groups members."""
    d, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def _stable_id(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF


def read_tar(path: str | Path) -> dict[str, dict[str, bytes]]:
    groups: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                key, ext = split_key(m.name)
                groups[key][ext] = tf.extractfile(m).read()
    return dict(groups)


def _png_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return (np.asarray(im.convert("L")) > 127).astype(np.uint8)


def _png_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _convert(tar_name: str, key: str, members: dict[str, bytes], p: dict) -> dict:
    """One reference sample -> one SAMPLE_SCHEMA row; raises ValueError(reason, detail)."""
    missing = [m for m in REQUIRED if m not in members]
    if missing:
        raise ValueError("missing_member", f"no {', '.join(missing)}")
    data = members["bg.jpg"]
    try:
        rgb = decode_rgb(data)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError("truncated_image" if "truncat" in str(e).lower() else "unreadable_image", str(e)) from None
    H, W = rgb.shape[:2]
    n = 2
    while f"obj{n}.png" in members and f"mask{n}.png" in members:
        n += 1
    masks, objs = [], []
    for k in range(n):
        try:
            m = _png_mask(members[f"mask{k}.png"])
            o = _png_rgb(members[f"obj{k}.png"])
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError("unreadable_member", f"obj{k}/mask{k}: {e}") from None
        if m.shape != (H, W):
            raise ValueError("mask_size_mismatch", f"mask{k} is {m.shape[1]}x{m.shape[0]}, bg.jpg is {W}x{H}")
        if not m.any():
            raise ValueError("empty_mask", f"mask{k} has no pixel set")
        masks.append(m)
        objs.append(o)
    image_id = _stable_id(f"{tar_name}:{key}")
    rng = _rng(p["seed"], image_id)
    split = "test" if rng.random() < p["test_fraction"] else "train"
    rles = [M.encode(m) for m in masks]
    tight = [M.mask_box(r) for r in rles]
    expanded, patches, pmasks = [], [], []
    for k in range(n):
        pad = float(rng.uniform(*p["patch_pad"]))
        factor = float(rng.uniform(*p["box_expand"]))
        expanded.append(sample.expand_box(tight[k], factor, W, H))
        x0, y0, x1, y1 = (int(v) for v in tight[k])
        crop_mask = masks[k][y0:y1, x0:x1]
        o = objs[k]
        if o.shape[:2] != crop_mask.shape:  # the object crop is the tight box, possibly resized
            import cv2

            crop_mask = cv2.resize(crop_mask, (o.shape[1], o.shape[0]), interpolation=cv2.INTER_NEAREST)
        pt, pm = sample.make_patch(o, crop_mask, [0, 0, o.shape[1], o.shape[0]], pad, p["patch_size"])
        patches.append(sample.png(pt, p["png_compression"]))
        pmasks.append(sample.png(pm, p["png_compression"]))
    rmap = sample.region_map(expanded, W, H, p["train_resolution"])
    tb = np.array(tight, np.float64)
    box_iou, mask_iou, contact = [], [], []
    for a in range(n):
        for b in range(a + 1, n):
            box_iou.append(float(pairing.box_iou(tb[a:a + 1], tb[b:b + 1])[0, 0]))
            mask_iou.append(float(mask_utils.iou([rles[a]], [rles[b]], [0])[0][0]))
            contact.append(pairing.contact_length(masks[a], tight[a], masks[b], tight[b], p["contact_px"]))
    return {
        "sample_id": f"wds-{tar_name}-{key}", "split": split, "source_image": f"{tar_name}:{key}.bg.jpg",
        "image_id": image_id, "width": W, "height": H, "image_bytes": data, "n_objects": n,
        "annotation_ids": list(range(n)), "category_ids": [-1] * n, "category_names": [""] * n,
        "masks_rle": [M.rle_string(r) for r in rles], "boxes_tight": tight, "boxes_expanded": expanded,
        "patches": patches, "patch_masks": pmasks, "region_map": sample.png(rmap, p["png_compression"]),
        "pair_box_iou": box_iou, "pair_mask_iou": mask_iou, "pair_contact_px": contact,
        "depth_ranks": None, "amodal_rle": None,
    }


def import_tar(tar: str, out: str, index: int, params: dict) -> dict:
    """One reference tar -> ``shards/shard-<index>.parquet``; returns counts and quarantine records."""
    import cv2

    cv2.setNumThreads(1)
    tar_name = Path(tar).name.split(".")[0]
    rows, qrecs = [], []
    try:
        groups = read_tar(tar)
    except (tarfile.TarError, OSError) as e:
        qrecs.append(QuarantineRecord(STAGE, "unreadable_tar", str(e), tar))
        groups = {}
    for key in sorted(groups):
        try:
            rows.append(_convert(tar_name, key, groups[key], params))
        except ValueError as e:
            reason, detail = e.args if len(e.args) == 2 else ("invalid_sample", str(e))
            qrecs.append(QuarantineRecord(STAGE, reason, detail, f"{tar}:{key}", item_key=key))
    rel, sha = None, None
    if rows:
        rel = f"{SHARDS_DIR}/{shard_name(index)}.parquet"
        sha = write_samples(Path(out) / rel, rows)
    return {"tar": tar, "file": rel, "sha256": sha, "samples_seen": len(groups), "samples": len(rows),
            "tar_unreadable": not groups and bool(qrecs),
            "quarantined": dict(Counter(q.reason for q in qrecs if q.reason != "unreadable_tar")),
            "quarantine": [asdict(q) for q in qrecs]}


def check_tars(tars: list[str]) -> None:
    """Every tar must be a readable file before the output folder is touched (a mistyped name
    would otherwise import nothing over the previous import)."""
    missing = [t for t in tars if not Path(t).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no such tar file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def clear_output(out: Path) -> None:
    """An import is not resumable (a tar is quick): drop the shards of an earlier import first,
    in a folder that holds only an import's output (see tasks.shards.claim_output)."""
    import shutil

    claim_output(out, STAGE, {SHARDS_DIR, "manifest.json", "quarantine.parquet"} | GRID_FILES)
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    for f in ("manifest.json", "quarantine.parquet"):
        (out / f).unlink(missing_ok=True)


def finalize(out: Path, results: list[dict], params: dict, tars: list[str]) -> dict:
    qrecs = [QuarantineRecord(**q) for r in results for q in r["quarantine"]]
    quarantine.write(out / "quarantine.parquet", qrecs)
    quarantined: Counter = Counter()
    for r in results:
        quarantined.update(r["quarantined"])
    manifest = {
        "schema_version": SCHEMA_VERSION, "stage": "import_webdataset", "inputs": {"tars": tars},
        "params": params, "images_seen": sum(r["samples_seen"] for r in results),
        "images_with_pair": sum(r["samples"] for r in results), "samples": sum(r["samples"] for r in results),
        "skipped": {}, "quarantined": dict(sorted(quarantined.items())), "quarantined_annotations": {},
        "quarantine_rows": len(qrecs), "tars_unreadable": [r["tar"] for r in results if r["tar_unreadable"]],
        "shards": [{"file": r["file"], "samples": r["samples"], "sha256": r["sha256"]} for r in results if r["file"]],
        "content_hash": content_hash(out),
    }
    atomic.write_json(out / "manifest.json", manifest)
    return manifest
