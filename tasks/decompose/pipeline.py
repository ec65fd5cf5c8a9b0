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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tasks import atomic, quarantine
from tasks.decompose.inputs import STAGE, Dataset, check_image_root, load_annotations
from tasks.decompose.shard import PROGRESS_DIR, SHARDS_DIR, TIMING_KEYS, ShardContext, ShardWork, process_shard, shard_name
from tasks.quarantine import QuarantineRecord
from tasks.schema import SCHEMA_VERSION
from tasks.shards import content_hash, kept_progress, prepare_run_dir

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


def fingerprint(dataset: Dataset, image_root: Path, params: dict) -> str:
    keyed = {k: v for k, v in params.items() if k not in _NOT_IN_FINGERPRINT}
    blob = json.dumps({"annotations_sha256": dataset.sha256, "images": str(image_root.resolve()),
                       "params": keyed, "schema": SCHEMA_VERSION, "algorithm": ALGORITHM_VERSION},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_works(dataset: Dataset, shard_size: int) -> list[ShardWork]:
    ids = sorted(dataset.images)
    return [ShardWork(k // shard_size, [(dataset.images[i], dataset.anns_by_image.get(i, []))
                                        for i in ids[k:k + shard_size]])
            for k in range(0, len(ids), shard_size)]


def _kept(out: Path, name: str, fp: str) -> dict | None:
    return kept_progress(out, out / PROGRESS_DIR / f"{name}.json", fp)


def prepare(params: dict, annotations: str | Path, images: str | Path, out: str | Path) -> Plan:
    """Load and check inputs (fails at once on a malformed file or missing root), plan, resume."""
    out = Path(out)
    image_root = check_image_root(images)
    dataset = load_annotations(annotations)
    fp = fingerprint(dataset, image_root, params)
    ctx = ShardContext(str(image_root), str(out), str(dataset.path), params, dataset.categories, fp)
    works = plan_works(dataset, params["shard_size"])

    prepare_run_dir(out, fp, SHARDS_DIR, PROGRESS_DIR, STAGE, GRID_FILES)

    done: dict[str, dict] = {}
    pending: list[ShardWork] = []
    for w in works:
        rec = _kept(out, w.name, fp)
        if rec is None:
            (out / SHARDS_DIR / f"{w.name}.parquet").unlink(missing_ok=True)
            pending.append(w)
        else:
            done[w.name] = rec
    expected = {w.name for w in works}
    for f in (out / SHARDS_DIR).glob("*.parquet"):  # e.g. a shard count that shrank
        if f.stem not in expected:
            f.unlink()
    return Plan(dataset, ctx, works, pending, done)


def finalize(plan: Plan, results: list[dict]) -> dict:
    """Merge shard records into quarantine.parquet and manifest.json; returns the manifest."""
    out = Path(plan.ctx.out)
    records = {**plan.done, **{r["shard"]: r for r in results}}
    missing = [w.name for w in plan.works if w.name not in records]
    if missing:
        raise RuntimeError(f"{out}: shards without a result: {missing[:5]}")
    ordered = [records[w.name] for w in plan.works]

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
        "params": plan.ctx.params,
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
    return {k: round(sum(r.get("timings", {}).get(k, 0.0) for r in results), 4) for k in TIMING_KEYS}


def run_serial(params: dict, annotations, images, out) -> tuple[dict, list[dict]]:
    """The whole stage in this process, no Prefect and no Ray: the benchmark's one-worker baseline."""
    plan = prepare(params, annotations, images, out)
    results = [process_shard(w, plan.ctx) for w in plan.pending]
    return finalize(plan, results), results


__all__ = ["Plan", "prepare", "finalize", "run_serial", "plan_works", "fingerprint", "shard_name", "sum_timings",
           "quarantine_tallies"]
