"""evaluate flow: a checkpoint on the test split -> composites, per-sample scores, metrics, report.

``pics evaluate [--set evaluate.key=value ...] [--params FILE]``.
Prefect tasks: plan (inputs checked before any work), inference (Ray Data ``map_batches`` with
actors that each hold the pipelines; GPU actors when CUDA is there), outputs (scores, metrics.json
for DVC, plot data, HTML + PNG report); the flow publishes the metrics table as an artifact.
"""
from __future__ import annotations

import base64
import io

import flows  # noqa: F401  (offline Prefect/Ray environment before Prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.evaluate import stage
from tasks.params import Params, RayParams, stage_params
from tasks.runtime import init_ray

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


class Box:
    """Opaque task argument (Prefect would otherwise walk every value of a result table)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@task(name="evaluate-plan", **_TASK)
def plan_task(params) -> Box:
    return Box(stage.make_plan(params.value))


@task(name="evaluate-inference", **_TASK)
def inference_task(plan: Box, ray_params: RayParams) -> Box:
    init_ray(ray_params.address, ray_params.num_cpus, ray_params.object_store_mb)
    return Box(stage.run_ray(plan.value, log=get_run_logger().info))


@task(name="evaluate-outputs", **_TASK)
def outputs_task(plan: Box, result: Box) -> dict:
    table, timing = result.value
    return stage.write_outputs(plan.value, table, timing)


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
        from PIL import Image

        with Image.open(grid) as im:  # a small inline copy: the UI cannot read local files
            im = im.convert("RGB")
            im.thumbnail((1400, 1400))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        lines += ["", f"![grid](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"]
    lines += ["", f"report: `{rdir / 'index.html'}`, metrics: `{plan.out / 'metrics.json'}`"]
    create_markdown_artifact("\n".join(lines), key="evaluate-report", description="evaluate: methods side by side")


@flow(name="evaluate")
def evaluate_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    log = get_run_logger()
    plan = plan_task(Box(params)).value
    log.info("%d test samples in %s; methods %s; %d %s actor(s); checkpoint %s", plan.n_test, plan.samples,
             plan.params.methods, plan.num_actors, "GPU" if plan.use_gpu else "CPU", plan.cfg.checkpoint)
    for note in plan.notes:
        log.warning(note)
    result = inference_task(Box(plan), params.ray)
    summary = outputs_task(Box(plan), result)
    _publish(summary, plan)
    log.info("evaluated %d samples in %.1f s", summary["n_samples"], summary["timing"]["wall_s"])
    return {"out": str(plan.out), "n_samples": summary["n_samples"], "n_failed": summary["n_failed"],
            "timing": summary["timing"], "notes": plan.notes,
            "methods": {m: {k: v for k, v in s.items() if not isinstance(v, list)}
                        for m, s in summary["methods"].items()}}
