"""decompose flow: an LVIS/COCO-format dataset -> shards of interacting object groups.

``pics decompose [--set decompose.key=value ...] [--params FILE]``.
One Prefect task loads and checks the inputs, one Prefect task per shard runs that shard as a Ray
task (never a task per image), a last task merges the manifest; the flow then draws the sample
grid and publishes it as an artifact. Killed and started again, it keeps the finished shards.
"""
from __future__ import annotations

from pathlib import Path

import flows  # noqa: F401  (offline Prefect/Ray environment before Prefect is imported)
from flows.sharded import log_outcome, publish, run_stage
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import quarantine
from tasks.decompose import pipeline
from tasks.params import Params, resolve_path, stage_params

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


def _describe(plan: pipeline.Plan) -> str:
    return (f"{plan.dataset.path} ({plan.dataset.format}): {len(plan.dataset.images)} images in {len(plan.works)} "
            f"shards, {len(plan.pending)} to do, {len(plan.done)} kept from an earlier run")


def _publish(manifest: dict, grid: Path | None, out: Path) -> None:
    lines = [f"# decompose: {manifest['samples']} samples from {manifest['images_seen']} images",
             "", f"output: `{out}`", "", "| count | value |", "|---|---|"]
    for k in ("images_seen", "images_with_pair", "samples", "quarantine_rows"):
        lines.append(f"| {k} | {manifest[k]} |")
    for k in ("skipped", "quarantined", "quarantined_annotations"):
        for reason, v in manifest[k].items():
            lines.append(f"| {k}: {reason} | {v} |")
    lines += ["", f"content hash `{manifest['content_hash']}`"]
    publish("decompose-samples", "decompose: counts and a grid of samples", lines, grid, max_side=1120,
            alt="samples", caption=grid and f"full size: `{grid}` and `{grid.with_suffix('.html')}`")


@flow(name="decompose")
def decompose_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.decompose
    out = resolve_path(p.out)
    plan, manifest, results = run_stage(
        pipeline.DECOMPOSE, (p, str(resolve_path(p.annotations)), str(resolve_path(p.images)), str(out)),
        p.num_workers, params.ray, _describe)
    grid = None
    if p.grid_samples:
        from tasks.decompose.visualize import write_sample_grid

        grid = write_sample_grid(out, n=p.grid_samples)
    _publish(manifest, grid, out)
    log_outcome(pipeline.DECOMPOSE, out, f"{manifest['samples']} samples, skipped {manifest['skipped']}, "
                f"quarantined {manifest['quarantined']}", pipeline.quarantine_tallies(manifest),
                p.max_quarantine_fraction)
    return {
        "out": str(out),
        "images_seen": manifest["images_seen"],
        "images_with_pair": manifest["images_with_pair"],
        "samples": manifest["samples"],
        "skipped": manifest["skipped"],
        "quarantined": manifest["quarantined"],
        "content_hash": manifest["content_hash"],
        "shards_run": len(results),
        "shards_kept": len(plan.done),
        "timings_s": pipeline.sum_timings(results),
        "grid": str(grid) if grid else None,
    }


@flow(name="import-webdataset")
def import_webdataset_flow(tars: list[str], out: str, overrides: list[str] | None = None,
                           params: Params | None = None) -> dict:
    """Reference WebDataset tar shards -> our shards; one Prefect task per tar (each one output shard)."""
    from tasks.decompose import webdataset

    p = stage_params(params, overrides).decompose
    out_path = Path(out)
    webdataset.check_tars(tars)
    webdataset.clear_output(out_path)
    tar_task = task(name="import-tar", task_run_name="import-{index}", **_TASK)(webdataset.import_tar)
    labelled = webdataset.tar_labels([str(t) for t in tars])
    futures = [tar_task.submit(t, str(out_path), i, p, label) for i, (t, label) in enumerate(labelled)]
    results = [f.result() for f in futures]
    manifest = webdataset.finalize(out_path, results, p, [t for t, _ in labelled])
    if p.grid_samples and manifest["samples"]:
        from tasks.decompose.visualize import write_sample_grid

        write_sample_grid(out_path, n=p.grid_samples)
    get_run_logger().info(quarantine.check_limit("import-webdataset", out_path, webdataset.quarantine_tallies(manifest),
                                                 p.max_quarantine_fraction, "decompose.max_quarantine_fraction"))
    return {"out": str(out_path), "samples": manifest["samples"], "quarantined": manifest["quarantined"],
            "content_hash": manifest["content_hash"]}
