"""layout flow: the decomposed dataset's object silhouettes packed into procedural target shapes.

``pics layout [--set layout.key=value ...] [--params FILE]`` without element files (the DVC stage ``layout``).
One Prefect task reads the distinct silhouettes (``layout.max_elements`` of them), one task per
target shape (``layout.targets``: circle, heart, star, a letter) runs the greedy baseline and the
differentiable method, then the flow writes, under ``layout.out``:

    targets/<shape>/   as ``pics layout`` writes (layout.json, masks/, collage.png, metrics.json)
    report.png         per shape: target | start (distance-transform init) | greedy | optimised
    metrics.json       per shape and method: coverage, overlap, exceed, seconds

and publishes the report as a Prefect artifact.
"""
from __future__ import annotations

import time
from pathlib import Path

import flows  # noqa: F401  (offline Prefect environment before Prefect is imported)
from flows.sharded import publish
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from tasks import atomic
from tasks.params import LayoutParams, Params, resolve_path, stage_params

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)
STAGE = "layout"
OUTPUTS = {"targets", "report.png", "metrics.json"}


@task(name="layout-elements", **_TASK)
def elements_task(samples: str, limit: int) -> quote:
    from tasks.layout.dataset import dataset_elements

    return quote(dataset_elements(samples, limit))


@task(name="layout-target", task_run_name="layout-{name}", **_TASK)
def target_task(name: str, elements: list, p: LayoutParams, out_dir: str) -> quote:
    """Greedy and differentiable packing of one target; writes ``out_dir/name``. Returns
    (target, {method: (placement, metrics)})."""
    from pics_model.layout.metrics import evaluate
    from tasks.layout.stage import lay_out, result, write_outputs
    from tasks.layout.targets import make_target
    els = elements
    target = make_target(name, p.target_size, p.letter)
    greedy, g_info = lay_out(els, target, p, method="greedy")
    placement, info = lay_out(els, target, p, method="differentiable")
    masks, metrics = result(els, placement, target, info, "differentiable")
    write_outputs(Path(out_dir) / name, [e.name for e in els], els, placement, target, masks, metrics)
    runs = {"start": (info["initial"], {**evaluate(els, info["initial"], target)[1]}),
            "greedy": (greedy, result(els, greedy, target, g_info, "greedy")[1]),
            "optimised": (placement, metrics)}
    return quote((target, runs))


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _publish(metrics: dict, report: Path) -> None:
    lines = ["# layout: silhouettes packed into target shapes", "",
             "| target | method | coverage | overlap % | exceed % | seconds |", "|---|---|---|---|---|---|"]
    for name, per in metrics.items():
        for method, m in per.items():
            lines.append(f"| {name} | {method} | {m['coverage']:.3f} | {100 * m['overlap']:.3f} | "
                         f"{100 * m['exceed']:.3f} | {m.get('seconds', '')} |")
    publish("layout", "layout: packing metrics and pictures", lines, report, max_side=1200, alt="report",
            caption=f"full size: `{report}`")


@flow(name="layout")
def layout_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    from tasks.layout.report import stack_rows, target_row
    from tasks.layout.stage import png_bytes
    from tasks.shards import claim_output

    params = stage_params(params, overrides)
    p = params.layout
    log = get_run_logger()
    t0 = time.perf_counter()
    samples, out = resolve_path(p.samples), resolve_path(p.out)
    claim_output(out, STAGE, OUTPUTS)
    elements = elements_task(str(samples), p.max_elements).unquote()
    log.info("%s: %d distinct silhouettes", samples, len(elements))
    metrics, rows = {}, []
    with atomic.atomic_dir(out / "targets") as tmp:  # targets of an earlier run with other shapes go
        for name in p.targets:
            target, runs = target_task(name, quote(elements), p, str(tmp)).unquote()
            metrics[name] = {method: _numbers(m) for method, (_, m) in runs.items()}
            rows.append(target_row(target, elements, runs))
            log.info("%s: %s", name, metrics[name]["optimised"])
    report = out / "report.png"
    import numpy as np

    atomic.write_bytes(report, png_bytes(np.asarray(stack_rows(rows))))
    atomic.write_json(out / "metrics.json", metrics)
    _publish(metrics, report)
    log.info("layout: %d targets in %.1f s", len(p.targets), time.perf_counter() - t0)
    return {"out": str(out), "elements": len(elements), "metrics": metrics, "report": str(report)}
