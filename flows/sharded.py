"""The Prefect half of the sharded-stage skeleton (``tasks.sharded_stage``): prepare, fan out, finalize, publish.

:func:`run_stage` runs a ``ShardedStage`` as the pipeline does: one Prefect task plans, one
Prefect task per shard runs that shard as one Ray task (never a task per item), at most
``num_workers`` in flight (a ``ThreadPoolTaskRunner`` with that many threads, each waiting on its
Ray task), and one Prefect task merges the records. The stage's flow then draws its picture and
calls :func:`publish`. The benchmarks time :func:`run_shards`, the same fan-out.

Arguments go into Prefect tasks wrapped in ``prefect.utilities.annotations.quote``: Prefect would
otherwise walk every list and dict in them looking for futures (for a shard of LVIS, millions of
polygon numbers).
"""
from __future__ import annotations

import base64
import io
import time
from functools import cache
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from tasks import quarantine
from tasks.runtime import init_ray
from tasks.sharded_stage import ShardedStage, remote_process_shard

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)


def _call(fn: Callable, args: tuple) -> Any:
    return quote(fn(*args))


def _run_remote(name: str, work, ctx_ref, remote) -> dict:
    import ray

    return ray.get(remote.remote(work, ctx_ref))


@cache
def _tasks(prefix: str) -> tuple:
    """(prepare, shard, finalize) Prefect tasks named after the stage."""
    return (task(name=f"{prefix}-prepare", **_TASK)(_call),
            task(name=f"{prefix}-shard", task_run_name=f"{prefix}-{{name}}", retries=1, **_TASK)(_run_remote),
            task(name=f"{prefix}-finalize", **_TASK)(_call))


def run_shards(stage: ShardedStage, plan, num_workers: int) -> list[dict]:
    """Every pending shard of ``plan`` as a Prefect task running it as a Ray task on the running
    Ray, at most ``num_workers`` in flight; records in the order they finish. The first failure
    raises (queued shards are cancelled; finished ones stay for the resume)."""
    import ray

    _, shard_task, _ = _tasks(stage.task_prefix)
    ctx_ref = ray.put(plan.ctx)
    remote = remote_process_shard(stage, plan.ctx)
    with ThreadPoolTaskRunner(max_workers=num_workers) as runner:
        futures = [runner.submit(shard_task, {"name": w.name, "work": quote(w), "ctx_ref": ctx_ref,
                                              "remote": quote(remote)}) for w in plan.pending]
        return [f.result() for f in as_completed(futures)]


def run_stage(stage: ShardedStage, args: tuple, num_workers: int, ray, describe: Callable | None = None):
    """prepare -> shards on Ray -> finalize, each a Prefect task; returns (plan, manifest, new records).

    ``ray``: the ``ray`` params section (Ray starts only when a shard is left to do);
    ``describe(plan)``: a line logged once the plan is made."""
    from prefect import get_run_logger

    prepare_task, _, finalize_task = _tasks(stage.task_prefix)
    t0 = time.perf_counter()
    plan = prepare_task(stage.prepare, quote(args)).unquote()
    if describe is not None:
        get_run_logger().info(describe(plan))
    results: list[dict] = []
    if plan.pending:
        init_ray(ray.address, ray.num_cpus, ray.object_store_mb)
        results = run_shards(stage, plan, num_workers)
    manifest = finalize_task(stage.finalize, quote((plan, results, time.perf_counter() - t0))).unquote()
    return plan, manifest, results


def log_outcome(stage: ShardedStage, out: Path, summary: str, tallies: dict, max_fraction: float) -> None:
    """The stage's last words: its ``summary`` line and the quarantine summary, logged. Raises
    :class:`tasks.quarantine.QuarantineLimitError` past ``max_fraction`` (the stage's
    ``max_quarantine_fraction``); call it after the outputs are written: they stay, for the post-mortem."""
    from prefect import get_run_logger

    log = get_run_logger()
    log.info(summary)
    log.info(quarantine.check_limit(stage.name, out, tallies, max_fraction, f"{stage.name}.max_quarantine_fraction"))


def inline_picture(path: Path, max_side: int, alt: str) -> str:
    """Markdown image of a small JPEG copy of ``path``: the Prefect UI cannot read local files."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"


def publish(key: str, description: str, lines: list[str], picture: Path | None = None, max_side: int = 1120,
            alt: str = "picture", caption: str = "") -> None:
    """A markdown artifact: ``lines``, then the picture inline and ``caption`` (where the full size is)."""
    if picture is not None:
        lines = [*lines, "", inline_picture(picture, max_side, alt), "", caption]
    create_markdown_artifact("\n".join(lines), key=key, description=description)
