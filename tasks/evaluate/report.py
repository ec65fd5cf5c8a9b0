"""The evaluation report: a PNG grid (inputs, every method, ground truth, alpha maps across
denoising), an occlusion-accuracy plot and an HTML page with the side-by-side metrics table."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image, ImageDraw, ImageFont

from tasks import atomic
from tasks.codec import decode_rgb
from tasks.evaluate.inference import GROUND_TRUTH, LOWER_IS_BETTER, METHODS
from tasks.evaluate.summary import TABLE_COLUMNS, comparison_rows

LABELS = {"pics": "PICS (ours)", "copy_paste": "copy-paste", "sequential": "sequential (painter)",
          "untrained": "untrained", GROUND_TRUTH: "ground truth"}
CELL_H = 120
N_ALPHA = 5


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(img: np.ndarray, h: int) -> Image.Image:
    im = Image.fromarray(img)
    return im.resize((max(1, round(im.width * h / im.height)), h), Image.Resampling.BICUBIC)


def _objects_tile(patches: np.ndarray, w: int, h: int) -> Image.Image:
    tile = Image.new("RGB", (w, h), (255, 255, 255))
    n = len(patches)
    side = min(h, w // max(n, 1))
    for i, p in enumerate(patches):
        tile.paste(Image.fromarray(p).resize((side, side), Image.Resampling.BICUBIC), (i * side, (h - side) // 2))
    return tile


def _masked_input(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    from tasks.evaluate.baselines import union_mask

    out = image.copy()
    out[union_mask(boxes, *image.shape[:2])] = 128
    return out


def _diverging(d: np.ndarray) -> np.ndarray:
    """[g, g] in [-1, 1] -> uint8 RGB: red = object 0 in front, blue = object 1, white = tie/none."""
    d = np.clip(d, -1, 1)[..., None]
    red, blue, white = np.array([214, 39, 40.0]), np.array([31, 119, 180.0]), np.array([255, 255, 255.0])
    rgb = np.where(d >= 0, white + d * (red - white), white + (-d) * (blue - white))
    return rgb.astype(np.uint8)


def _alpha_tile(diff: np.ndarray, frame: np.ndarray, side: int, dim_exclusive: bool = True) -> Image.Image:
    """An alpha-difference map over the (square-padded, greyed) frame. Cells where one object has
    all the weight (|diff| = 1: its exclusive region) are drawn faint so the overlap stands out."""
    if dim_exclusive:
        diff = np.where(np.abs(diff) >= 0.999, 0.2 * np.sign(diff), diff)
    heat = Image.fromarray(_diverging(diff)).resize((side, side), Image.Resampling.NEAREST)
    grey = Image.fromarray(frame).convert("L").convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    return Image.blend(grey, heat, 0.7)


def _square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = max(h, w)
    out = np.zeros((s, s, 3), np.uint8)
    out[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img
    return out


def write_grid(results: pa.Table, samples: dict[str, dict], path: str | Path, steps: int) -> Path:
    """One row per sample in ``samples`` (decoded, with "expanded" boxes): masked input, objects,
    each method, ground truth, then alpha(obj 0) - alpha(obj 1) of PICS at N_ALPHA steps and the
    true front object (red: object 0, blue: object 1)."""
    rows = {(r["sample_id"], r["method"]): r for r in results.to_pylist() if r["sample_id"] in samples}
    methods = [m for m in METHODS if any((sid, m) for sid in samples if (sid, m) in rows)]
    snaps = sorted(set(np.linspace(0, max(steps - 1, 0), N_ALPHA).round().astype(int).tolist()))
    first = next(iter(samples.values()))
    cell_w = round(first["image"].shape[1] * CELL_H / first["image"].shape[0])
    cols = ["input (boxes erased)", "objects"] + [LABELS[m] for m in methods] + [LABELS[GROUND_TRUTH]]
    alpha_cols = [f"alpha t{k + 1}/{steps}" for k in snaps] + ["true front"]
    pad, head = 4, 20
    width = len(cols) * (cell_w + pad) + len(alpha_cols) * (CELL_H + pad) + pad
    height = head + len(samples) * (CELL_H + pad) + pad + 16
    canvas = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    xs = [pad + i * (cell_w + pad) for i in range(len(cols))]
    xs_a = [xs[-1] + cell_w + pad + i * (CELL_H + pad) for i in range(len(alpha_cols))]
    for x, label, w in [(x, c, cell_w) for x, c in zip(xs, cols)] + [(x, c, CELL_H) for x, c in zip(xs_a, alpha_cols)]:
        draw.text((x + 2, 4), label[: max(4, w // 6)], fill=(0, 0, 0), font=font)
    for i, (sid, s) in enumerate(samples.items()):
        y = head + i * (CELL_H + pad)
        tiles = [_fit(_masked_input(s["image"], s["expanded"]), CELL_H),
                 _objects_tile(s["patches"], cell_w, CELL_H)]
        for m in methods + [GROUND_TRUTH]:
            r = rows.get((sid, m))
            tiles.append(_fit(decode_rgb(r["png"]), CELL_H) if r and r["png"] else Image.new("RGB", (cell_w, CELL_H)))
        for x, t in zip(xs, tiles):
            canvas.paste(t.resize((cell_w, CELL_H)), (x, y))
        ours, gt = rows.get((sid, "pics")), rows.get((sid, GROUND_TRUTH))
        frame = _square(s["image"])
        if ours and ours["alpha_diff"] and ours["alpha_grid"]:
            g = ours["alpha_grid"]
            diffs = np.frombuffer(ours["alpha_diff"], np.float16).astype(np.float32).reshape(-1, g, g)
            for x, k in zip(xs_a, snaps):
                canvas.paste(_alpha_tile(diffs[min(k, len(diffs) - 1)], frame, CELL_H), (x, y))
        if gt and gt["visibility"] and gt["alpha_grid"]:
            g = gt["alpha_grid"]
            vis = np.frombuffer(gt["visibility"], np.float16).astype(np.float32).reshape(g, g)
            canvas.paste(_alpha_tile(vis, frame, CELL_H, dim_exclusive=False), (xs_a[-1], y))
        box = draw.textbbox((xs[0] + 2, y + 2), sid, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((xs[0] + 2, y + 2), sid, fill=(255, 255, 255), font=font)
    draw.text((pad, height - 14), "alpha maps (PICS, ITB-averaged weight of object 0 minus object 1, conditional "
              "branch): red = object 0 dominates, blue = object 1, faint = exclusive regions; true front: "
              "occluded pixels coloured by the nearer object", fill=(60, 60, 60), font=font)
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    return atomic.write_bytes(path, buf.getvalue())


def write_occlusion_plot(summary: dict, path: str | Path) -> Path | None:
    from tasks.plots import finish_accuracy_axes, pyplot, save_png

    curves = {m: s["occlusion_curve"] for m, s in summary["methods"].items() if s.get("occlusion_curve")}
    if not curves:
        return None
    fig, ax = pyplot().subplots(figsize=(5, 3.2), dpi=100)
    for m, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, marker="o", ms=3, label=LABELS.get(m, m))
    finish_accuracy_axes(ax, "denoising step", "occlusion-order accuracy", "chance")
    return save_png(fig, path)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _table(summary: dict) -> tuple[list[dict], list[str], dict]:
    """The side-by-side table: rows, the columns some method has, the best value per column."""
    rows = comparison_rows(summary)
    cols = [c for c in TABLE_COLUMNS + ("occlusion_accuracy",) if any(r.get(c) is not None for r in rows)]
    best = {}
    for c in cols:
        vals = [r[c] for r in rows if r.get(c) is not None and r["method"] != GROUND_TRUTH]
        if vals:
            best[c] = min(vals) if c in LOWER_IS_BETTER else max(vals)
    return rows, cols, best


def metrics_table_markdown(summary: dict) -> str:
    rows, cols, _ = _table(summary)
    lines = ["| method | " + " | ".join(cols) + " | n |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | " + " | ".join(_fmt(r.get(c)) for c in cols)
                     + f" | {r['n']} |")
    return "\n".join(lines)


def _ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"


_TEMPLATES = Environment(loader=PackageLoader("tasks.evaluate", "templates"), autoescape=select_autoescape(["html"]),
                         keep_trailing_newline=True)
_TEMPLATES.filters.update(fmt=_fmt, ci=_ci, label=lambda m: LABELS.get(m, m))


def write_html(summary: dict, params: dict, path: str | Path, grid: str | None, occlusion_png: str | None,
               notes: list[str]) -> Path:
    """``index.html`` from templates/report.html (autoescaped: paths and notes are text)."""
    rows, cols, best = _table(summary)
    paired = [(name.split("_vs_"), d) for name, d in (summary.get("paired") or {}).items() if d]
    page = _TEMPLATES.get_template("report.html").render(
        summary=summary, params=params, rows=rows, columns=cols, best=best, lower_is_better=LOWER_IS_BETTER,
        paired=paired, notes=notes, grid=grid, occlusion_png=occlusion_png)
    return atomic.write_bytes(path, page.encode())
