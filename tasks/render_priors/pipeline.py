"""Scan samples, plan output shards, resume a killed run, merge records into manifest/quarantine.

Output folder::

    shards/priors-NNNNN.parquet  PRIOR_SCHEMA rows, one per distinct object (object_key)
    _progress/priors-NNNNN.json  per-shard record: keys rendered, quarantine records, timings
    _progress/run.json           fingerprint of the parameters these shards were made with
    quarantine.parquet           every object that could not be rendered, with its reason
    manifest.json                counts (they add up), timings, shard list, renderer
    priors.png                   the picture (flow only)

Objects are keyed by ``tasks.schema.object_key`` (a hash of patch + mask bytes), so an object
seen in several samples renders once, and a resumed or extended run renders only keys it has not
done. A shard counts as done when its progress record has this run's fingerprint and its parquet
has the recorded sha256; a changed rendering parameter invalidates every shard. Quarantined keys
are not retried on resume (the record says why they failed).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pics_model.file_hashes import sha256_file
from tasks import atomic, quarantine, sharded_stage
from tasks.params import ParamsError, RenderPriorsParams
from tasks.quarantine import QuarantineRecord
from tasks.render_priors.work import STAGE, TIMING_KEYS, ObjectLoc, RenderContext, ShardWork, process_shard
from tasks.schema import SCHEMA_VERSION, object_key
from tasks.sharded_stage import merge_records, prepare_run_dir, resume
from tasks.shards import content_hash, list_shards, shard_dir

# Bump when the code's output for the same inputs changes, so old shards are not resumed.
ALGORITHM_VERSION = 1
# Parameters that change how, not what: a killed run may be resumed with other values.
_NOT_IN_FINGERPRINT = {"samples", "out", "shard_size", "num_workers", "platform", "gl_threads", "grid_objects",
                       "max_quarantine_fraction"}
_SCAN_COLUMNS = ["sample_id", "image_id", "annotation_ids", "patches", "patch_masks"]


@dataclass
class Scan:
    samples: int = 0
    object_refs: int = 0  # objects over all samples, duplicates included
    objects: list[ObjectLoc] = field(default_factory=list)  # distinct, first occurrence, scan order
    quarantine: list[QuarantineRecord] = field(default_factory=list)


@dataclass
class Plan:
    ctx: RenderContext
    scan: Scan
    works: list[ShardWork]  # shards to render in this run
    done: dict[str, dict]  # progress records kept from earlier runs
    done_keys: set[str]
    scan_s: float = 0.0

    @property
    def pending(self) -> list[ShardWork]:
        return self.works


def fingerprint(params: RenderPriorsParams) -> str:
    keyed = params.model_dump()
    w = params.reconstructor_weights
    if w and Path(w).expanduser().is_file():
        keyed["weights_sha256"] = sha256_file(Path(w).expanduser())
    return sharded_stage.fingerprint(keyed, _NOT_IN_FINGERPRINT, ALGORITHM_VERSION)


def scan_samples(samples: Path) -> Scan:
    """Stream the sample shards (two binary columns, one row group at a time) and key each object."""
    scan, seen = Scan(), set()
    for shard in list_shards(samples):
        pf = pq.ParquetFile(shard)
        row = 0
        for g in range(pf.num_row_groups):
            for r in pf.read_row_group(g, columns=_SCAN_COLUMNS).to_pylist():
                scan.samples += 1
                patches, masks, anns = r["patches"] or [], r["patch_masks"] or [], r["annotation_ids"] or []
                if len(patches) != len(masks):
                    scan.quarantine.append(QuarantineRecord(
                        STAGE, "bad_sample", f"{len(patches)} patches but {len(masks)} patch_masks",
                        shard.name, r["image_id"], None, r["sample_id"] or ""))
                for i, (pb, mb) in enumerate(zip(patches, masks)):
                    scan.object_refs += 1
                    key = object_key(pb or b"", mb or b"")
                    if key in seen:
                        continue
                    seen.add(key)
                    scan.objects.append(ObjectLoc(key, shard.name, row, i, r["sample_id"] or "", r["image_id"],
                                                  anns[i] if i < len(anns) else None))
                row += 1
    return scan


def prepare(params: RenderPriorsParams, samples: str | Path, out: str | Path) -> Plan:
    """Check inputs, resume what an earlier run with the same parameters finished, plan the rest."""
    from pics_model.geometry import ReconstructorNotFoundError, WeightsNotFoundError, get_reconstructor
    from tasks.render_priors.work import reconstructor_options

    t0 = time.perf_counter()
    samples, out = shard_dir(samples), Path(out)
    if not list_shards(samples):
        raise ParamsError(f"render_priors.samples: {samples} holds no sample shards (shard-*.parquet); "
                          "run decompose first")
    # A missing plug-in or weight file fails here, before any worker starts.
    try:
        get_reconstructor(params.reconstructor, params.reconstructor_weights, **reconstructor_options(params))
    except (ReconstructorNotFoundError, WeightsNotFoundError) as e:
        key = "reconstructor" if isinstance(e, ReconstructorNotFoundError) else "reconstructor_weights"
        raise ParamsError(f"render_priors.{key}: {e}") from e
    fp = fingerprint(params)
    prepare_run_dir(out, fp, STAGE, {"priors.png"})
    done = resume(out, fp)
    done_keys = {k for r in done.values() for k in r["keys"]}
    done_keys |= {q["item_key"] for r in done.values() for q in r["quarantine"]}

    scan = scan_samples(samples)
    pending = [o for o in scan.objects if o.key not in done_keys]
    start = 1 + max((int(n.split("-")[1]) for n in done), default=-1)
    size = params.shard_size
    works = [ShardWork(start + i, pending[k:k + size]) for i, k in enumerate(range(0, len(pending), size))]
    ctx = RenderContext(str(samples), str(out), params, fp)
    return Plan(ctx, scan, works, done, done_keys, scan_s=time.perf_counter() - t0)


def sum_timings(results: list[dict]) -> dict[str, float]:
    return sharded_stage.sum_timings(results, TIMING_KEYS)


def finalize(plan: Plan, results: list[dict], wall_s: float | None = None) -> dict:
    """Merge shard records into quarantine.parquet and manifest.json; returns the manifest."""
    out = Path(plan.ctx.out)
    records = merge_records(out, plan.done, results, sorted({*plan.done, *(w.name for w in plan.works)}))
    qrecs = list(plan.scan.quarantine) + [QuarantineRecord(**q) for r in records for q in r["quarantine"]]
    quarantine.write(out / "quarantine.parquet", qrecs)

    rendered = {k for r in records for k in r["keys"]}
    failed = {q.item_key for q in qrecs if q.reason != "bad_sample"}
    distinct = {o.key for o in plan.scan.objects}
    unaccounted = distinct - rendered - failed
    if unaccounted:
        raise RuntimeError(f"{out}: {len(unaccounted)} objects neither rendered nor quarantined")
    run_views = sum(r["views"] for r in results)
    timings = sum_timings(results)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": STAGE,
        "inputs": {"samples": plan.ctx.samples, "samples_content_hash": content_hash(plan.ctx.samples)},
        "params": plan.ctx.params.model_dump(),
        "fingerprint": plan.ctx.fingerprint,
        "samples": plan.scan.samples,
        "object_refs": plan.scan.object_refs,
        "distinct_objects": len(distinct),
        "duplicates": plan.scan.object_refs - len(distinct),
        "rendered": len(distinct & rendered),
        "quarantined": dict(sorted(quarantine.counts([q for q in qrecs if q.item_key in distinct]).items())),
        "kept_from_earlier_runs": len(distinct & plan.done_keys),
        "rendered_this_run": sum(r["rendered"] for r in results),
        "quarantined_this_run": sum(len(r["quarantine"]) for r in results),
        "stale_priors": len(rendered - distinct),  # rendered earlier for samples no longer present
        "quarantine_rows": len(qrecs),
        "priors_rows": len(rendered),
        "shards": [{"file": r["file"], "objects": r["rendered"], "sha256": r["sha256"]} for r in records if r["file"]],
        "timing": {
            "scan_s": round(plan.scan_s, 4),
            "wall_s": None if wall_s is None else round(wall_s, 4),
            "worker_s": timings,
            "render_ms_per_view": round(1e3 * timings["render"] / run_views, 3) if run_views else None,
            "objects_per_s_wall": round(sum(r["objects"] for r in results) / wall_s, 3) if wall_s and results else None,
        },
        "renderer": {"platform": plan.ctx.params.platform,
                     "gl_renderer": next((r.get("gl_renderer") for r in results if r.get("gl_renderer")), None)},
    }
    n_failed = sum(manifest["quarantined"].values())
    if manifest["rendered"] + n_failed != manifest["distinct_objects"]:
        raise RuntimeError(f"{out}: counts do not add up: {manifest['rendered']} rendered + {n_failed} "
                           f"quarantined != {manifest['distinct_objects']} distinct objects")
    atomic.write_json(out / "manifest.json", manifest)
    return manifest


def quarantine_tallies(manifest: dict) -> dict[str, tuple[int, dict[str, int]]]:
    """What :func:`tasks.quarantine.check_limit` weighs: distinct objects, seen and quarantined."""
    return {"objects": (manifest["distinct_objects"], manifest["quarantined"])}


def gl_env(ctx: RenderContext) -> dict:
    """Ray options of the shard tasks: the GL platform is bound when a process first imports
    OpenGL, so the tasks carry it (and llvmpipe's thread count) in their ``runtime_env``: Ray then
    runs them in workers started with those variables, never in one that bound another platform."""
    p = ctx.params
    return {"runtime_env": {"env_vars": {"PYOPENGL_PLATFORM": p.platform, "LP_NUM_THREADS": str(p.gl_threads)}}}


# render_priors on the sharded-stage skeleton: prepare(params, samples, out)
RENDER_PRIORS = sharded_stage.ShardedStage(STAGE, prepare, process_shard, finalize, ray_options=gl_env)


def run_serial(params: RenderPriorsParams, samples, out) -> tuple[dict, list[dict]]:
    """The whole stage in this process, no Prefect and no Ray (tests, the benchmark's baseline)."""
    _, manifest, results = sharded_stage.run_serial(RENDER_PRIORS, params, samples, out)
    return manifest, results


__all__ = ["RENDER_PRIORS", "Plan", "Scan", "prepare", "finalize", "run_serial", "scan_samples", "fingerprint", "sum_timings",
           "quarantine_tallies"]
