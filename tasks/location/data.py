"""Location queries on disk: shards of (background, class, positive boxes, negative boxes + reasons).

One row per query (``SCHEMA``); boxes are flat xyxy lists in the background's pixels. Two sources
write the same rows: the embedded generator (:func:`generate`, removal renders of composed 3D
scenes, ``tasks.location.scenes``) and the OPA importer (``tasks.location.opa``). The output folder
holds ``shards/shard-*.parquet``, ``manifest.json`` and ``quarantine.parquet`` as decompose's does.
"""
from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from tasks import atomic, quarantine
from tasks.quarantine import QuarantineRecord
from tasks.shards import claim_output, content_hash, iter_rows

STAGE = "location-data"
SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("source", pa.string()),  # embedded | opa
    ("split", pa.string()),  # train | test
    ("background", pa.string()),  # scene index or OPA bg_id
    ("category", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image_bytes", pa.binary()),  # PNG (embedded) or the original file's bytes (OPA)
    ("positives", pa.list_(pa.float32())),  # flat xyxy, 4 per box
    ("negatives", pa.list_(pa.float32())),
    ("negative_reasons", pa.list_(pa.string())),  # one per negative box
    ("negative_details", pa.list_(pa.string())),
])


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def row(query_id: str, source: str, split: str, background: str, category: str, width: int, height: int,
        image_bytes: bytes, positives, negatives, reasons, details) -> dict:
    return {"query_id": query_id, "source": source, "split": split, "background": background, "category": category,
            "width": int(width), "height": int(height), "image_bytes": image_bytes,
            "positives": [float(v) for b in positives for v in b],
            "negatives": [float(v) for b in negatives for v in b],
            "negative_reasons": list(reasons), "negative_details": list(details)}


def decode_query(r: dict) -> dict:
    """A shard row -> image uint8 [H, W, 3], positives [P, 4], negatives [N, 4] float32 (xyxy px)."""
    with Image.open(io.BytesIO(r["image_bytes"])) as im:
        image = np.asarray(im.convert("RGB"))
    out = {k: r[k] for k in ("query_id", "source", "split", "background", "category", "width", "height",
                             "negative_reasons", "negative_details")}
    out.update(image=image, positives=np.asarray(r["positives"], np.float32).reshape(-1, 4),
               negatives=np.asarray(r["negatives"], np.float32).reshape(-1, 4))
    return out


def read_queries(path: str | Path, split: str | None = None) -> list[dict]:
    return [decode_query(r) for r in iter_rows(path, split)]


def write_shard(shards_dir: Path, index: int, rows: list[dict]) -> Path:
    return atomic.write_parquet(shards_dir / f"shard-{index:05d}.parquet", pa.Table.from_pylist(rows, schema=SCHEMA))


def run_works(fn, works: list, num_workers: int) -> list:
    """``fn(work)`` for every work item, in order: in this process, or on Ray with ``num_workers`` > 1.

    The stage's only fan-out, kept to one function so it can move onto the shared sharded-stage
    skeleton in one place."""
    if num_workers <= 1:
        return [fn(w) for w in works]
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    pending: list = []
    for w in works:  # at most num_workers in flight; ray.get keeps the order of ``works``
        if len(pending) - sum(1 for r in pending if _ready(r)) >= num_workers:
            ray.wait([r for r in pending if not _ready(r)], num_returns=1)
        pending.append(remote.remote(w))
    return ray.get(pending)


def _ready(ref) -> bool:
    import ray

    return not ray.wait([ref], timeout=0)[1]


def _split(seed: int, scene: int, test_fraction: float) -> str:
    u = np.random.default_rng(np.random.SeedSequence([seed, scene, 7])).uniform()
    return "test" if u < test_fraction else "train"


def generate_shard(work: dict) -> dict:
    """Render the scenes ``work["scenes"]`` and write their queries as shard ``work["index"]``."""
    from tasks.location.scenes import scene_queries
    from tasks.make_sample.renderer import get_renderer

    p = work["params"]
    renderer = get_renderer(p["width"], p["height"])
    rows, bad = [], []
    t0 = time.perf_counter()
    for s in work["scenes"]:
        try:
            qs = scene_queries(renderer, p["seed"], s, p["width"], p["height"], (p["min_objects"], p["max_objects"]),
                               p["removals_per_scene"], p["positives_per_query"], p["negatives_per_reason"],
                               p["shadows"])
        except Exception as e:  # one bad scene never stops the run; it is recorded
            bad.append(QuarantineRecord(STAGE, "scene_error", f"{type(e).__name__}: {e}", item_key=f"scene-{s}"))
            continue
        if not qs:
            bad.append(QuarantineRecord(STAGE, "no_removable_object_in_frame", item_key=f"scene-{s}"))
        for q in qs:
            rows.append(row(f"scene{s:05d}-obj{q.removed}", "embedded", _split(p["seed"], s, p["test_fraction"]),
                            str(s), q.category, p["width"], p["height"], png_bytes(q.image), q.positives,
                            q.negatives, q.reasons, q.details))
    write_shard(Path(work["shards_dir"]), work["index"], rows)
    return {"index": work["index"], "rows": len(rows), "scenes": len(work["scenes"]),
            "quarantine": bad, "seconds": time.perf_counter() - t0,
            "reasons": dict(Counter(r for x in rows for r in x["negative_reasons"])),
            "positives": sum(len(x["positives"]) // 4 for x in rows)}


def finalize(out: Path, results: list[dict], source: str, extra: dict | None = None) -> dict:
    """Write quarantine.parquet and manifest.json for the shards the results describe."""
    bad = [q for r in results for q in r["quarantine"]]
    quarantine.write(out / "quarantine.parquet", bad)
    reasons = Counter()
    for r in results:
        reasons.update(r["reasons"])
    manifest = {"stage": STAGE, "source": source, "shards": len(results), "queries": sum(r["rows"] for r in results),
                "positives": sum(r["positives"] for r in results), "negatives_by_reason": dict(sorted(reasons.items())),
                "quarantined": quarantine.counts(bad), "content_hash": content_hash(out / "shards"),
                "seconds": round(sum(r.get("seconds", 0.0) for r in results), 2), **(extra or {})}
    atomic.write_json(out / "manifest.json", manifest)
    return manifest


def generate(p, out: str | Path) -> dict:
    """The embedded location dataset (``p``: ``LocationParams``) under ``out``."""
    out = Path(out)
    claim_output(out, STAGE, {"shards", "manifest.json", "quarantine.parquet"})
    shards_dir = out / "shards"
    for old in shards_dir.glob("shard-*.parquet"):  # this stage wrote them (claim_output checked)
        old.unlink()
    shards_dir.mkdir(parents=True, exist_ok=True)
    fields = ("seed", "width", "height", "min_objects", "max_objects", "removals_per_scene", "positives_per_query",
              "negatives_per_reason", "shadows", "test_fraction")
    params = {k: getattr(p, k) for k in fields}
    scenes = list(range(p.num_scenes))
    works = [{"index": i, "scenes": scenes[s:s + p.shard_size], "params": params, "shards_dir": str(shards_dir)}
             for i, s in enumerate(range(0, len(scenes), p.shard_size))]
    results = run_works(generate_shard, works, p.num_workers)
    return finalize(out, results, "embedded", {"scenes": len(scenes), "params": params})


def quarantine_tallies(manifest: dict) -> dict[str, tuple[int, dict[str, int]]]:
    return {"scenes": (manifest.get("scenes", manifest["queries"]), manifest["quarantined"])}
