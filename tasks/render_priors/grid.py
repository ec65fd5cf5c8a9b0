"""The picture: per object its patch and mask, then its K views and K depth maps, as one PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks import atomic
from tasks.codec import decode_png
from tasks.render_priors.store import decode_prior, iter_priors
from tasks.schema import object_key
from tasks.shards import iter_rows

_BG = np.array([236, 236, 236], np.float32)  # light grey: white objects stay visible


def _on_grey(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3] * a + _BG * (1 - a)).astype(np.uint8)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """float [R, R] (0 = none) -> RGB uint8; near = bright, normalised per view, none = black."""
    import matplotlib

    hit = depth > 0
    out = np.zeros(depth.shape + (3,), np.uint8)
    if hit.any():
        d = depth[hit]
        t = 1.0 - (d - d.min()) / max(float(d.max() - d.min()), 1e-9)
        out[hit] = (matplotlib.colormaps["magma"](0.15 + 0.85 * t)[:, :3] * 255).astype(np.uint8)
    return out


def _find_patches(samples: Path, keys: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found = {}
    for r in iter_rows(samples, columns=["patches", "patch_masks"]):
        for pb, mb in zip(r["patches"] or [], r["patch_masks"] or []):
            k = object_key(pb or b"", mb or b"")
            if k in keys and k not in found:
                found[k] = (decode_png(pb, "rgb"), decode_png(mb, "gray"))
        if len(found) == len(keys):
            break
    return found


def write_prior_grid(out: str | Path, samples: str | Path, n: int = 4, tile: int = 112,
                     path: str | Path | None = None) -> Path | None:
    """Draw the first ``n`` priors of ``out``: two rows per object, [patch | views] over
    [mask | depths]. Returns the PNG path, or None when there is no prior."""
    out = Path(out)
    priors = []
    for row in iter_priors(out):
        priors.append(decode_prior(row))
        if len(priors) == n:
            break
    if not priors:
        return None
    patches = _find_patches(Path(samples), {p["object_key"] for p in priors})
    K = max(p["num_views"] for p in priors)
    label_h = 14
    W, H = (K + 1) * tile, len(priors) * (2 * tile + label_h)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def put(arr, col, y):
        canvas.paste(Image.fromarray(arr).resize((tile, tile), Image.Resampling.BILINEAR), (col * tile, y))

    for i, p in enumerate(priors):
        y = i * (2 * tile + label_h)
        az = ", ".join(f"{a:.0f}" for a in p["azimuths_deg"])
        draw.text((2, y + 1), f"{p['object_key'][:12]}  elev {p['elevation_deg']:.0f} deg  azimuths [{az}]",
                  fill=(0, 0, 0))
        y += label_h
        if p["object_key"] in patches:
            patch, mask = patches[p["object_key"]]
            put(patch, 0, y)
            put(np.repeat(mask[..., None], 3, 2), 0, y + tile)
        for k in range(p["num_views"]):
            put(_on_grey(p["views"][k]), k + 1, y)
            put(colorize_depth(p["depths"][k]), k + 1, y + tile)
    path = Path(path) if path else out / "priors.png"
    with atomic.atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
