"""analogy flow: 3D scene analogies on the embedded generator's scenes (tasks/analogy).

``pics analogy [--set analogy.key=value ...] [--params FILE]``.
Prefect tasks: scenes (layouts exported as point sets), train (the contextual descriptor field),
evaluate (scene maps against baselines on augmented held-out pairs, and an untrained field on the
hard ones), transfer (interacting pairs carried into other scenes, rendered with make_sample's
renderer). Under ``analogy.out``: ``scenes/``, ``final/``, ``loss.csv``, ``metrics.json``,
``transfer/``, ``transfer.png``, ``report.md``, each replaced in one atomic rename.
"""
from __future__ import annotations

import time

import flows  # noqa: F401  (offline Prefect environment before Prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import atomic
from tasks.analogy import stage
from tasks.params import Params, resolve_path, stage_params
from tasks.shards import check_output_owner, mark_output

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)
STAGE = "analogy"


class Box:
    """Opaque task argument (Prefect would otherwise walk every point of every scene)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@task(name="analogy-scenes", **_TASK)
def scenes_task(p, out) -> Box:
    return Box(stage.make_scenes(p, out, get_run_logger().info))


@task(name="analogy-train", **_TASK)
def train_task(p, out, scenes: Box) -> Box:
    train, _ = stage.split(p, scenes.value)
    return Box(stage.train_and_save(p, out, train, get_run_logger().info))


@task(name="analogy-evaluate", **_TASK)
def evaluate_task(p, out, scenes: Box, field: Box) -> dict:
    train, heldout = stage.split(p, scenes.value)
    return stage.evaluate_field(p, field.value[0], train, heldout, get_run_logger().info)


@task(name="analogy-transfer", **_TASK)
def transfer_task(p, sample, out, scenes: Box, field: Box) -> dict:
    _, heldout = stage.split(p, scenes.value)
    return stage.transfer_samples(p, sample, field.value[0], heldout, out, get_run_logger().info)


@flow(name="analogy")
def analogy_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    params = stage_params(params, overrides)
    p = params.analogy
    out = resolve_path(p.out)
    check_output_owner(out, STAGE, stage.OWNED)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, STAGE)
    scenes = scenes_task(p, out)
    field = train_task(p, out, scenes)
    metrics = evaluate_task(p, out, scenes, field)
    metrics["train"] = field.value[1]
    metrics["transfer"] = transfer_task(p, params.make_sample, out, scenes, field)
    atomic.write_json(out / stage.METRICS, metrics)
    report = stage.report(metrics)
    atomic.write_bytes(out / stage.REPORT, report.encode())
    create_markdown_artifact(key="analogy", markdown=report.replace("](", f"]({out}/"), description="3D scene analogies")
    get_run_logger().info("analogy done in %.0f s: %s", time.perf_counter() - t0, metrics["methods"]["ours"])
    return metrics
