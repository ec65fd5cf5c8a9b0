"""render_priors flow: decompose's sample shards -> K-view shape priors per distinct object.

``pics render-priors [--samples DIR] [--out DIR] [--set render_priors.key=value ...]``. One Prefect
task scans and plans (objects keyed by content hash, earlier shards kept), one Prefect task per
output shard runs it as a Ray task, a last task merges the manifest and quarantine; the flow then
draws priors.png and publishes it as an artifact. Killed and started again, it renders only the
objects it has not done.
"""
from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import flows  # noqa: F401  (offline Prefect/Ray/GL environment before Prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from tasks import quarantine
from tasks.params import Params, resolve_path, stage_params
from tasks.render_priors import pipeline
from tasks.runtime import init_ray

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


class Box:
    """Opaque holder: keeps Prefect from walking thousands of object locations looking for futures."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@task(name="render-priors-prepare", **_TASK)
def prepare_task(params: dict, samples: str, out: str) -> Box:
    return Box(pipeline.prepare(params, samples, out))


@task(name="render-priors-shard", task_run_name="render-{name}", retries=1, **_TASK)
def shard_task(name: str, work: Box, ctx_ref, params: dict) -> dict:
    import ray

    from tasks.render_priors.runner import remote_process_shard

    return ray.get(remote_process_shard(params).remote(work.value, ctx_ref))


@task(name="render-priors-finalize", **_TASK)
def finalize_task(plan: Box, results: list[dict], wall_s: float) -> dict:
    return pipeline.finalize(plan.value, results, wall_s)


def _run_shards(plan: pipeline.Plan, num_workers: int) -> list[dict]:
    """Shard tasks with at most ``num_workers`` in flight (Prefect's thread pool is unbounded)."""
    import ray

    ctx_ref = ray.put(plan.ctx)
    todo, in_flight, results = list(plan.works), [], []
    while todo or in_flight:
        while todo and len(in_flight) < num_workers:
            w = todo.pop(0)
            in_flight.append(shard_task.submit(w.name, Box(w), ctx_ref, plan.ctx.params))
        fut = next(as_completed(in_flight))
        in_flight.remove(fut)
        results.append(fut.result())  # raises: the flow fails, finished shards stay for the resume
    return results


def _publish(manifest: dict, grid: Path | None, out: Path) -> None:
    t = manifest["timing"]
    lines = [f"# render_priors: {manifest['rendered']} objects rendered of {manifest['distinct_objects']} distinct",
             "", f"output: `{out}`", "", "| count | value |", "|---|---|"]
    for k in ("samples", "object_refs", "distinct_objects", "duplicates", "rendered", "kept_from_earlier_runs",
              "rendered_this_run", "quarantine_rows"):
        lines.append(f"| {k} | {manifest[k]} |")
    for reason, v in manifest["quarantined"].items():
        lines.append(f"| quarantined: {reason} | {v} |")
    lines.append(f"| wall s | {t['wall_s']} |")
    lines.append(f"| render ms / view (worker) | {t['render_ms_per_view']} |")
    lines += ["", f"renderer: {manifest['renderer']['platform']} / {manifest['renderer']['gl_renderer']}"]
    if grid is not None:
        from PIL import Image

        with Image.open(grid) as im:  # an inline copy: the UI cannot read local files
            im = im.convert("RGB")
            im.thumbnail((1000, 1000))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        lines += ["", f"![priors](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})",
                  "", f"full size: `{grid}` (per object: patch | K views, over mask | K depths)"]
    create_markdown_artifact("\n".join(lines), key="render-priors",
                             description="render_priors: counts, timing and a grid of priors")


@flow(name="render_priors")
def render_priors_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.render_priors
    log = get_run_logger()
    t0 = time.perf_counter()
    samples, out = resolve_path(p.samples), resolve_path(p.out)
    plan = prepare_task(p.model_dump(), str(samples), str(out)).value
    log.info("%s: %d samples, %d objects (%d distinct); %d kept from an earlier run, %d shards to render",
             samples, plan.scan.samples, plan.scan.object_refs, len(plan.scan.objects),
             len(plan.done_keys & {o.key for o in plan.scan.objects}), len(plan.works))
    results: list[dict] = []
    if plan.works:
        init_ray(params.ray.address, params.ray.num_cpus, params.ray.object_store_mb)
        results = _run_shards(plan, p.num_workers)
    manifest = finalize_task(Box(plan), results, time.perf_counter() - t0)
    grid = None
    if p.grid_objects:
        from tasks.render_priors.grid import write_prior_grid

        grid = write_prior_grid(out, samples, n=p.grid_objects)
    _publish(manifest, grid, out)
    log.info("%d priors, quarantined %s, %.1f s", manifest["rendered"], manifest["quarantined"],
             time.perf_counter() - t0)
    log.info(quarantine.check_limit("render_priors", out, pipeline.quarantine_tallies(manifest),
                                    p.max_quarantine_fraction, "render_priors.max_quarantine_fraction"))
    return {
        "out": str(out),
        "samples": manifest["samples"],
        "distinct_objects": manifest["distinct_objects"],
        "rendered": manifest["rendered"],
        "rendered_this_run": manifest["rendered_this_run"],
        "kept_from_earlier_runs": manifest["kept_from_earlier_runs"],
        "quarantined": manifest["quarantined"],
        "shards_run": len(results),
        "shards_kept": len(plan.done),
        "timings_s": pipeline.sum_timings(results) if results else {},
        "grid": str(grid) if grid else None,
    }
