"""layout flow: the decomposed dataset's object silhouettes packed into procedural target shapes.

``python -m flows.layout [--set layout.key=value ...] [--params FILE]`` (the DVC stage ``layout``).
One Prefect task reads the distinct silhouettes (``layout.max_elements`` of them), one task per
target shape (``layout.targets``: circle, heart, star, a letter) runs the greedy baseline and the
differentiable method, then the flow writes, under ``layout.out``:

    targets/<shape>/   as ``pics layout`` writes (layout.json, masks/, collage.png, metrics.json)
    report.png         per shape: target | start (distance-transform init) | greedy | optimised
    metrics.json       per shape and method: coverage, overlap, exceed, seconds

and publishes the report as a Prefect artifact.
"""
from __future__ import annotations

import argparse
import base64
import io
import time
from pathlib import Path

import flows  # noqa: F401  (offline Prefect environment before Prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import atomic
from tasks.params import load_params, resolve_path

_TASK = dict(cache_policy=NO_CACHE, persist_result=False)
STAGE = "layout"
OUTPUTS = {"targets", "report.png", "metrics.json"}


class Box:
    """Opaque holder: keeps Prefect from walking arrays and tensors looking for futures."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@task(name="layout-elements", **_TASK)
def elements_task(samples: str, limit: int) -> Box:
    from tasks.layout.dataset import dataset_elements

    return Box(dataset_elements(samples, limit))


@task(name="layout-target", task_run_name="layout-{name}", **_TASK)
def target_task(name: str, elements: Box, params: dict, out_dir: str) -> Box:
    """Greedy and differentiable packing of one target; writes ``out_dir/name``. Returns
    (target, {method: (placement, metrics)})."""
    from pics_model.layout.metrics import evaluate
    from tasks.layout.stage import lay_out, result, write_outputs
    from tasks.layout.targets import make_target
    from tasks.params import LayoutParams

    p = LayoutParams(**params)
    els = elements.value
    target = make_target(name, p.target_size, p.letter)
    greedy, g_info = lay_out(els, target, p, method="greedy")
    placement, info = lay_out(els, target, p, method="differentiable")
    masks, metrics = result(els, placement, target, info, "differentiable")
    write_outputs(Path(out_dir) / name, [e.name for e in els], els, placement, target, masks, metrics)
    runs = {"start": (info["initial"], {**evaluate(els, info["initial"], target)[1]}),
            "greedy": (greedy, result(els, greedy, target, g_info, "greedy")[1]),
            "optimised": (placement, metrics)}
    return Box((target, runs))


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _publish(metrics: dict, report: Path) -> None:
    lines = ["# layout: silhouettes packed into target shapes", "",
             "| target | method | coverage | overlap % | exceed % | seconds |", "|---|---|---|---|---|---|"]
    for name, per in metrics.items():
        for method, m in per.items():
            lines.append(f"| {name} | {method} | {m['coverage']:.3f} | {100 * m['overlap']:.3f} | "
                         f"{100 * m['exceed']:.3f} | {m.get('seconds', '')} |")
    from PIL import Image

    with Image.open(report) as im:  # an inline copy: the UI cannot read local files
        im = im.convert("RGB")
        im.thumbnail((1200, 1200))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    lines += ["", f"![report](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})", "",
              f"full size: `{report}`"]
    create_markdown_artifact("\n".join(lines), key="layout", description="layout: packing metrics and pictures")


@flow(name="layout")
def layout_flow(overrides: list[str] | None = None, params_file: str | None = None) -> dict:
    from tasks.layout.report import stack_rows, target_row
    from tasks.layout.stage import png_bytes
    from tasks.shards import claim_output

    params = load_params(params_file, overrides)
    p = params.layout
    log = get_run_logger()
    t0 = time.perf_counter()
    samples, out = resolve_path(p.samples), resolve_path(p.out)
    claim_output(out, STAGE, OUTPUTS)
    elements = elements_task(str(samples), p.max_elements)
    log.info("%s: %d distinct silhouettes", samples, len(elements.value))
    metrics, rows = {}, []
    with atomic.atomic_dir(out / "targets") as tmp:  # targets of an earlier run with other shapes go
        for name in p.targets:
            target, runs = target_task(name, elements, p.model_dump(), str(tmp)).value
            metrics[name] = {method: _numbers(m) for method, (_, m) in runs.items()}
            rows.append(target_row(target, elements.value, runs))
            log.info("%s: %s", name, metrics[name]["optimised"])
    report = out / "report.png"
    import numpy as np

    atomic.write_bytes(report, png_bytes(np.asarray(stack_rows(rows))))
    atomic.write_json(out / "metrics.json", metrics)
    _publish(metrics, report)
    log.info("layout: %d targets in %.1f s", len(p.targets), time.perf_counter() - t0)
    return {"out": str(out), "elements": len(elements.value), "metrics": metrics, "report": str(report)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m flows.layout", description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter, e.g. layout.max_elements=20 (repeatable)")
    ap.add_argument("--params", default=None, help="params.yaml to read (default: the repository's)")
    args = ap.parse_args(argv)
    from tasks.params import ParamsError

    try:
        return layout_flow(overrides=args.overrides, params_file=args.params)
    except ParamsError as e:
        raise SystemExit(f"layout: {e}") from None


if __name__ == "__main__":
    print(main())
