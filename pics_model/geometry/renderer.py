"""``MultiViewRenderer``: K views of a mesh on an azimuth ring, offscreen, RGBA + depth.

One ``pyrender.OffscreenRenderer`` (one GL context) is made per renderer and reused for every
view of every mesh; :func:`get_renderer` keeps one per process and configuration, so a worker
pays the context start-up (tens of ms, more on OSMesa) once. The platform (EGL by default, OSMesa
selectable) is bound at the first use in a process, see ``gl.py``.

Shading: pyrender's PBR shader costs ~40 ms a view at 224 px on llvmpipe (Mesa's CPU GL) and
its 4x MSAA framebuffer doubles that; the unlit shader costs ~5 ms. So views use the unlit
(FLAT) shader, the texture times a per-vertex Lambert term baked once per mesh from a light
fixed in the world frame (shape stays legible from every azimuth), and no MSAA by default.

Camera frame (OpenGL): a camera looks down its -z axis with +y up. Azimuth 0 / elevation 0 looks
at the object from +z (the front of a built-in reconstruction); azimuth turns about +y.
"""
from __future__ import annotations

import atexit
from dataclasses import dataclass

import numpy as np
import trimesh

from .errors import DegenerateMeshError, RendererError
from .gl import import_pyrender


@dataclass
class MultiView:
    """K rendered views of one mesh.

    color: [K, R, R, 4] uint8 RGBA; alpha 255 exactly where a surface was hit, else 0.
    depth: [K, R, R] float32 distance along the view axis (scene units); 0 = no surface.
    azimuths_deg: [K]; elevation_deg: float.
    poses: [K, 4, 4] camera-to-world (OpenGL convention); intrinsics: [3, 3] in pixels, so a
    camera-frame point (x, y, z), z < 0, lands at u = cx + fx x / -z, v = cy - fy y / -z.
    """

    color: np.ndarray
    depth: np.ndarray
    azimuths_deg: np.ndarray
    elevation_deg: float
    poses: np.ndarray
    intrinsics: np.ndarray


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world pose [4, 4] of a camera at ``eye`` looking at ``target``."""
    z = eye - target
    z = z / np.linalg.norm(z)
    x = np.cross(up, z)
    x = x / np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, np.cross(z, x), z, eye
    return pose


def mesh_parts(mesh) -> list[tuple[trimesh.Trimesh, np.ndarray]]:
    """(geometry, 4x4 world transform) pairs of a Trimesh or a Scene (glTF). A scene is not
    concatenated: that would pack its textures into one atlas (8192x4096 for CesiumMilkTruck,
    seconds to build and upload); each part keeps its own texture."""
    if isinstance(mesh, trimesh.Trimesh):
        return [(mesh, np.eye(4))]
    if isinstance(mesh, trimesh.Scene):
        parts = []
        for node in mesh.graph.nodes_geometry:
            transform, name = mesh.graph[node]
            g = mesh.geometry[name]
            if isinstance(g, trimesh.Trimesh) and len(g.faces):
                parts.append((g, np.asarray(transform, float)))
        return parts
    raise TypeError(f"expected trimesh.Trimesh or Scene, got {type(mesh).__name__}")


class MultiViewRenderer:
    def __init__(self, resolution: int = 224, num_views: int = 6, elevation_deg: float = 15.0,
                 yfov_deg: float = 30.0, platform: str = "egl", msaa: bool = False,
                 ambient: float = 0.45, light_dir=(0.35, 0.8, 0.5), margin: float = 1.05):
        if not -89.0 <= elevation_deg <= 89.0:
            raise ValueError(f"elevation_deg must be in [-89, 89], got {elevation_deg}")
        self.resolution, self.num_views, self.elevation_deg = resolution, num_views, elevation_deg
        self.yfov = np.deg2rad(yfov_deg)
        self.platform, self.msaa, self.margin, self.ambient = platform, msaa, margin, ambient
        self.light_dir = np.asarray(light_dir, float) / np.linalg.norm(light_dir)
        self.azimuths_deg = np.arange(num_views) * 360.0 / num_views
        f = resolution / 2 / np.tan(self.yfov / 2)
        self.intrinsics = np.array([[f, 0, resolution / 2], [0, f, resolution / 2], [0, 0, 1]])
        self._pr = import_pyrender(platform)
        self._renderer = None
        self._create_context()
        self._scene = self._pr.Scene(bg_color=[0.0, 0.0, 0.0, 0.0])
        self._camera = self._pr.PerspectiveCamera(yfov=self.yfov, aspectRatio=1.0)
        self._camera_node = self._scene.add(self._camera)
        self.gl_renderer = self._gl_renderer_name()

    def _create_context(self):
        try:
            self._renderer = self._pr.OffscreenRenderer(self.resolution, self.resolution)
        except Exception as e:
            raise RendererError(f"cannot create a {self.platform} GL context: {type(e).__name__}: {e}") from e
        if not self.msaa:
            self._disable_msaa()

    def _disable_msaa(self):
        # pyrender hard-codes 4 samples in its offscreen framebuffer; 0 samples = a plain buffer.
        import pyrender.renderer as prr

        inner = self._renderer._renderer
        configure = inner._configure_main_framebuffer

        def configure_single_sample():
            real = prr.glRenderbufferStorageMultisample
            prr.glRenderbufferStorageMultisample = lambda tgt, _s, fmt, w, h: real(tgt, 0, fmt, w, h)
            try:
                configure()
            finally:
                prr.glRenderbufferStorageMultisample = real

        inner._configure_main_framebuffer = configure_single_sample

    def _gl_renderer_name(self) -> str:
        from OpenGL import GL

        self._renderer._platform.make_current()
        try:
            return GL.glGetString(GL.GL_RENDERER).decode()
        except Exception:
            return "unknown"
        finally:
            self._renderer._platform.make_uncurrent()

    def to_pyrender(self, mesh: trimesh.Trimesh, transform: np.ndarray | None = None):
        """pyrender.Mesh with the world-fixed Lambert term baked into its vertex colours
        (``transform``: where the mesh will be placed, for its normals in the world frame)."""
        pm = self._pr.Mesh.from_trimesh(mesh, smooth=True)
        n = mesh.vertex_normals
        if transform is not None:
            n = n @ np.linalg.inv(transform[:3, :3])  # normals transform by the inverse transpose
            n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        wrap = 0.3  # half-wrapped Lambert: faces turned from the light stay readable
        lambert = np.clip((n @ self.light_dir + wrap) / (1 + wrap), 0.0, 1.0)
        shade = (self.ambient + (1 - self.ambient) * lambert).astype(np.float32)
        for prim in pm.primitives:
            base = prim.color_0 if prim.color_0 is not None else np.ones((len(shade), 4), np.float32)
            color = np.array(base, np.float32)
            if color.max() > 1.0:
                color /= 255.0
            color[:, :3] *= shade[:, None]
            prim.color_0 = color
            prim.material.alphaMode = "OPAQUE"
            prim.material.doubleSided = not mesh.is_watertight  # open meshes show their inside
        return pm

    def frame(self, vertices: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Centre (of the bounds), radius and camera distance that keep the bounding sphere
        about that centre inside the view from every direction."""
        center = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
        radius = float(np.linalg.norm(vertices - center, axis=1).max())
        if not np.isfinite(radius) or radius <= 1e-9:
            raise DegenerateMeshError(f"mesh has no extent (radius={radius})")
        return center, radius, self.margin * radius / np.sin(self.yfov / 2)

    def poses(self, center: np.ndarray, distance: float) -> np.ndarray:
        az = np.deg2rad(self.azimuths_deg)
        el = np.deg2rad(self.elevation_deg)
        dirs = np.stack([np.sin(az) * np.cos(el), np.full_like(az, np.sin(el)), np.cos(az) * np.cos(el)], 1)
        return np.stack([look_at(center + distance * d, center) for d in dirs])

    def render(self, mesh) -> MultiView:
        """Render the K ring views of ``mesh`` (Trimesh or Scene). Raises DegenerateMeshError for
        a mesh with no faces or extent, RendererError for a GL failure."""
        parts = [(g, T) for g, T in mesh_parts(mesh) if len(g.faces) and len(g.vertices)]
        if not parts:
            raise DegenerateMeshError("mesh has no faces")
        vertices = np.concatenate([trimesh.transform_points(g.vertices, T) for g, T in parts])
        if not np.isfinite(vertices).all():
            raise DegenerateMeshError("mesh has non-finite vertices")
        center, radius, distance = self.frame(vertices)
        poses = self.poses(center, distance)
        self._camera.znear = max(distance - 1.01 * radius, 1e-3 * distance)
        self._camera.zfar = distance + 1.01 * radius
        try:
            color, depth = self._render_views(parts, poses)
        except Exception as first:
            # Any pyrender renderer deleted elsewhere in this process (pyrender's EGL delete calls
            # eglTerminate on the display all contexts share) kills this context too: make a new
            # context and try once more before calling it a renderer error.
            try:
                self._discard_context()
                self._create_context()
                color, depth = self._render_views(parts, poses)
            except Exception as e:
                raise RendererError(f"{self.platform} render failed: {type(first).__name__}: {first}; "
                                    f"after a new context: {type(e).__name__}: {e}") from e
        # Background is the clear colour (0, 0, 0) already; alpha marks where a surface was hit.
        color[..., 3] = (depth > 0).view(np.uint8) * np.uint8(255)
        return MultiView(color, depth, self.azimuths_deg.copy(), self.elevation_deg, poses, self.intrinsics)

    def _render_views(self, parts, poses) -> tuple[np.ndarray, np.ndarray]:
        # fresh pyrender meshes each time: a pyrender primitive stays bound to the context it
        # was first drawn in
        nodes = [self._scene.add(self.to_pyrender(g, T), pose=T) for g, T in parts]
        R, K = self.resolution, self.num_views
        color = np.empty((K, R, R, 4), np.uint8)
        depth = np.empty((K, R, R), np.float32)
        flags = self._pr.RenderFlags.FLAT
        try:
            for k in range(K):
                self._scene.set_pose(self._camera_node, poses[k])
                rgb, d = self._renderer.render(self._scene, flags=flags)
                color[k, ..., :3] = rgb[..., :3]
                depth[k] = d
        finally:
            for node in nodes:  # their GL buffers are freed at the next render
                self._scene.remove_node(node)
        return color, depth

    def _discard_context(self):
        """Drop our context without eglTerminate (pyrender's delete would terminate the display
        that every other renderer of this process shares)."""
        r, self._renderer = self._renderer, None
        if r is None:
            return
        platform = r._platform
        try:
            if self.platform == "egl":
                from OpenGL.EGL import eglDestroyContext

                try:
                    platform.make_current()
                    r._renderer.delete()
                except Exception:
                    pass  # a dead context: nothing left to free in it
                if platform._egl_context is not None:
                    eglDestroyContext(platform._egl_display, platform._egl_context)
                platform._egl_context = None
            else:
                r.delete()
        except Exception:
            pass

    def close(self):
        self._discard_context()


_RENDERERS: dict[tuple, MultiViewRenderer] = {}


@atexit.register
def _close_all() -> None:
    # Free GL contexts before interpreter teardown, where PyOpenGL's handlers can no longer import.
    for r in list(_RENDERERS.values()):
        try:
            r.close()
        except Exception:
            pass
    _RENDERERS.clear()


def get_renderer(**config) -> MultiViewRenderer:
    """The process-wide renderer for this configuration (created at the first call)."""
    key = tuple(sorted(config.items()))
    if key not in _RENDERERS:
        _RENDERERS[key] = MultiViewRenderer(**config)
    return _RENDERERS[key]


def drop_renderer(**config) -> None:
    """Forget (and free) a process-wide renderer, e.g. after a GL error left it unusable."""
    r = _RENDERERS.pop(tuple(sorted(config.items())), None)
    if r is not None:
        try:
            r.close()
        except Exception:
            pass
