"""Reading decompose's shards: committed shard listing, content hash, decoded samples.

Every later stage (render_priors, train, evaluate) reads samples through here, so the PNG/RLE
encoding of SAMPLE_SCHEMA stays a private matter of this module and ``tasks.decompose``.

``decode_sample(row)`` returns numpy arrays::

    image          uint8 [H, W, 3]   the source image, RGB
    masks          uint8 [N, H, W]   instance masks in {0, 1}
    amodal_masks   uint8 [N, H, W]   full (unoccluded) masks in {0, 1}, or None
    boxes_tight    float32 [N, 4]    xyxy of the mask pixels (x1, y1 exclusive)
    boxes_expanded float32 [N, 4]    xyxy, tight box grown by U[1.1, 1.2), clipped to the image
    patches        uint8 [N, P, P, 3] object on white, padded and squared
    patch_masks    uint8 [N, P, P]   in {0, 1}
    region_map     uint8 [R, R]      bit i set inside expanded box i, on the square-padded target
    content_window (x0, y0, x1, y1)  where the image lies in region_map (outside: square padding)

plus ``sample_id, split, image_id, source_image, width, height, n_objects, annotation_ids,
category_ids, category_names, depth_ranks`` (list or None) and the ``pair_*`` lists.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from tasks import atomic
from tasks.atomic import TMP_PREFIX
from tasks.params import ParamsError

SHARD_GLOB = "shard-*.parquet"
# Written into every output folder a stage claims; names the stage whose outputs the folder holds.
STAGE_MARKER = ".pics-stage.json"


def shard_dir(path: str | Path) -> Path:
    """A decompose output folder or its ``shards/`` subfolder -> the folder holding the shards."""
    path = Path(path)
    return path / "shards" if (path / "shards").is_dir() else path


def list_shards(path: str | Path) -> list[Path]:
    """Committed shards in name order; temporary files of writers in progress are never listed."""
    d = shard_dir(path)
    return sorted(p for p in d.glob(SHARD_GLOB) if not p.name.startswith(TMP_PREFIX))


def content_hash(path: str | Path) -> str:
    """sha256 over the committed shards' names and bytes: equal iff the sample sets are identical."""
    h = hashlib.sha256()
    for p in list_shards(path):
        h.update(p.name.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kept_progress(out: Path, rec_path: Path, fingerprint: str) -> dict | None:
    """A finished shard's progress record, if the run that wrote it had the same fingerprint and
    the shard file it names is intact; otherwise None (the shard is done again)."""
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != fingerprint:
        return None
    if rec.get("file"):
        f = out / rec["file"]
        if not f.is_file() or sha256_file(f) != rec.get("sha256"):
            return None
    return rec


class OutputNotOwnedError(ParamsError):
    """An output folder holds files that the stage about to write there did not write."""


def check_output_owner(out: Path, stage: str, owned: set[str]) -> None:
    """Raise unless ``stage`` may clean, resume or replace ``out``: it is missing or empty, or it
    carries ``stage``'s marker and holds nothing but the top-level names in ``owned`` (and
    leftovers of killed writers). Touches nothing."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputNotOwnedError(f"{out}: output folder of {stage} is a file; choose another folder")
    entries = {p.name for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)}
    if not entries:
        return
    marker = out / STAGE_MARKER
    try:
        owner = json.loads(marker.read_text()).get("stage") if marker.is_file() else None
    except (OSError, json.JSONDecodeError, AttributeError):
        owner = None
    if owner is None:
        raise OutputNotOwnedError(
            f"{out}: not empty and not marked as an output folder of {stage} (no {STAGE_MARKER}); "
            f"{stage} deletes only what it wrote: choose an empty or new folder (a folder left by an "
            "older pics, which wrote no marker, can be removed by hand)")
    if owner != stage:
        raise OutputNotOwnedError(f"{out}: holds the output of {owner}, not of {stage}; choose another folder")
    foreign = sorted(entries - owned - {STAGE_MARKER})
    if foreign:
        raise OutputNotOwnedError(f"{out}: holds files that {stage} did not write ({', '.join(foreign[:5])}"
                                  f"{', ...' if len(foreign) > 5 else ''}); move them away or choose another folder")


def mark_output(out: Path, stage: str) -> None:
    """Mark ``out`` as ``stage``'s output folder (after :func:`check_output_owner` allowed it)."""
    atomic.write_json(out / STAGE_MARKER, {"stage": stage})


def claim_output(out: Path, stage: str, owned: set[str]) -> None:
    """:func:`check_output_owner`, then create and mark ``out``: call before anything in it is touched."""
    check_output_owner(out, stage, owned)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, stage)


def prepare_run_dir(out: Path, fingerprint: str, shards_dir: str, progress_dir: str, stage: str,
                    owned: set[str]) -> None:
    """Make ``out`` ready for a sharded run with ``fingerprint``: refused unless ``stage`` owns it
    (:func:`claim_output`); then a previous run's shards, progress, manifest and quarantine go when
    its fingerprint differs (another run's outputs, or none), and temporary files of writers
    killed mid-write go always."""
    claim_output(out, stage, owned | {shards_dir, progress_dir, "manifest.json", "quarantine.parquet"})
    run_file = out / progress_dir / "run.json"
    previous = json.loads(run_file.read_text()).get("fingerprint") if run_file.is_file() else None
    if previous != fingerprint:
        for d in (shards_dir, progress_dir):
            shutil.rmtree(out / d, ignore_errors=True)
        for f in ("manifest.json", "quarantine.parquet"):
            (out / f).unlink(missing_ok=True)
        atomic.write_json(run_file, {"fingerprint": fingerprint})
    for d in (out, out / shards_dir, out / progress_dir):
        d.mkdir(parents=True, exist_ok=True)
        atomic.clean_tmp(d)


class Timers:
    """Wall seconds per phase of a shard's work: ``with timers("encode"): ...``; totals in ``t``."""

    def __init__(self, keys: tuple[str, ...]):
        self.t = dict.fromkeys(keys, 0.0)

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[key] += time.perf_counter() - t0


def run_bounded_on_ray(remote, works: list, ctx, num_workers: int) -> list:
    """``remote.remote(work, ctx)`` for every work item on the running Ray, at most ``num_workers``
    at a time; results in the order of ``works`` (each item has an ``index``)."""
    import ray

    ctx_ref = ray.put(ctx)
    todo, in_flight, results = list(works), {}, {}
    while todo or in_flight:
        while todo and len(in_flight) < num_workers:
            w = todo.pop(0)
            in_flight[remote.remote(w, ctx_ref)] = w.index
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            results[in_flight.pop(ref)] = ray.get(ref)
    return [results[w.index] for w in works]


def square_geometry(width: int, height: int, resolution: int) -> tuple[float, int, int]:
    """(scale, pad_x, pad_y): source (x, y) lands at ((x + pad_x) * scale, (y + pad_y) * scale) in
    the target padded to a centred square and resized to ``resolution`` (the region map's frame)."""
    side = max(width, height)
    return resolution / side, (side - width) // 2, (side - height) // 2


def content_window(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    scale, px, py = square_geometry(width, height, resolution)
    return (int(math.floor(px * scale)), int(math.floor(py * scale)),
            int(math.ceil((px + width) * scale)), int(math.ceil((py + height) * scale)))


def _png(data: bytes, color: bool) -> np.ndarray:
    from tasks.decompose.sample import unpng

    return unpng(data, color)


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _masks(counts: list[str] | None, h: int, w: int) -> np.ndarray | None:
    if counts is None:
        return None
    import pycocotools.mask as mask_utils

    if not counts:
        return np.zeros((0, h, w), np.uint8)
    rles = [{"size": [h, w], "counts": c.encode("ascii")} for c in counts]
    return np.ascontiguousarray(np.transpose(mask_utils.decode(rles), (2, 0, 1)))


def decode_sample(row: dict) -> dict:
    """One shard row (a dict as ``Table.to_pylist`` gives) -> numpy arrays; see the module doc."""
    h, w = int(row["height"]), int(row["width"])
    region = _png(row["region_map"], color=False)
    out = {k: row[k] for k in ("sample_id", "split", "image_id", "source_image", "width", "height", "n_objects",
                              "annotation_ids", "category_ids", "category_names", "depth_ranks",
                              "pair_box_iou", "pair_mask_iou", "pair_contact_px") if k in row}
    out.update(
        image=decode_image(row["image_bytes"]),
        masks=_masks(row["masks_rle"], h, w),
        amodal_masks=_masks(row.get("amodal_rle"), h, w),
        boxes_tight=np.asarray(row["boxes_tight"], np.float32).reshape(-1, 4),
        boxes_expanded=np.asarray(row["boxes_expanded"], np.float32).reshape(-1, 4),
        patches=np.stack([_png(b, color=True) for b in row["patches"]]),
        patch_masks=np.stack([(_png(b, color=False) >= 128).astype(np.uint8) for b in row["patch_masks"]]),
        region_map=region,
        content_window=content_window(w, h, region.shape[0]),
    )
    return out


def read_rows(shard: str | Path, split: str | None = None, columns: list[str] | None = None) -> list[dict]:
    filters = [("split", "=", split)] if split else None
    return pq.read_table(shard, columns=columns, filters=filters).to_pylist()


def iter_rows(path: str | Path, split: str | None = None, columns: list[str] | None = None) -> Iterator[dict]:
    """Raw rows of every committed shard, in shard and row order (optionally one split)."""
    for shard in list_shards(path):
        pf = pq.ParquetFile(shard)
        for i in range(pf.num_row_groups):  # one row group at a time keeps memory flat
            for row in pf.read_row_group(i, columns=columns).to_pylist():
                if split is None or row["split"] == split:
                    yield row


def iter_samples(path: str | Path, split: str | None = None) -> Iterator[dict]:
    """Decoded samples (see :func:`decode_sample`) of every committed shard, in order."""
    for row in iter_rows(path, split):
        yield decode_sample(row)


def count_samples(path: str | Path, split: str | None = None) -> int:
    if split is None:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(path))
    return sum(len(read_rows(p, split, columns=["split"])) for p in list_shards(path))
