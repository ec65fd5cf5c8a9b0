"""decompose flow: an LVIS/COCO-format dataset -> shards of interacting object groups.

``pics decompose [--set decompose.key=value ...] [--params FILE]``.
One Prefect task loads and checks the inputs, one Prefect task per shard runs that shard as a Ray
task (never a task per image), a last task merges the manifest; the flow then draws the sample
grid and publishes it as an artifact. Killed and started again, it keeps the finished shards.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import flows  # noqa: F401  (offline Prefect/Ray environment before Prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from tasks import quarantine
from tasks.decompose import pipeline
from tasks.params import Params, resolve_path, stage_params
from tasks.runtime import init_ray

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


class Box:
    """Opaque holder for task arguments: Prefect walks lists, dicts and dataclasses in task
    parameters looking for futures, which for a shard of LVIS means millions of polygon numbers."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@task(name="decompose-prepare", **_TASK)
def prepare_task(params: dict, annotations: str, images: str, out: str) -> pipeline.Plan:
    return pipeline.prepare(params, annotations, images, out)


@task(name="decompose-shard", task_run_name="decompose-{name}", retries=1, **_TASK)
def shard_task(name: str, work: Box, ctx_ref) -> dict:
    import ray

    from tasks.decompose.runner import remote_process_shard

    return ray.get(remote_process_shard().remote(work.value, ctx_ref))


@task(name="decompose-finalize", **_TASK)
def finalize_task(plan: Box, results: list[dict]) -> dict:
    return pipeline.finalize(plan.value, results)


def _run_shards(plan: pipeline.Plan, num_workers: int) -> list[dict]:
    """Submit shard tasks keeping at most ``num_workers`` in flight (Prefect's thread pool is unbounded)."""
    import ray

    ctx_ref = ray.put(plan.ctx)
    todo = list(plan.pending)
    in_flight, results = [], []
    while todo or in_flight:
        while todo and len(in_flight) < num_workers:
            w = todo.pop(0)
            in_flight.append(shard_task.submit(w.name, Box(w), ctx_ref))
        fut = next(as_completed(in_flight))
        in_flight.remove(fut)
        results.append(fut.result())  # raises: the flow fails, finished shards stay for the resume
    return results


def _publish(manifest: dict, grid: Path | None, out: Path) -> None:
    lines = [f"# decompose: {manifest['samples']} samples from {manifest['images_seen']} images",
             "", f"output: `{out}`", "", "| count | value |", "|---|---|"]
    for k in ("images_seen", "images_with_pair", "samples", "quarantine_rows"):
        lines.append(f"| {k} | {manifest[k]} |")
    for k in ("skipped", "quarantined", "quarantined_annotations"):
        for reason, v in manifest[k].items():
            lines.append(f"| {k}: {reason} | {v} |")
    lines += ["", f"content hash `{manifest['content_hash']}`"]
    if grid is not None:
        from PIL import Image

        with Image.open(grid) as im:  # a small inline copy: the UI cannot read local files
            im = im.convert("RGB")
            im.thumbnail((1120, 1120))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        lines += ["", f"![samples](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})",
                  "", f"full size: `{grid}` and `{grid.with_suffix('.html')}`"]
    create_markdown_artifact("\n".join(lines), key="decompose-samples",
                             description="decompose: counts and a grid of samples")


@flow(name="decompose")
def decompose_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.decompose
    log = get_run_logger()
    out = resolve_path(p.out)
    plan = prepare_task(p.model_dump(), str(resolve_path(p.annotations)), str(resolve_path(p.images)), str(out))
    log.info("%s (%s): %d images in %d shards, %d to do, %d kept from an earlier run", plan.dataset.path,
             plan.dataset.format, len(plan.dataset.images), len(plan.works), len(plan.pending), len(plan.done))
    results: list[dict] = []
    if plan.pending:
        init_ray(params.ray.address, params.ray.num_cpus, params.ray.object_store_mb)
        results = _run_shards(plan, p.num_workers)
    manifest = finalize_task(Box(plan), results)
    grid = None
    if p.grid_samples:
        from tasks.decompose.visualize import write_sample_grid

        grid = write_sample_grid(out, n=p.grid_samples)
    _publish(manifest, grid, out)
    log.info("%d samples, skipped %s, quarantined %s", manifest["samples"], manifest["skipped"],
             manifest["quarantined"])
    log.info(quarantine.check_limit("decompose", out, pipeline.quarantine_tallies(manifest),
                                    p.max_quarantine_fraction, "decompose.max_quarantine_fraction"))
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
    as_dict = p.model_dump()  # tasks/decompose still takes the section as a dict
    out_path = Path(out)
    webdataset.check_tars(tars)
    webdataset.clear_output(out_path)
    tar_task = task(name="import-tar", task_run_name="import-{index}", **_TASK)(webdataset.import_tar)
    labelled = webdataset.tar_labels([str(t) for t in tars])
    futures = [tar_task.submit(t, str(out_path), i, as_dict, label) for i, (t, label) in enumerate(labelled)]
    results = [f.result() for f in futures]
    manifest = webdataset.finalize(out_path, results, as_dict, [t for t, _ in labelled])
    if p.grid_samples and manifest["samples"]:
        from tasks.decompose.visualize import write_sample_grid

        write_sample_grid(out_path, n=p.grid_samples)
    get_run_logger().info(quarantine.check_limit("import-webdataset", out_path, webdataset.quarantine_tallies(manifest),
                                                 p.max_quarantine_fraction, "decompose.max_quarantine_fraction"))
    return {"out": str(out_path), "samples": manifest["samples"], "quarantined": manifest["quarantined"],
            "content_hash": manifest["content_hash"]}
