"""One output shard in one worker: read its objects, reconstruct, render K views, write the shard.

The worker writes the parquet itself (then its progress record) and returns only that small
record, so no view bytes travel back to the driver. One reconstructor and one renderer per
worker process (``get_reconstructor`` / ``get_renderer`` caches), reused across shards.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import sharded_stage
from tasks.codec import decode_png, encode_rgba
from tasks.params import RenderPriorsParams
from tasks.quarantine import QuarantineRecord
from tasks.schema import PRIOR_SCHEMA
from tasks.sharded_stage import SHARDS_DIR, Timers, write_progress, write_shard

STAGE = "render_priors"
TIMING_KEYS = ("read", "decode", "reconstruct", "render", "encode", "write")


@dataclass(frozen=True)
class ObjectLoc:
    """Where one distinct object lives in the samples (its first occurrence)."""

    key: str
    shard: str  # sample shard file name
    row: int
    index: int  # object index within the sample
    sample_id: str
    image_id: int | None
    annotation_id: int | None


@dataclass
class ShardWork(sharded_stage.ShardWork):
    objects: list[ObjectLoc]
    prefix: ClassVar[str] = "priors"


@dataclass(frozen=True)
class RenderContext:
    samples: str  # folder holding the sample shards
    out: str
    params: RenderPriorsParams
    fingerprint: str


def renderer_config(p: RenderPriorsParams) -> dict:
    return dict(resolution=p.resolution, num_views=p.num_views, elevation_deg=p.elevation_deg,
                yfov_deg=p.yfov_deg, platform=p.platform)


def reconstructor_options(p: RenderPriorsParams) -> dict:
    # Inflation knobs only apply to the built-in; a plug-in gets its weights and nothing else.
    return dict(grid_size=p.grid_size, thickness=p.thickness) if p.reconstructor == "builtin" else {}


_RECONSTRUCTORS: dict = {}


def get_worker_reconstructor(p: RenderPriorsParams):
    from pics_model.geometry import get_reconstructor

    key = (p.reconstructor, p.reconstructor_weights, tuple(sorted(reconstructor_options(p).items())))
    if key not in _RECONSTRUCTORS:  # a learned model loads its weights once per process
        _RECONSTRUCTORS[key] = get_reconstructor(p.reconstructor, p.reconstructor_weights,
                                                 **reconstructor_options(p))
    return _RECONSTRUCTORS[key]


def encode_depth(depth: np.ndarray) -> bytes:
    return np.ascontiguousarray(depth, dtype="<f4").tobytes()


def read_objects(samples: Path, objects: list[ObjectLoc]) -> dict[str, tuple[bytes, bytes]]:
    """key -> (patch PNG, mask PNG), reading each sample shard once (only the two columns)."""
    by_shard: dict[str, list[ObjectLoc]] = defaultdict(list)
    for o in objects:
        by_shard[o.shard].append(o)
    out = {}
    for shard, locs in by_shard.items():
        rows = sorted({o.row for o in locs})
        t = pq.read_table(samples / shard, columns=["patches", "patch_masks"]).take(rows)
        pos = {r: i for i, r in enumerate(rows)}
        patches, masks = t.column("patches").to_pylist(), t.column("patch_masks").to_pylist()
        for o in locs:
            i = pos[o.row]
            out[o.key] = (patches[i][o.index], masks[i][o.index])
    return out


def _quarantine(o: ObjectLoc, reason: str, detail: str) -> QuarantineRecord:
    return QuarantineRecord(stage=STAGE, reason=reason, detail=detail[:500], source=o.shard,
                            image_id=o.image_id, annotation_id=o.annotation_id, item_key=o.key)


def render_object(patch_png: bytes, mask_png: bytes, p: RenderPriorsParams, timers: Timers):
    """-> (views RGBA [K, R, R, 4], depths [K, R, R]) or raises GeometryError / ValueError."""
    from pics_model.geometry import EmptyMaskError, get_renderer

    with timers("decode"):
        patch, mask = decode_png(patch_png, "rgb"), decode_png(mask_png, "gray")
        if mask.shape != patch.shape[:2]:
            raise ValueError(f"mask {mask.shape} and patch {patch.shape[:2]} differ in size")
        if not (mask >= 128).any():
            raise EmptyMaskError("patch mask has no pixel >= 128")
    with timers("reconstruct"):
        mesh = get_worker_reconstructor(p)(patch, mask >= 128)
    with timers("render"):
        views = get_renderer(**renderer_config(p)).render(mesh)
    return views


def process_shard(work: ShardWork, ctx: RenderContext) -> dict:
    """Render every object of ``work`` and write ``shards/<name>.parquet`` then its progress record."""
    from pics_model.geometry import GeometryError, RendererError, drop_renderer

    p, out, timers = ctx.params, Path(ctx.out), Timers(TIMING_KEYS)
    t0 = time.perf_counter()
    with timers("read"):
        blobs = read_objects(Path(ctx.samples), work.objects)
    rows, qrecs = [], []
    for o in work.objects:
        patch_png, mask_png = blobs[o.key]
        try:
            views = render_object(patch_png, mask_png, p, timers)
        except GeometryError as e:
            qrecs.append(_quarantine(o, e.reason, str(e)))
            if isinstance(e, RendererError):  # a GL error may leave the context unusable
                drop_renderer(**renderer_config(p))
            continue
        except ValueError as e:  # undecodable PNG, size mismatch
            qrecs.append(_quarantine(o, "bad_patch", str(e)))
            continue
        except Exception as e:  # a plug-in's own failure: quarantine with its text, go on
            qrecs.append(_quarantine(o, "reconstruct_error", f"{type(e).__name__}: {e}"))
            continue
        with timers("encode"):
            rows.append({
                "object_key": o.key, "num_views": int(views.color.shape[0]), "resolution": p.resolution,
                "elevation_deg": float(views.elevation_deg),
                "azimuths_deg": [float(a) for a in views.azimuths_deg],
                "views": [encode_rgba(c) for c in views.color],
                "depths": [encode_depth(d) for d in views.depth],
                "reconstructor": p.reconstructor,
            })
    record = {"shard": work.name, "fingerprint": ctx.fingerprint, "objects": len(work.objects),
              "rendered": len(rows), "views": sum(r["num_views"] for r in rows),
              "quarantined": dict(Counter(q.reason for q in qrecs)),
              "quarantine": [asdict(q) for q in qrecs], "keys": [r["object_key"] for r in rows],
              "file": None, "sha256": None}
    with timers("write"):
        if rows:
            path = out / SHARDS_DIR / f"{work.name}.parquet"
            table = pa.Table.from_pylist(rows, schema=PRIOR_SCHEMA)
            # PNG views are compressed already; depths are not
            record["sha256"] = write_shard(path, table, compression="zstd", use_dictionary=False)
            record["file"] = f"{SHARDS_DIR}/{path.name}"
    record["timings"] = {k: round(v, 4) for k, v in timers.t.items()}
    record["wall_s"] = round(time.perf_counter() - t0, 4)
    from pics_model.geometry import get_renderer

    record["gl_renderer"] = get_renderer(**renderer_config(p)).gl_renderer if rows else None
    write_progress(out, record)
    return record
