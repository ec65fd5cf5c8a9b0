"""render_priors flow: decompose's sample shards -> K-view shape priors per distinct object.

``pics render-priors [--samples DIR] [--out DIR] [--set render_priors.key=value ...]``. One Prefect
task scans and plans (objects keyed by content hash, earlier shards kept), one Prefect task per
output shard runs it as a Ray task, a last task merges the manifest and quarantine; the flow then
draws priors.png and publishes it as an artifact. Killed and started again, it renders only the
objects it has not done.
"""
from __future__ import annotations

import time
from pathlib import Path

import flows  # noqa: F401  (offline Prefect/Ray/GL environment before Prefect is imported)
from flows.sharded import log_outcome, publish, run_stage
from prefect import flow

from tasks.params import Params, resolve_path, stage_params
from tasks.render_priors import pipeline


def _describe(plan: pipeline.Plan) -> str:
    return (f"{plan.ctx.samples}: {plan.scan.samples} samples, {plan.scan.object_refs} objects "
            f"({len(plan.scan.objects)} distinct); {len(plan.done_keys & {o.key for o in plan.scan.objects})} kept "
            f"from an earlier run, {len(plan.works)} shards to render")


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
    publish("render-priors", "render_priors: counts, timing and a grid of priors", lines, grid, max_side=1000,
            alt="priors", caption=f"full size: `{grid}` (per object: patch | K views, over mask | K depths)")


@flow(name="render_priors")
def render_priors_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.render_priors
    t0 = time.perf_counter()
    samples, out = resolve_path(p.samples), resolve_path(p.out)
    plan, manifest, results = run_stage(pipeline.RENDER_PRIORS, (p, str(samples), str(out)),
                                        p.num_workers, params.ray, _describe)
    grid = None
    if p.grid_objects:
        from tasks.render_priors.grid import write_prior_grid

        grid = write_prior_grid(out, samples, n=p.grid_objects)
    _publish(manifest, grid, out)
    log_outcome(pipeline.RENDER_PRIORS, out, f"{manifest['rendered']} priors, quarantined {manifest['quarantined']}, "
                f"{time.perf_counter() - t0:.1f} s", pipeline.quarantine_tallies(manifest), p.max_quarantine_fraction)
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
