"""``pics layout``: element images into a target mask, written as one output folder.

    OUT/layout.json    per element, in input order: file, tx, ty (centre, target px), theta (rad,
                       clockwise on screen), scale (target px per element px)
    OUT/masks/         NNN.png per element, same order: its placed silhouette at the target's size
    OUT/collage.png    the elements' pixels where they were placed, over the target in grey
    OUT/metrics.json   coverage, overlap, exceed (pics_model.layout.metrics), seconds (the packing)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pics_model.layout import Element, Placement, greedy_pack, make_element, pack
from pics_model.layout.metrics import evaluate
from tasks import atomic
from tasks.codec import png_bytes
from tasks.layout.draw import draw_collage
from tasks.layout.io import element_files, read_element, read_target
from tasks.params import LayoutParams
from tasks.shards import check_output_owner, claim_output

STAGE = "layout"
OUTPUTS = {"layout.json", "masks", "collage.png", "metrics.json"}


def lay_out(elements: list[Element], target: np.ndarray, p: LayoutParams, method: str | None = None,
            **changes) -> tuple[Placement, dict]:
    """Run ``method`` (default: p.method); ``changes`` override fields of the method's config."""
    if p.threads:
        torch.set_num_threads(p.threads)
    if (method or p.method) == "greedy":
        return greedy_pack(elements, target, fill=changes.get("init_fill", 0.8),
                           equal_size=changes.get("equal_size", p.equal_size))
    return pack(elements, target, p.config(**changes))


def result(elements: list[Element], placement: Placement, target: np.ndarray, info: dict,
           method: str) -> tuple[np.ndarray, dict]:
    """(placed masks bool [N, H, W], metrics dict) of a finished layout."""
    masks, metrics = evaluate(elements, placement, target)
    return masks, {**metrics, "seconds": round(info["seconds"], 3), "method": method, "elements": len(elements)}


def write_outputs(out: Path, files: list[str], elements: list[Element], placement: Placement,
                  target: np.ndarray, masks: np.ndarray, metrics: dict) -> None:
    """The output folder (see the module doc); claimed first, so nothing foreign is overwritten."""
    claim_output(out, STAGE, OUTPUTS)
    with atomic.atomic_dir(out / "masks") as tmp:
        for i, m in enumerate(masks):
            (tmp / f"{i:03d}.png").write_bytes(png_bytes(m.astype(np.uint8) * 255))
    atomic.write_json(out / "layout.json", {"width": target.shape[1], "height": target.shape[0],
                                            "elements": placement.records(files)})
    atomic.write_bytes(out / "collage.png", png_bytes(draw_collage(target, elements, placement, masks)))
    atomic.write_json(out / "metrics.json", metrics)


def run_files(element_paths: list[str | Path], target_path: str | Path, out: str | Path, p: LayoutParams) -> dict:
    """The command: read, lay out, write; returns the metrics."""
    check_output_owner(Path(out), STAGE, OUTPUTS)  # refuse a foreign folder before the work
    files = element_files(element_paths)
    target = read_target(target_path)
    elements = []
    for f in files:
        mask, rgb = read_element(f)
        elements.append(make_element(mask, str(f), rgb))
    placement, info = lay_out(elements, target, p)
    masks, metrics = result(elements, placement, target, info, p.method)
    write_outputs(Path(out), [str(f) for f in files], elements, placement, target, masks, metrics)
    return metrics
