"""The layout stage's report: per target, the target, the start, the greedy baseline and the
optimised collage side by side with their metrics (report.png), and metrics.json."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pics_model.layout import Element, Placement
from pics_model.layout.metrics import evaluate
from tasks.layout.draw import INSIDE, OUTSIDE, draw_collage

LABEL_H = 30


def _panel(picture: np.ndarray, lines: list[str], side: int) -> Image.Image:
    im = Image.new("RGB", (side, side + LABEL_H), (255, 255, 255))
    im.paste(Image.fromarray(picture).resize((side, side), Image.Resampling.NEAREST), (0, LABEL_H))
    draw = ImageDraw.Draw(im)
    for k, line in enumerate(lines):
        draw.text((3, 2 + 13 * k), line, fill=(0, 0, 0))
    return im


def _caption(name: str, m: dict) -> list[str]:
    return [f"{name}  {m['seconds']:.1f} s" if "seconds" in m else name,
            f"cov {m['coverage']:.2f} ovl {100 * m['overlap']:.2f}% exc {100 * m['exceed']:.2f}%"]


def target_row(target: np.ndarray, elements: list[Element], results: dict[str, tuple[Placement, dict]],
               side: int = 240) -> Image.Image:
    """results: method -> (placement, metrics), drawn left to right after the target itself."""
    panels = [_panel(np.where(target[..., None], np.uint8(INSIDE), np.uint8(OUTSIDE)).astype(np.uint8),
                     [f"target ({int(target.sum())} px)", f"{len(elements)} elements"], side)]
    for name, (placement, metrics) in results.items():
        masks, _ = evaluate(elements, placement, target)
        panels.append(_panel(draw_collage(target, elements, placement, masks), _caption(name, metrics), side))
    row = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), (255, 255, 255))
    for k, p in enumerate(panels):
        row.paste(p, (k * p.width, 0))
    return row


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out
