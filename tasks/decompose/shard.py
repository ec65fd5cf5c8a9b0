"""One shard: a fixed, sorted slice of the dataset's images -> one parquet file of samples.

The shard is the unit of work (one Ray task, one Prefect task), of resume and of atomicity: its
parquet file is renamed into ``shards/`` complete, then its progress record into ``_progress/``;
a shard counts as done only when both exist and agree. Every image ends in exactly one of three
bins (with pair, skipped, quarantined) so the manifest's counts add up.

Randomness (patch pad, box expansion, split) comes from a generator seeded by (seed, image id),
so the bytes of a shard do not depend on which worker ran it or in what order.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils
from PIL import Image, UnidentifiedImageError

from pics_model.data import expand_boxes, region_map
from tasks import sharded_stage
from tasks.codec import decode_rgb, encode_png
from tasks.decompose import masks as M
from tasks.decompose import pairing, sample
from tasks.decompose.inputs import STAGE, name_outside_root, resolve_image
from tasks.params import DecomposeParams
from tasks.quarantine import QuarantineRecord
from tasks.schema import SAMPLE_SCHEMA
from tasks.sharded_stage import SHARDS_DIR, Timers, write_progress, write_shard

TIMING_KEYS = ("decode", "masks", "crops", "encode", "write")
# Binary columns hold already-compressed JPEG/PNG bytes: compressing them again only costs time.
_RAW_COLUMNS = {"image_bytes", "patches", "patch_masks", "region_map"}
_STATS_COLUMNS = ["sample_id", "split", "image_id", "width", "height", "n_objects"]


@dataclass
class ShardWork(sharded_stage.ShardWork):
    images: list[tuple[dict, list[dict]]]  # (image record, its annotations), sorted by image id


@dataclass(frozen=True)
class ShardContext:
    image_root: str
    out: str
    annotations: str  # the annotation file, for quarantine records
    params: DecomposeParams
    categories: dict  # category id -> name
    fingerprint: str  # of inputs + params: a resumed run keeps only shards with the same one


@dataclass
class _Obj:
    ann: dict
    rle: dict
    area: float  # the annotation's area field (the rule's area), else the mask's
    pixels: int  # the mask's pixel count
    mask: np.ndarray | None = None
    tight: list[float] = field(default_factory=list)


@dataclass
class ImageOutcome:
    status: str  # "pair" | "skipped" | "quarantined"
    reason: str = ""
    rows: list[dict] = field(default_factory=list)
    quarantine: list[QuarantineRecord] = field(default_factory=list)


def _is_crowd(ann: dict) -> bool:
    return bool(ann.get("iscrowd", 0))


def _rule_area(ann: dict, mask_area: int) -> float:
    a = ann.get("area")
    if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a):
        return float(a)
    return float(mask_area)


def _rng(seed: int, image_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, image_id & 0x7FFFFFFFFFFFFFFF]))


def _open_error_reason(e: Exception) -> str:
    return "truncated_image" if "truncat" in str(e).lower() else "unreadable_image"


def process_image(record: dict, anns: list[dict], ctx: ShardContext, timers: Timers) -> ImageOutcome:
    p = ctx.params
    iid, W, H = record["id"], record["width"], record["height"]
    root = Path(ctx.image_root)
    out = ImageOutcome("quarantined")

    def q_image(reason: str, detail: str, source: str) -> ImageOutcome:
        out.status, out.reason = "quarantined", reason
        out.quarantine.append(QuarantineRecord(STAGE, reason, detail, source, iid, None))
        return out

    with timers("decode"):
        outside = name_outside_root(record)
        if outside is not None:
            return q_image("image_path_outside_root", f"file name {outside!r} points outside the image root {root}",
                           ctx.annotations)
        rel = resolve_image(root, record)
        if rel is None:
            from tasks.decompose.inputs import image_candidates

            tried = image_candidates(record)
            return q_image("missing_image", f"none of {tried} under {root}", str(root / tried[0]))
        path = root / rel
        try:  # header only: cheap, catches non-images and size mismatches for every image
            with Image.open(path) as im:
                size = im.size
        except (UnidentifiedImageError, OSError) as e:
            return q_image(_open_error_reason(e), str(e), str(path))
        if size != (W, H):
            return q_image("image_size_mismatch", f"file is {size[0]}x{size[1]}, record says {W}x{H}", str(path))

    with timers("masks"):
        objs: list[_Obj] = []
        for a in anns:
            try:
                rle, area, dec = M.ann_mask(a, H, W)
            except M.MaskError as e:
                out.quarantine.append(QuarantineRecord(STAGE, e.reason, e.detail, ctx.annotations, iid, a["id"]))
                continue
            objs.append(_Obj(a, rle, _rule_area(a, area), area, dec))
        min_area = p.area_ratio * W * H
        q = [o for o in objs if not _is_crowd(o.ann) and o.area > min_area]
        if len(q) < 2:
            out.status, out.reason = "skipped", "fewer_than_two_objects"
            return out

        def get_mask(k: int) -> np.ndarray:
            if q[k].mask is None:
                q[k].mask = M.decode(q[k].rle)
            return q[k].mask

        for o in q:
            o.tight = M.mask_box(o.rle)
        mining = np.array([M.mining_box(o.ann, o.rle) for o in q], dtype=np.float64)
        contact_cache: dict[tuple[int, int], int] = {}
        if p.pairing == "reference":
            pairs = pairing.reference_pairs(mining, p.containment_tol_px)
        else:
            tight = np.array([o.tight for o in q], dtype=np.float64)
            areas = np.array([o.pixels for o in q], dtype=np.float64)
            pairs = pairing.interaction_pairs(tight, areas, get_mask, p.contact_px, p.duplicate_mask_iou)
            contact_cache = {(i, j): int(s) for i, j, s in pairs}
        groups = pairing.choose_groups(len(q), pairs, p.group_size, p.pairs_per_image)
        if not groups:
            out.status, out.reason = "skipped", "no_valid_pair" if p.group_size == 2 else "no_valid_group"
            return out

    with timers("decode"):
        try:
            data = path.read_bytes()
            rgb = decode_rgb(data)
        except (UnidentifiedImageError, OSError) as e:
            return q_image(_open_error_reason(e), str(e), str(path))
        if rgb.shape[:2] != (H, W):
            return q_image("image_size_mismatch", f"decoded {rgb.shape[1]}x{rgb.shape[0]}, record says {W}x{H}",
                           str(path))

    rng = _rng(p.seed, iid)
    split = "test" if rng.random() < p.test_fraction else "train"
    for g in groups:
        out.rows.append(_build_row(g, q, mining, get_mask, contact_cache, rgb, data, rel, record, split, rng,
                                   ctx, timers, out.quarantine))
    out.status = "pair"
    return out


def _build_row(g, q, mining, get_mask, contact_cache, rgb, data, rel, record, split, rng, ctx, timers, qrecs) -> dict:
    p = ctx.params
    iid, W, H = record["id"], record["width"], record["height"]
    objs = [q[k] for k in g]
    with timers("crops"):
        pads = [float(rng.uniform(*p.patch_pad)) for _ in g]
        factors = [float(rng.uniform(*p.box_expand)) for _ in g]
        expanded = expand_boxes(np.array([o.tight for o in objs], np.float64), np.array(factors), W, H).tolist()
        patches = [sample.make_patch(rgb, get_mask(k), q[k].tight, pad, p.patch_size) for k, pad in zip(g, pads)]
        rmap = region_map(expanded, H, W, p.preview_resolution)
    with timers("masks"):
        box_iou, mask_iou, contact = [], [], []
        for a in range(len(g)):
            for b in range(a + 1, len(g)):
                i, j = g[a], g[b]
                box_iou.append(float(pairing.box_iou(mining[i:i + 1], mining[j:j + 1])[0, 0]))
                mask_iou.append(float(mask_utils.iou([q[i].rle], [q[j].rle], [0])[0][0]))
                c = contact_cache.get((i, j))
                if c is None:
                    c = pairing.contact_length(get_mask(i), q[i].tight, get_mask(j), q[j].tight, p.contact_px)
                contact.append(int(c))
        depth = [o.ann.get("depth_rank") for o in objs]
        depth_ranks = depth if all(isinstance(d, int) and not isinstance(d, bool) for d in depth) else None
        amodal = []
        for o in objs:
            seg = o.ann.get("amodal_segmentation")
            if seg is None:
                amodal = None
                break
            try:
                amodal.append(M.rle_string(M.to_rle(seg, H, W)[0]))
            except M.MaskError as e:
                qrecs.append(QuarantineRecord(STAGE, f"amodal_{e.reason}", e.detail, ctx.annotations, iid, o.ann["id"]))
                amodal = None
                break
    with timers("encode"):
        level = p.png_compression
        patch_png = [encode_png(pt, level) for pt, _ in patches]
        mask_png = [encode_png(pm, level) for _, pm in patches]
        rmap_png = encode_png(rmap, level)
    ann_ids = [o.ann["id"] for o in objs]
    cat_ids = [o.ann["category_id"] for o in objs]
    return {
        "sample_id": "-".join(str(v) for v in [iid, *ann_ids]),
        "split": split,
        "source_image": Path(rel).as_posix(),
        "image_id": iid,
        "width": W,
        "height": H,
        "image_bytes": data,
        "n_objects": len(g),
        "annotation_ids": ann_ids,
        "category_ids": cat_ids,
        "category_names": [ctx.categories.get(c, "") for c in cat_ids],
        "masks_rle": [M.rle_string(o.rle) for o in objs],
        "boxes_tight": [o.tight for o in objs],
        "boxes_expanded": expanded,
        "patches": patch_png,
        "patch_masks": mask_png,
        "region_map": rmap_png,
        "pair_box_iou": box_iou,
        "pair_mask_iou": mask_iou,
        "pair_contact_px": contact,
        "depth_ranks": depth_ranks,
        "amodal_rle": amodal,
    }


def write_samples(path: Path, rows: list[dict]) -> str:
    """Atomically write rows as a SAMPLE_SCHEMA parquet file; returns its sha256."""
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    compression = {f.name: ("none" if f.name in _RAW_COLUMNS else "zstd") for f in SAMPLE_SCHEMA}
    return write_shard(path, table, compression=compression, use_dictionary=["split", "category_names"],
                       write_statistics=_STATS_COLUMNS, row_group_size=64)


def process_shard(work: ShardWork, ctx: ShardContext) -> dict:
    """Decompose one shard's images, write its parquet and progress record; returns the record + timings."""
    import cv2

    cv2.setNumThreads(1)  # one core per Ray task; OpenCV's own threads would fight the other workers
    cpu0 = time.process_time()
    timers = Timers(TIMING_KEYS)
    rows: list[dict] = []
    qrecs: list[QuarantineRecord] = []
    skipped: Counter = Counter()
    quarantined: Counter = Counter()
    with_pair = 0
    for record, anns in work.images:
        res = process_image(record, anns, ctx, timers)
        rows.extend(res.rows)
        qrecs.extend(res.quarantine)
        if res.status == "pair":
            with_pair += 1
        elif res.status == "skipped":
            skipped[res.reason] += 1
        else:
            quarantined[res.reason] += 1
    out = Path(ctx.out)
    rel, sha = None, None
    with timers("write"):
        if rows:
            rel = f"{SHARDS_DIR}/{work.name}.parquet"
            sha = write_samples(out / rel, rows)
        record = {
            "shard": work.name,
            "fingerprint": ctx.fingerprint,
            "file": rel,
            "sha256": sha,
            "images_seen": len(work.images),
            "images_with_pair": with_pair,
            "samples": len(rows),
            "splits": dict(sorted(Counter(r["split"] for r in rows).items())),
            "skipped": dict(sorted(skipped.items())),
            "quarantined": dict(sorted(quarantined.items())),
            "quarantined_annotations": dict(sorted(Counter(
                r.reason for r in qrecs if r.annotation_id is not None).items())),
            "quarantine": [asdict(r) for r in qrecs],
        }
        write_progress(out, record)
    # CPU seconds spent: a per-core rate that other processes on a shared machine do not distort
    return {**record, "timings": timers.t, "cpu_s": time.process_time() - cpu0}
