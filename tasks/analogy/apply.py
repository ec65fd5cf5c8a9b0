"""``pics analogy --source A.npz --target B.npz --checkpoint DIR --out map.npz [--query Q.npz]``:
carry source points (or the query's) into the target scene with a trained field, and draw it.

``map.npz`` holds ``mapped`` [P, 3] (each source point, or query point, in the target scene),
``coarse`` [P, 3] (the coarse similarity transform's image alone), ``rotation`` [3, 3], ``scale``,
``translation`` [3] and ``cost`` (the coarse stage's descriptor distance). A PNG beside it
(same name, .png) shows both scenes from above with the correspondences colour-coded.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from pics_model.context_field import ContextDescriptorField
from pics_model.scene_map import MapConfig, compute_map, scene_tensors
from tasks import atomic
from tasks.analogy.scenes import Scene, SceneError, load_scene
from tasks.plots import figure_png, pyplot


def load_query(path: str | Path) -> np.ndarray:
    """Query points [Q, 3] from an .npz with a ``points`` field (a scene file will do)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "points" not in z.files:
                raise SceneError(f"{path}: field 'points' missing (has {sorted(z.files)})")
            pts = z["points"]
    except FileNotFoundError:
        raise SceneError(f"{path}: no such query file") from None
    except (OSError, ValueError) as e:
        raise SceneError(f"{path}: not a readable .npz ({e})") from None
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.issubdtype(pts.dtype, np.floating) or not len(pts):
        raise SceneError(f"{path}: field 'points' must be a non-empty float [Q, 3] array, got {pts.dtype} {pts.shape}")
    return pts.astype(np.float32)


def correspondence_colours(points: np.ndarray) -> np.ndarray:
    """[Q, 3] RGB that varies smoothly over the query region: hue by angle about its centre,
    brightness by distance, so nearby points share colours and far ones differ."""
    from matplotlib.colors import hsv_to_rgb

    d = points[:, :2] - points[:, :2].mean(0)
    hue = (np.arctan2(d[:, 1], d[:, 0]) / (2 * np.pi)) % 1.0
    r = np.linalg.norm(d, axis=1)
    val = 0.45 + 0.55 * r / max(float(r.max()), 1e-9)
    return hsv_to_rgb(np.stack([hue, np.full_like(hue, 0.9), val], 1))


def draw(source: Scene, target: Scene, query: np.ndarray, mapped: np.ndarray, title: str = "") -> bytes:
    """PNG: the source (left) and target (right) from above; scene points grey (floor paler),
    query points and their images in matching colours."""
    plt = pyplot()

    colours = correspondence_colours(query)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    for ax, scene, pts, name in ((axes[0], source, query, "source"), (axes[1], target, mapped, "target")):
        floor = scene.instance < 0
        ax.scatter(*scene.points[floor, :2].T, s=2, c="0.85")
        ax.scatter(*scene.points[~floor, :2].T, s=4, c="0.55")
        order = np.argsort(pts[:, 2])  # higher points drawn last: what is seen from above
        ax.scatter(*pts[order, :2].T, s=10, c=colours[order], edgecolors="none")
        ax.set_title(f"{name} ({len(scene.points)} points)")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "scene analogy: query points (left) and where the map carries them (right)")
    return figure_png(fig)


def map_files(source_path: str | Path, target_path: str | Path, checkpoint: str | Path, out: str | Path,
              query_path: str | Path | None, cfg: MapConfig) -> tuple[Path, Path]:
    """Compute and write the map (.npz) and its picture (.png); returns both paths."""
    source, target = load_scene(source_path), load_scene(target_path)
    query = load_query(query_path) if query_path else source.points
    region = query if query_path else source.points[source.instance >= 0]
    if not len(region):
        raise SceneError(f"{source_path}: no object points to map (every point is floor)")
    field = ContextDescriptorField.load(checkpoint)
    for path, scene in ((source_path, source), (target_path, target)):
        bad = scene.label[(scene.label < -1) | (scene.label > field.config.num_labels)]
        if len(bad):
            raise SceneError(f"{path}: field 'label' holds {int(bad[0])}: labels are LVIS category ids "
                             f"1..{field.config.num_labels} or -1 (floor)")
    m = compute_map(field, scene_tensors(source.points, source.label, source.instance),
                    scene_tensors(target.points, target.label, target.instance), torch.from_numpy(region), cfg)
    q = torch.from_numpy(query)
    mapped, coarse = m(q).numpy().astype(np.float32), m.transform.apply(q).numpy().astype(np.float32)
    out = Path(out)
    buf = io.BytesIO()
    np.savez_compressed(buf, mapped=mapped, coarse=coarse, rotation=m.transform.rotation.numpy(),
                        scale=np.float32(m.transform.scale), translation=m.transform.translation.numpy(),
                        cost=np.float32(m.cost))
    atomic.write_bytes(out, buf.getvalue())
    shown = source.instance >= 0 if not query_path else np.ones(len(query), bool)
    png = atomic.write_bytes(out.with_suffix(".png"), draw(source, target, query[shown], mapped[shown],
                                                           f"{Path(source_path).name} -> {Path(target_path).name}"))
    return out, png
