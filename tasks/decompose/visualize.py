"""The picture of a decompose run: one row per sample, as the model will see it.

Columns: target (tight boxes outlined), masked background (expanded boxes blanked, what the
ControlNet hint shows), each object's patch, and the colour-coded region map (object i's
exclusive region in its colour, overlap yellow, background grey, square padding black).
Written as PNG plus an HTML page that shows it with each sample's ids and pair statistics.
"""
from __future__ import annotations

import html
import itertools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks import atomic
from tasks.grid import CELL_FILL, fit_cell, grid
from tasks.shards import decode_sample, iter_rows

TILE = 160
MAX_OBJECTS = 4
COLORS = [(230, 60, 60), (60, 120, 240), (60, 200, 90), (200, 90, 220)]
OVERLAP = (250, 220, 40)
BACKGROUND = (90, 90, 90)
PADDING = (0, 0, 0)
HEADER = 22


def region_colors(region: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 [R, R, 3] colour coding of a region map (bit i = expanded box i)."""
    bits = np.unpackbits(region[..., None], axis=-1, bitorder="little")[..., :MAX_OBJECTS]
    count = bits.sum(-1)
    out = np.empty(region.shape + (3,), np.uint8)
    out[:] = PADDING
    x0, y0, x1, y1 = window
    inside = np.zeros(region.shape, bool)
    inside[y0:y1, x0:x1] = True
    out[inside & (count == 0)] = BACKGROUND
    for i in range(MAX_OBJECTS):
        out[inside & (count == 1) & (bits[..., i] == 1)] = COLORS[i]
    out[inside & (count >= 2)] = OVERLAP
    return out


def sample_tiles(s: dict) -> list[Image.Image]:
    target = Image.fromarray(s["image"])
    draw = ImageDraw.Draw(target)
    lw = max(2, s["image"].shape[1] // 200)
    for i, b in enumerate(s["boxes_tight"]):
        draw.rectangle([float(v) for v in b], outline=COLORS[i % len(COLORS)], width=lw)
    bg = s["image"].copy()
    for x0, y0, x1, y1 in s["boxes_expanded"]:
        bg[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 0
    tiles = [fit_cell(target, TILE), fit_cell(bg, TILE)]
    for k in range(MAX_OBJECTS):
        if k < len(s["patches"]):
            p = Image.fromarray(s["patches"][k])
            ImageDraw.Draw(p).rectangle([0, 0, p.width - 1, p.height - 1], outline=COLORS[k], width=4)
            tiles.append(fit_cell(p, TILE))
        else:
            tiles.append(Image.new("RGB", (TILE, TILE), CELL_FILL))
    tiles.append(fit_cell(region_colors(s["region_map"], s["content_window"]), TILE))
    return tiles


COLUMNS = ["target", "masked background"] + [f"patch {k}" for k in range(MAX_OBJECTS)] + ["regions"]


def write_sample_grid(samples_dir: str | Path, out: str | Path | None = None, n: int = 8) -> Path:
    """Draw up to ``n`` samples of a decompose output into ``out`` (PNG) and a sibling HTML page."""
    samples_dir = Path(samples_dir)
    out = Path(out) if out else samples_dir / "samples.png"
    samples = [decode_sample(r) for r in itertools.islice(iter_rows(samples_dir), max(n, 0))]
    canvas = grid([sample_tiles(s) for s in samples], TILE, len(COLUMNS), HEADER, background=(20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(COLUMNS):
        draw.text((c * TILE + 6, 5), name, fill=(230, 230, 230))
    if not samples:
        draw.text((10, HEADER + TILE // 2), f"no samples in {samples_dir}", fill=(230, 230, 230))
    for r, s in enumerate(samples):
        label = f"{s['sample_id']} [{s['split']}] " + " / ".join(s["category_names"])
        draw.text((4, HEADER + r * TILE + TILE - 14), label[:60], fill=(255, 255, 255), stroke_width=1,
                  stroke_fill=(0, 0, 0))
    with atomic.atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    _write_html(out, samples)
    return out


def _write_html(png: Path, samples: list[dict]) -> Path:
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            s["sample_id"], s["split"], ", ".join(s["category_names"]),
            ", ".join(f"{v:.3f}" for v in s["pair_box_iou"]), ", ".join(f"{v:.3f}" for v in s["pair_mask_iou"]),
            ", ".join(str(v) for v in s["pair_contact_px"]))) + "</tr>"
        for s in samples)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>decompose samples</title>
<style>body{{font-family:sans-serif;background:#111;color:#ddd}}td,th{{padding:2px 8px;border-bottom:1px solid #333}}</style>
</head><body><h2>{len(samples)} samples</h2>
<p>Columns: target with tight boxes; background with expanded boxes blanked; object patches; regions
(object colour = exclusive, yellow = overlap of expanded boxes, grey = background, black = square padding).</p>
<img src="{html.escape(png.name)}" alt="sample grid">
<table><tr><th>sample</th><th>split</th><th>categories</th><th>box IoU</th><th>mask IoU</th><th>contact px</th></tr>
{rows}</table></body></html>
"""
    path = png.with_suffix(".html")
    atomic.write_bytes(path, page.encode())
    return path
