"""location flow: where to insert an object (issue 14). Removal-render data (or an OPA import),
stage 1 maximum likelihood, stage 2 DPO, TPR/FPR against baselines, a report.

``pics location [--set location.key=value ...] [--params FILE]``.
The embedded data runs on the sharded-stage skeleton (``flows.sharded.run_stage``: one Prefect
task per shard of ``location.shard_size`` scenes, each a Ray task, at most ``location.num_workers``
in flight; a killed run keeps its finished shards); an OPA import is one Prefect task; training and
evaluation are one more.
"""
from __future__ import annotations

import time
from pathlib import Path

import flows  # noqa: F401  (offline Prefect/Ray/EGL environment before anything imports them)
from flows.sharded import run_stage
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import quarantine
from tasks.params import Params, resolve_path, stage_params

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="location-opa", **_TASK)
def opa_task(root: str, out: str) -> dict:
    from tasks.location.opa import import_opa

    return import_opa(root, out)


@task(name="location-stage", **_TASK)
def stage_task(p, out: str, manifest: dict, t_data: float) -> dict:
    from tasks.location.stage import run

    logger = get_run_logger()
    return run(p, out, log=logger.info, manifest=manifest, t_data=t_data)


def build_data(p, ray, out: Path) -> dict:
    """The data phase into ``out``/data: the OPA import, or the generator's shards on Ray
    (``ray``: the ``ray`` params section)."""
    if p.opa_root:
        return opa_task(p.opa_root, str(out / "data"))
    from tasks.location.data import LOCATION_DATA, data_params

    def describe(plan) -> str:
        return f"location data: {len(plan.works)} shards of {p.shard_size} scenes, {len(plan.done)} kept"

    return run_stage(LOCATION_DATA, (data_params(p), str(out / "data")), p.num_workers, ray, describe)[1]


@flow(name="location")
def location_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.location
    out = resolve_path(p.out)
    if p.opa_root:
        p = p.model_copy(update={"opa_root": str(resolve_path(p.opa_root))})
    from tasks.location.stage import claim

    claim(out)  # before the data phase writes into out/data
    t0 = time.perf_counter()
    manifest = build_data(p, params.ray, out)
    m = stage_task(p, str(out), manifest, time.perf_counter() - t0)
    report = (out / "report.md").read_text()
    create_markdown_artifact(report.replace("](", f"]({out}/"), key="location-report",
                             description="location model: TPR/FPR vs K, DPO vs stage 1")
    from tasks.location.data import quarantine_tallies

    get_run_logger().info(quarantine.check_limit("location", out / "data", quarantine_tallies(manifest),
                                                 p.max_quarantine_fraction, "location.max_quarantine_fraction"))
    return {"out": str(out), "final": str(out / "final"), "metrics": str(out / "metrics.json"),
            "tpr_at_k": m["tpr_at_k"], "fpr_at_k": m["fpr_at_k"], "seconds": m["seconds"]}
