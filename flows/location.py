"""location flow: where to insert an object (issue 14). Removal-render data (or an OPA import),
stage 1 maximum likelihood, stage 2 DPO, TPR/FPR against baselines, a report.

``pics location [--set location.key=value ...] [--params FILE]``.
One Prefect task per phase; the data phase fans its shards out over Ray when
``location.num_workers`` > 1 (tasks/location/data.py ``run_works``).
"""
from __future__ import annotations

import json

import flows  # noqa: F401  (offline Prefect/Ray/EGL environment before anything imports them)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import quarantine
from tasks.params import Params, resolve_path, stage_params
from tasks.runtime import init_ray

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="location-stage", **_TASK)
def stage_task(p, out: str) -> dict:
    from tasks.location.stage import run

    logger = get_run_logger()
    return run(p, out, log=logger.info)


@flow(name="location")
def location_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.location
    out = resolve_path(p.out)
    if p.opa_root:
        p = p.model_copy(update={"opa_root": str(resolve_path(p.opa_root))})
    if p.num_workers > 1:
        init_ray(params.ray.address, params.ray.num_cpus, params.ray.object_store_mb)
    m = stage_task(p, str(out))
    report = (out / "report.md").read_text()
    create_markdown_artifact(report.replace("](", f"]({out}/"), key="location-report",
                             description="location model: TPR/FPR vs K, DPO vs stage 1")
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    from tasks.location.data import quarantine_tallies

    get_run_logger().info(quarantine.check_limit("location", out / "data", quarantine_tallies(manifest),
                                                 p.max_quarantine_fraction, "location.max_quarantine_fraction"))
    return {"out": str(out), "final": str(out / "final"), "metrics": str(out / "metrics.json"),
            "tpr_at_k": m["tpr_at_k"], "fpr_at_k": m["fpr_at_k"], "seconds": m["seconds"]}
