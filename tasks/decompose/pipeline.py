"""Plan shards, resume a killed run, and merge shard records into the manifest and quarantine.

Output folder::

    shards/shard-NNNNN.parquet   samples (SAMPLE_SCHEMA); a shard whose images gave no sample has none
    _progress/shard-NNNNN.json   per-shard counts and quarantine records (written after the parquet)
    _progress/run.json           fingerprint of inputs + params of the run these shards belong to
    quarantine.parquet           every quarantined image and annotation, with ids and reason
    manifest.json                counts (they add up), params, shard list, content hash

Resume: a shard is done when its progress record exists with this run's fingerprint and its
parquet file (if any) has the recorded sha256. Anything else of an earlier run is removed: a
changed parameter or input invalidates every shard, since a sample depends on all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks import atomic, quarantine, sharded_stage
from tasks.decompose.inputs import STAGE, Dataset, check_image_root, load_annotations
from tasks.decompose.shard import TIMING_KEYS, ShardContext, ShardWork, process_shard
from tasks.params import DecomposeParams
from tasks.quarantine import QuarantineRecord
from tasks.schema import SCHEMA_VERSION
from tasks.sharded_stage import merge_records, prepare_run_dir, resume, shard_name
from tasks.shards import content_hash

# Bump when the code's output for the same inputs changes, so old shards are not resumed.
ALGORITHM_VERSION = 1
# Parameters that change how, not what: they may differ between a killed run and its resume.
_NOT_IN_FINGERPRINT = {"num_workers", "out", "grid_samples", "max_quarantine_fraction"}
# The flow's picture of samples (tasks.decompose.visualize.write_sample_grid), also in the output folder.
GRID_FILES = {"samples.png", "samples.html"}


@dataclass
class Plan:
    dataset: Dataset
    ctx: ShardContext
    works: list[ShardWork]  # every shard, in order
    pending: list[ShardWork]  # shards still to do
    done: dict[str, dict]  # shard name -> progress record of shards kept from an earlier run


def fingerprint(dataset: Dataset, image_root: Path, params: DecomposeParams) -> str:
    return sharded_stage.fingerprint(params.model_dump(), _NOT_IN_FINGERPRINT, ALGORITHM_VERSION,
                                     annotations_sha256=dataset.sha256, images=str(image_root.resolve()))


def plan_works(dataset: Dataset, shard_size: int) -> list[ShardWork]:
    ids = sorted(dataset.images)
    return [ShardWork(k // shard_size, [(dataset.images[i], dataset.anns_by_image.get(i, []))
                                        for i in ids[k:k + shard_size]])
            for k in range(0, len(ids), shard_size)]


def prepare(params: DecomposeParams, annotations: str | Path, images: str | Path, out: str | Path) -> Plan:
    """Load and check inputs (fails at once on a malformed file or missing root), plan, resume."""
    out = Path(out)
    image_root = check_image_root(images)
    dataset = load_annotations(annotations)
    fp = fingerprint(dataset, image_root, params)
    ctx = ShardContext(str(image_root), str(out), str(dataset.path), params, dataset.categories, fp)
    works = plan_works(dataset, params.shard_size)

    prepare_run_dir(out, fp, STAGE, GRID_FILES)
    kept = resume(out, fp)  # same fingerprint, so same shard_size: the kept names are planned ones
    pending = [w for w in works if w.name not in kept]
    return Plan(dataset, ctx, works, pending, {w.name: kept[w.name] for w in works if w.name in kept})


def finalize(plan: Plan, results: list[dict], wall_s: float | None = None) -> dict:
    """Merge shard records into quarantine.parquet and manifest.json; returns the manifest
    (``wall_s``, the skeleton's run time, is not recorded: the manifest stays byte-stable)."""
    out = Path(plan.ctx.out)
    ordered = merge_records(out, plan.done, results, [w.name for w in plan.works])

    qrecs = list(plan.dataset.quarantine)
    for r in ordered:
        qrecs.extend(QuarantineRecord(**q) for q in r["quarantine"])
    qrecs.sort(key=lambda q: (q.image_id if q.image_id is not None else -1,
                              q.annotation_id if q.annotation_id is not None else -1, q.reason))
    quarantine.write(out / "quarantine.parquet", qrecs)

    def total(key: str) -> dict[str, int]:
        acc: dict[str, int] = {}
        for r in ordered:
            for k, v in r[key].items():
                acc[k] = acc.get(k, 0) + v
        return dict(sorted(acc.items()))

    ann_q = total("quarantined_annotations")
    for q in plan.dataset.quarantine:  # found while loading: unknown image / category
        ann_q[q.reason] = ann_q.get(q.reason, 0) + 1
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": "decompose",
        "inputs": {"annotations": plan.ctx.annotations, "format": plan.dataset.format,
                   "annotations_sha256": plan.dataset.sha256, "images": plan.ctx.image_root},
        "params": plan.ctx.params.model_dump(),
        "images_seen": sum(r["images_seen"] for r in ordered),
        "annotations_seen": sum(map(len, plan.dataset.anns_by_image.values())) + len(plan.dataset.quarantine),
        "images_with_pair": sum(r["images_with_pair"] for r in ordered),
        "samples": sum(r["samples"] for r in ordered),
        "splits": total("splits"),
        "skipped": total("skipped"),
        "quarantined": total("quarantined"),  # images, by reason
        "quarantined_annotations": dict(sorted(ann_q.items())),  # annotations (their image may still pair)
        "quarantine_rows": len(qrecs),
        "shards": [{"file": r["file"], "samples": r["samples"], "sha256": r["sha256"]} for r in ordered if r["file"]],
        "content_hash": content_hash(out),
    }
    n = manifest["images_with_pair"] + sum(manifest["skipped"].values()) + sum(manifest["quarantined"].values())
    if n != manifest["images_seen"] or manifest["images_seen"] != len(plan.dataset.images):
        raise RuntimeError(f"{out}: counts do not add up: {n} binned vs {manifest['images_seen']} seen")
    atomic.write_json(out / "manifest.json", manifest)
    return manifest


def quarantine_tallies(manifest: dict) -> dict[str, tuple[int, dict[str, int]]]:
    """What :func:`tasks.quarantine.check_limit` weighs: images and annotations, seen and quarantined."""
    return {"images": (manifest["images_seen"], manifest["quarantined"]),
            "annotations": (manifest["annotations_seen"], manifest["quarantined_annotations"])}


def sum_timings(results: list[dict]) -> dict[str, float]:
    return sharded_stage.sum_timings(results, TIMING_KEYS)


# decompose on the sharded-stage skeleton: prepare(params, annotations, images, out)
DECOMPOSE = sharded_stage.ShardedStage(STAGE, prepare, process_shard, finalize)


def run_serial(params: DecomposeParams, annotations, images, out) -> tuple[dict, list[dict]]:
    """The whole stage in this process, no Prefect and no Ray: the benchmark's one-worker baseline."""
    _, manifest, results = sharded_stage.run_serial(DECOMPOSE, params, annotations, images, out)
    return manifest, results


__all__ = ["DECOMPOSE", "Plan", "prepare", "finalize", "run_serial", "plan_works", "fingerprint", "shard_name",
           "sum_timings", "quarantine_tallies"]
