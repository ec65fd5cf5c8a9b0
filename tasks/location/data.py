"""Location queries on disk: shards of (background, class, positive boxes, negative boxes + reasons).

One row per query (``SCHEMA``); boxes are flat xyxy lists in the background's pixels. Two sources
write the same rows: the embedded generator (:func:`generate`, removal renders of composed 3D
scenes, ``tasks.location.scenes``) and the OPA importer (``tasks.location.opa``). The output folder
holds ``shards/shard-*.parquet``, ``manifest.json`` and ``quarantine.parquet`` as decompose's does;
the generator is a ``tasks.sharded_stage`` stage (:data:`LOCATION_DATA`: one shard of
``shard_size`` scenes per worker, finished shards kept when a killed run is started again).
"""
from __future__ import annotations

import io
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from tasks import atomic, quarantine, sharded_stage
from tasks.codec import png_bytes
from tasks.quarantine import QuarantineRecord
from tasks.shards import content_hash, iter_rows

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


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(shards_dir: Path, index: int, rows: list[dict]) -> str:
    """Query rows as shard ``index``; returns the file's sha256."""
    return sharded_stage.write_shard(shards_dir / f"{shard_name(index)}.parquet",
                                     pa.Table.from_pylist(rows, schema=SCHEMA))


# Bump when the generator's output for the same parameters changes, so old shards are not resumed.
ALGORITHM_VERSION = 2  # 2: ground positives for flat-based objects (rest compared with CONTACT_GAP)
# What decides the shards' bytes: the scenes (num_scenes, shard_size decide which scenes a shard
# holds) and how they are rendered. num_workers only changes how many run at once.
DATA_FIELDS = ("num_scenes", "shard_size", "seed", "width", "height", "min_objects", "max_objects",
               "removals_per_scene", "positives_per_query", "negatives_per_reason", "shadows", "test_fraction")


def data_params(p) -> dict:
    """The ``LocationParams`` fields the embedded generator reads."""
    return {k: getattr(p, k) for k in DATA_FIELDS}


@dataclass(frozen=True)
class SceneWork:
    index: int
    scenes: list[int]

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass(frozen=True)
class DataContext:
    out: str
    params: dict
    fingerprint: str


@dataclass
class Plan:
    ctx: DataContext
    works: list[SceneWork]  # every shard of the dataset
    done: dict[str, dict]  # progress records kept from an earlier run

    @property
    def pending(self) -> list[SceneWork]:
        return [w for w in self.works if w.name not in self.done]


def prepare(params: dict, out: str | Path) -> Plan:
    """Claim ``out``, keep the shards an earlier run with the same parameters finished, plan the rest."""
    out = Path(out)
    fp = sharded_stage.fingerprint(params, set(), ALGORITHM_VERSION)
    sharded_stage.prepare_run_dir(out, fp, STAGE, set())
    done = sharded_stage.resume(out, fp)
    scenes, size = list(range(params["num_scenes"])), params["shard_size"]
    works = [SceneWork(i, scenes[s:s + size]) for i, s in enumerate(range(0, len(scenes), size))]
    return Plan(DataContext(str(out), params, fp), works, done)


def _split(seed: int, scene: int, test_fraction: float) -> str:
    u = np.random.default_rng(np.random.SeedSequence([seed, scene, 7])).uniform()
    return "test" if u < test_fraction else "train"


def process_shard(work: SceneWork, ctx: DataContext) -> dict:
    """Render the scenes of ``work``, write their queries as its shard, then its progress record."""
    from tasks.location.scenes import scene_queries
    from tasks.make_sample.renderer import get_renderer

    p = ctx.params
    renderer = get_renderer(p["width"], p["height"])
    rows, bad = [], []
    t0 = time.perf_counter()
    for s in work.scenes:
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
    out = Path(ctx.out)
    sha = write_shard(out / sharded_stage.SHARDS_DIR, work.index, rows) if rows else None
    record = {"shard": work.name, "fingerprint": ctx.fingerprint,
              "file": f"{sharded_stage.SHARDS_DIR}/{work.name}.parquet" if rows else None, "sha256": sha,
              "rows": len(rows), "scenes": len(work.scenes), "quarantine": [asdict(q) for q in bad],
              "seconds": time.perf_counter() - t0,
              "reasons": dict(Counter(r for x in rows for r in x["negative_reasons"])),
              "positives": sum(len(x["positives"]) // 4 for x in rows)}
    sharded_stage.write_progress(out, record)
    return record


def finalize(plan: Plan, results: list[dict], wall_s: float | None = None) -> dict:
    """Merge the kept and new shard records into quarantine.parquet and manifest.json."""
    out = Path(plan.ctx.out)
    records = sharded_stage.merge_records(out, plan.done, results, [w.name for w in plan.works])
    records = [{**r, "quarantine": [QuarantineRecord(**q) for q in r["quarantine"]]} for r in records]
    params = {k: v for k, v in plan.ctx.params.items() if k not in ("num_scenes", "shard_size")}
    return write_manifest(out, records, "embedded", {
        "scenes": plan.ctx.params["num_scenes"], "params": params, "fingerprint": plan.ctx.fingerprint,
        "kept_from_earlier_runs": len(plan.done), "wall_s": None if wall_s is None else round(wall_s, 2)})


def write_manifest(out: Path, results: list[dict], source: str, extra: dict | None = None) -> dict:
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


# The embedded generator on the sharded-stage skeleton: prepare(data_params(p), out)
LOCATION_DATA = sharded_stage.ShardedStage(STAGE, prepare, process_shard, finalize)


def generate(p, out: str | Path) -> dict:
    """The embedded location dataset (``p``: ``LocationParams``) under ``out``, in this process."""
    return sharded_stage.run_serial(LOCATION_DATA, data_params(p), out)[1]


def quarantine_tallies(manifest: dict) -> dict[str, tuple[int, dict[str, int]]]:
    return {"scenes": (manifest.get("scenes", manifest["queries"]), manifest["quarantined"])}
