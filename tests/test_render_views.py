"""MultiViewRenderer on the real meshes of ../shared/data/meshes (EGL, Mesa llvmpipe on CPU)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

MESHES = ["spot/spot_triangulated.obj", "fuze/fuze.obj", "gltf/Duck.glb", "gltf/BoxTextured.glb",
          "gltf/CesiumMilkTruck.glb", "trimesh_models/bunny.ply"]


def load_mesh(shared_data, name):
    import trimesh
    from PIL import Image

    mesh = trimesh.load(shared_data / "meshes" / name)
    if name.startswith("spot/"):  # Spot's OBJ names no material: its texture is assigned in code
        mesh.visual.material = trimesh.visual.material.SimpleMaterial(
            image=Image.open(shared_data / "meshes/spot/spot_texture.png"), diffuse=[255, 255, 255, 255])
    return mesh


@pytest.fixture(scope="module")
def renderer():
    from pics_model.geometry import get_renderer

    return get_renderer(resolution=224, num_views=6, elevation_deg=15.0)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("name", MESHES)
def test_real_mesh_views(shared_data, renderer, name):
    views = renderer.render(load_mesh(shared_data, name))
    K, R = 6, 224
    assert views.color.shape == (K, R, R, 4) and views.color.dtype == np.uint8
    assert views.depth.shape == (K, R, R) and views.depth.dtype == np.float32
    np.testing.assert_allclose(views.azimuths_deg, [0, 60, 120, 180, 240, 300])
    sil = views.color[..., 3] > 0
    for k in range(K):
        s = sil[k]
        assert 0.05 < s.mean() < 0.8, f"view {k}: object covers {s.mean():.2f} of the image"
        # framed by the bounds: whole object inside, not touching the border, and centred
        assert not (s[0].any() or s[-1].any() or s[:, 0].any() or s[:, -1].any()), f"view {k} is cut"
        ys, xs = np.nonzero(s)
        assert abs((xs.min() + xs.max() + 1) / 2 - R / 2) < 0.15 * R
        assert abs((ys.min() + ys.max() + 1) / 2 - R / 2) < 0.15 * R
        assert max(xs.max() - xs.min(), ys.max() - ys.min()) > 0.4 * R  # fills the frame
        # depth: finite and positive exactly inside the silhouette, 0 (no surface) outside
        assert np.isfinite(views.depth[k]).all()
        assert (views.depth[k][s] > 0).all() and (views.depth[k][~s] == 0).all()
        assert (views.color[k][~s] == 0).all()
    # neighbouring azimuths see different outlines (a real ring, not one view six times)
    for k in range(K):
        assert iou(sil[k], sil[(k + 1) % K]) < 0.97, f"views {k} and {(k + 1) % K} have the same silhouette"


def test_texture_reaches_the_views(shared_data, renderer):
    import trimesh

    textured = renderer.render(load_mesh(shared_data, "spot/spot_triangulated.obj"))
    plain = trimesh.load(shared_data / "meshes/spot/spot_triangulated.obj")
    plain.visual = trimesh.visual.ColorVisuals(plain)  # same geometry, no texture
    untextured = renderer.render(plain)
    np.testing.assert_array_equal(textured.color[..., 3], untextured.color[..., 3])
    sil = textured.color[..., 3] > 0
    # Spot's texture has black patches on white: far more colour spread than shading alone gives
    assert textured.color[..., :3][sil].std() > 2 * untextured.color[..., :3][sil].std()


def test_cameras_project_the_mesh_onto_its_silhouette(shared_data, renderer):
    """poses/intrinsics describe the cameras that made the views: vertices land inside the silhouette."""
    import trimesh
    from scipy import ndimage

    mesh = trimesh.load(shared_data / "meshes/trimesh_models/bunny.ply")
    views = renderer.render(mesh)
    K = views.intrinsics
    for k in range(6):
        cam = trimesh.transform_points(mesh.vertices, np.linalg.inv(views.poses[k]))
        assert (cam[:, 2] < 0).all()
        u = K[0, 2] + K[0, 0] * cam[:, 0] / -cam[:, 2]
        v = K[1, 2] - K[1, 1] * cam[:, 1] / -cam[:, 2]
        # one pixel of slack: vertices on the outline may fall either side of a pixel edge
        sil = ndimage.binary_dilation(views.color[k, ..., 3] > 0)
        inside = sil[np.clip(np.floor(v).astype(int), 0, 223), np.clip(np.floor(u).astype(int), 0, 223)]
        assert inside.mean() > 0.995


def test_renderer_is_reused_per_process():
    from pics_model.geometry import get_renderer

    a = get_renderer(resolution=224, num_views=6, elevation_deg=15.0)
    assert get_renderer(resolution=224, num_views=6, elevation_deg=15.0) is a
    assert a._renderer is get_renderer(resolution=224, num_views=6, elevation_deg=15.0)._renderer


def test_degenerate_meshes_raise(renderer):
    import trimesh

    from pics_model.geometry import DegenerateMeshError

    with pytest.raises(DegenerateMeshError):
        renderer.render(trimesh.Trimesh(vertices=np.zeros((3, 3)), faces=[[0, 1, 2]]))
    with pytest.raises(DegenerateMeshError):
        renderer.render(trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), int)))


def test_other_platform_in_a_bound_process_is_an_error(renderer):
    from pics_model.geometry import MultiViewRenderer, RendererError

    with pytest.raises(RendererError, match="already bound"):
        MultiViewRenderer(platform="osmesa")


OSMESA_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, trimesh
    from pics_model.geometry import get_renderer, RendererError
    try:
        r = get_renderer(resolution=224, num_views=6, elevation_deg=15.0, platform=sys.argv[1])
    except RendererError as e:
        print("UNAVAILABLE", e); sys.exit(0)
    v = r.render(trimesh.load(sys.argv[2]))
    np.save(sys.argv[3], v.color[..., 3] > 0)
    print("OK", r.gl_renderer)
""")


def test_osmesa_renders_like_egl(shared_data, tmp_path):
    """OSMesa is selectable; it binds per process, so each platform runs in its own subprocess."""
    bunny = str(shared_data / "meshes/trimesh_models/bunny.ply")
    sils = {}
    for platform in ("egl", "osmesa"):
        out = tmp_path / f"{platform}.npy"
        res = subprocess.run([sys.executable, "-c", OSMESA_SCRIPT, platform, bunny, str(out)],
                             capture_output=True, text=True, timeout=120, env={"PYOPENGL_PLATFORM": platform,
                                                                                  "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr[-2000:]
        if res.stdout.startswith("UNAVAILABLE"):
            pytest.skip(f"OSMesa not installed here: {res.stdout.strip()}")
        sils[platform] = np.load(out)
    for k in range(6):
        assert iou(sils["egl"][k], sils["osmesa"][k]) > 0.99


MISSING_OSMESA_SCRIPT = textwrap.dedent("""
    from pics_model.geometry import MultiViewRenderer, RendererError, gl
    gl.OSMESA_LIBRARY = "OSMesaNotInstalled"  # hides libOSMesa whether or not this machine has it
    try:
        MultiViewRenderer(platform="osmesa")
    except RendererError as e:
        print("RendererError:", e)
""")


def test_missing_osmesa_library_is_a_renderer_error():
    """PyOpenGL binds OSMesa without its library and fails later with an AttributeError; the
    renderer must say what is missing instead (and so the OSMesa test above skips)."""
    res = subprocess.run([sys.executable, "-c", MISSING_OSMESA_SCRIPT], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1], env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("RendererError: OSMesa unavailable: libOSMesaNotInstalled.so not found")
    assert "apt-get install libosmesa6" in res.stdout


def test_renderer_survives_another_pyrender_renderer_being_deleted(renderer):
    """pyrender's EGL delete terminates the display every context of the process shares; the
    cached renderer must recover (new context) instead of failing every later object."""
    import trimesh

    from pics_model.geometry.gl import import_pyrender

    mesh = trimesh.creation.icosphere(subdivisions=2)
    before = renderer.render(mesh)
    other = import_pyrender("egl").OffscreenRenderer(32, 32)
    other.delete()
    after = renderer.render(mesh)
    np.testing.assert_array_equal(before.color, after.color)
