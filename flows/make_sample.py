"""make_sample flow: render the embedded LVIS-format dataset (objects that rest on, touch and occlude
each other), with amodal masks and depth order as extra annotation fields.

``pics make-sample [--set make_sample.key=value ...] [--params FILE]``. One Prefect task per chunk
of images (never per image). With ``num_workers: 1`` the chunks render in this process on one reused
OpenGL renderer; with more, each chunk is a Ray task (a renderer per worker). The dataset is written
into a temporary folder that replaces ``out`` in one rename, so a killed run never leaves a
half-written dataset.
"""
from __future__ import annotations

import time
from pathlib import Path

import flows  # noqa: F401  (offline Prefect/Ray/EGL environment before anything imports them)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import atomic
from tasks.make_sample import dataset
from tasks.params import MakeSampleParams, Params, resolve_path, stage_params
from tasks.runtime import init_ray
from tasks.shards import check_output_owner, mark_output

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)
STAGE = "make_sample"


@task(name="make-sample-chunk", task_run_name="make-sample-{first}-{last}", **_TASK)
def chunk_task(p: MakeSampleParams, indices: list[int], images_dir: str, first: int, last: int,
               use_ray: bool) -> list[dict]:
    if not use_ray:
        return dataset.render_images(p, indices, images_dir)
    import ray

    remote = ray.remote(num_cpus=1)(dataset.render_images)
    return ray.get(remote.remote(p, indices, images_dir))


def _render(p: MakeSampleParams, images_dir: Path, ray_params, logger) -> list[dict]:
    parts = dataset.chunks(p.num_images, p.chunk_size)
    use_ray = p.num_workers > 1 and len(parts) > 1
    results: list[dict] = []
    t0 = time.perf_counter()

    def progress(done: list[dict]) -> None:
        results.extend(done)
        dt = time.perf_counter() - t0
        logger.info("rendered %d/%d images (%.1f images/s)", len(results), p.num_images, len(results) / dt)

    if use_ray:
        init_ray(ray_params.address, ray_params.num_cpus or p.num_workers, ray_params.object_store_mb)
        futures = [chunk_task.submit(p, c, str(images_dir), c[0], c[-1], True) for c in parts]
        for f in futures:
            progress(f.result())
    else:
        for c in parts:
            progress(chunk_task(p, c, str(images_dir), c[0], c[-1], False))
    return results


@flow(name="make_sample")
def make_sample_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.make_sample
    out = resolve_path(p.out)
    logger = get_run_logger()
    logger.info("rendering %d images %dx%d, %d-%d objects each, seed %d -> %s", p.num_images, p.width, p.height,
                p.min_objects, p.max_objects, p.seed, out)
    # the rename below replaces the whole folder: only a folder of make_sample's own may go
    check_output_owner(out, STAGE, {dataset.IMAGES, dataset.SCENES, dataset.ANNOTATIONS})
    t0 = time.perf_counter()
    with atomic.atomic_dir(out) as tmp:
        mark_output(tmp, STAGE)
        results = _render(p, tmp / dataset.IMAGES, params.ray, logger)
        lvis = dataset.assemble(p, results)
        atomic.write_bytes(tmp / dataset.ANNOTATIONS, dataset.dumps(lvis))
    seconds = time.perf_counter() - t0
    summary = {
        "out": str(out),
        "annotations": str(out / dataset.ANNOTATIONS),
        "images": len(lvis["images"]),
        "instances": len(lvis["annotations"]),
        "omitted_objects": lvis["info"]["omitted_objects"],
        "segmentation_formats": lvis["info"]["segmentation_formats"],
        "seconds": round(seconds, 2),
        "images_per_s": round(len(lvis["images"]) / seconds, 2),
    }
    logger.info("wrote %s", summary)
    create_markdown_artifact(
        key="make-sample",
        markdown="\n".join(["# make_sample", ""] + [f"- **{k}**: {v}" for k, v in summary.items()]),
        description="embedded LVIS-format dataset",
    )
    return summary
