"""One offscreen OpenGL renderer per process: colour, segmentation, per-object and height-map views.

pyrender is imported lazily and only after the environment is configured, because OpenGL picks
its platform (EGL here) at import time, and pyrender still uses ``np.infty`` (gone in numpy 2).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from tasks.runtime import configure_environment

_local = threading.local()
SHADOW_MAP_SIZE = 1024


def import_pyrender():
    configure_environment()
    if not hasattr(np, "infty"):
        np.infty = np.inf  # pyrender 0.1.45 uses np.infty for bounds and directional shadows
    import pyrender
    import pyrender.light
    import pyrender.renderer

    # The shadow map is rendered for every colour view; 2048^2 costs llvmpipe about 30 ms a view
    # for no visible gain at a few hundred pixels: 1024^2 keeps soft-edged contact shadows.
    pyrender.renderer.SHADOW_TEX_SZ = pyrender.light.SHADOW_TEX_SZ = SHADOW_MAP_SIZE
    return pyrender


def ortho_depth(lin: np.ndarray, znear: float, zfar: float) -> np.ndarray:
    """Undo pyrender's perspective depth linearisation for an orthographic camera.

    pyrender applies the perspective formula to every depth buffer; for an orthographic camera we
    recover the NDC depth and map it linearly. Background (0) stays 0.
    """
    out = np.zeros_like(lin, dtype=np.float64)
    hit = lin > 0
    ndc = (zfar + znear - 2.0 * znear * zfar / lin[hit].astype(np.float64)) / (zfar - znear)
    out[hit] = znear + (ndc + 1.0) * 0.5 * (zfar - znear)
    return out


@dataclass
class ObjectViews:
    """Renders of one scene. ``labels`` [H, W] int: 0 background, k+1 object k (the visible masks).
    ``amodal`` [K, H, W] bool: each object rendered alone. ``depth`` [K, H, W] float32: each object's
    own camera-space depth (0 where absent)."""

    rgb: np.ndarray
    labels: np.ndarray
    amodal: np.ndarray
    depth: np.ndarray


class Renderer:
    """Wraps one ``pyrender.OffscreenRenderer``; reuse it for every image a process renders."""

    def __init__(self, width: int, height: int):
        self.pyrender = import_pyrender()
        self._r = self.pyrender.OffscreenRenderer(width, height)

    def _size(self, width: int, height: int) -> None:
        if (self._r.viewport_width, self._r.viewport_height) != (width, height):
            self._r.viewport_width, self._r.viewport_height = width, height

    def heightmaps(self, mesh, cells: int, pitch: float) -> tuple[np.ndarray, np.ndarray]:
        """Top and bottom surface heights of a trimesh centred on the origin, on a ``cells`` x
        ``cells`` grid of ``pitch`` (row = +y, col = +x, cell centres). NaN where the mesh is absent.

        An orthographic view from above and one from below: the exact z-buffer, no ray casting.
        """
        pr = self.pyrender
        self._size(cells, cells)
        half = cells * pitch / 2
        lo, hi = mesh.bounds[0, 2], mesh.bounds[1, 2]
        margin = 1.0
        scene = pr.Scene(ambient_light=np.zeros(3))
        node = scene.add(pr.Mesh.from_trimesh(mesh, smooth=False))
        cam = pr.OrthographicCamera(xmag=half, ymag=half, znear=0.5, zfar=hi - lo + 2 * margin)
        up = np.eye(4)
        up[2, 3] = hi + margin  # looks down -z; the top is `margin` away, beyond znear
        cam_node = scene.add(cam, pose=up)
        seg = {node: (255, 255, 255)}
        flags = pr.RenderFlags.SEG
        _, d = self._r.render(scene, flags, seg_node_map=seg)
        depth = ortho_depth(d, cam.znear, cam.zfar)
        top = np.where(depth > 0, up[2, 3] - depth, np.nan)[::-1]  # image row 0 is +y: flip to row = +y index
        down = np.eye(4)
        down[:3, :3] = np.diag([1.0, -1.0, -1.0])  # rotate 180 deg about x: looks along +z
        down[2, 3] = lo - margin
        scene.set_pose(cam_node, down)
        _, d = self._r.render(scene, flags, seg_node_map=seg)
        depth = ortho_depth(d, cam.znear, cam.zfar)
        bottom = np.where(depth > 0, down[2, 3] + depth, np.nan)  # camera y = -world y: rows already run -y..+y
        # llvmpipe now and then returns a stray fragment at the near plane (seen: 1 px on a
        # revolved mesh); a height outside the mesh's own z range is such a glitch, not surface
        tol = 1e-3
        bottom[(bottom < lo - tol) | (bottom > hi + tol)] = np.nan
        top[(top < lo - tol) | (top > hi + tol)] = np.nan
        return top, bottom

    def labels(self, scene, object_nodes: list, width: int, height: int) -> np.ndarray:
        """[H, W] int: 0 background, k+1 where object k is the nearest surface (visible masks)."""
        pr = self.pyrender
        self._size(width, height)
        seg = {n: (k + 1, 0, 0) for k, n in enumerate(object_nodes)}
        lab, _ = self._r.render(scene, pr.RenderFlags.SEG, seg_node_map=seg)
        return lab[..., 0].astype(np.int32)

    def render(self, scene, object_nodes: list, width: int, height: int, shadows: bool = True,
               labels: np.ndarray | None = None) -> ObjectViews:
        pr = self.pyrender
        if labels is None:
            labels = self.labels(scene, object_nodes, width, height)
        self._size(width, height)
        flags = pr.RenderFlags.SHADOWS_DIRECTIONAL if shadows else pr.RenderFlags.NONE
        rgb, _ = self._r.render(scene, flags)
        k = len(object_nodes)
        amodal = np.zeros((k, height, width), bool)
        depth = np.zeros((k, height, width), np.float32)
        for i, n in enumerate(object_nodes):
            _, d = self._r.render(scene, pr.RenderFlags.SEG, seg_node_map={n: (255, 255, 255)})
            amodal[i] = d > 0
            depth[i] = d
        return ObjectViews(rgb=np.ascontiguousarray(rgb), labels=labels, amodal=amodal, depth=depth)

    def delete(self) -> None:
        self._r.delete()


def get_renderer(width: int, height: int) -> Renderer:
    """The calling thread's renderer (an EGL context is current in one thread at a time)."""
    r = getattr(_local, "renderer", None)
    if r is None:
        r = _local.renderer = Renderer(width, height)
    return r
