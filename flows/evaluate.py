"""evaluate flow: a checkpoint on the test split -> composites, per-sample scores, metrics, report.

``pics evaluate [--set evaluate.key=value ...] [--params FILE]``.
Prefect tasks: plan (inputs checked before any work), inference (Ray Data ``map_batches`` with
actors that each hold the pipelines; GPU actors when CUDA is there), outputs (scores, metrics.json
for DVC, plot data, HTML + PNG report); the flow publishes the metrics table as an artifact.
"""
from __future__ import annotations


import flows  # noqa: F401  (offline Prefect/Ray environment before Prefect is imported)
from flows.sharded import inline_picture
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from tasks.evaluate import stage
from tasks.params import Params, RayParams, stage_params
from tasks.runtime import init_ray

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


# Task arguments and results go in ``quote``: Prefect would otherwise walk every value of a result table.
@task(name="evaluate-plan", **_TASK)
def plan_task(params) -> quote:
    return quote(stage.make_plan(params))


@task(name="evaluate-inference", **_TASK)
def inference_task(plan, ray_params: RayParams) -> quote:
    init_ray(ray_params.address, ray_params.num_cpus, ray_params.object_store_mb)
    return quote(stage.run_ray(plan, log=get_run_logger().info))


@task(name="evaluate-outputs", **_TASK)
def outputs_task(plan, result) -> dict:
    table, timing = result
    return stage.write_outputs(plan, table, timing)


def _publish(summary: dict, plan: stage.Plan) -> None:
    from tasks.evaluate.report import metrics_table_markdown

    rdir = plan.out / "report"
    lines = [f"# evaluate: {summary['n_samples']} test samples ({summary['n_failed']} quarantined)", "",
             metrics_table_markdown(summary), "",
             "`*_mobilenetv2_proxy`: the bundled ImageNet MobileNetV2 stands in for the standard backbones; "
             "not comparable to published numbers.", ""]
    lines += [f"- {n}" for n in plan.notes]
    grid = rdir / "grid.png"
    if grid.exists():
        lines += ["", inline_picture(grid, 1400, "grid")]
    lines += ["", f"report: `{rdir / 'index.html'}`, metrics: `{plan.out / 'metrics.json'}`"]
    create_markdown_artifact("\n".join(lines), key="evaluate-report", description="evaluate: methods side by side")


@flow(name="evaluate")
def evaluate_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    log = get_run_logger()
    plan = plan_task(quote(params)).unquote()
    log.info("%d test samples in %s; methods %s; %d %s actor(s); checkpoint %s", plan.n_test, plan.samples,
             plan.params.methods, plan.num_actors, "GPU" if plan.use_gpu else "CPU", plan.cfg.checkpoint)
    for note in plan.notes:
        log.warning(note)
    result = inference_task(quote(plan), params.ray).unquote()
    summary = outputs_task(quote(plan), quote(result))
    _publish(summary, plan)
    log.info("evaluated %d samples in %.1f s", summary["n_samples"], summary["timing"]["wall_s"])
    return {"out": str(plan.out), "n_samples": summary["n_samples"], "n_failed": summary["n_failed"],
            "timing": summary["timing"], "notes": plan.notes,
            "methods": {m: {k: v for k, v in s.items() if not isinstance(v, list)}
                        for m, s in summary["methods"].items()}}
