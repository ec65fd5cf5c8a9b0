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
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from pics_model.data import content_window
from pics_model.file_hashes import sha256_file
from tasks import atomic
from tasks.atomic import TMP_PREFIX
from tasks.codec import decode_png, decode_rgb
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
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


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
    region = decode_png(row["region_map"], "gray")
    out = {k: row[k] for k in ("sample_id", "split", "image_id", "source_image", "width", "height", "n_objects",
                              "annotation_ids", "category_ids", "category_names", "depth_ranks",
                              "pair_box_iou", "pair_mask_iou", "pair_contact_px") if k in row}
    out.update(
        image=decode_rgb(row["image_bytes"]),
        masks=_masks(row["masks_rle"], h, w),
        amodal_masks=_masks(row.get("amodal_rle"), h, w),
        boxes_tight=np.asarray(row["boxes_tight"], np.float32).reshape(-1, 4),
        boxes_expanded=np.asarray(row["boxes_expanded"], np.float32).reshape(-1, 4),
        patches=np.stack([decode_png(b, "rgb") for b in row["patches"]]),
        patch_masks=np.stack([(decode_png(b, "gray") >= 128).astype(np.uint8) for b in row["patch_masks"]]),
        region_map=region,
        content_window=content_window(h, w, region.shape[0]),
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
