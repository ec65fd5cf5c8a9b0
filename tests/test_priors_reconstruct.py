"""Built-in single-view reconstruction of real object patches, and the reconstructor plug-in registry."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.render_priors.coco_objects import load_objects


@pytest.fixture(scope="module")
def real_objects(shared_data):
    """Every instance of the real COCO/LVIS fixtures whose image is present (cats, remotes, couch,
    bed, people, a baseball scene), cut like decompose cuts its patches."""
    objs = load_objects(shared_data / "coco_hf_39769/instances_39769.json", shared_data / "coco_hf_39769")
    objs += load_objects(shared_data / "coco_mmpose/test_coco.json", shared_data / "coco_mmpose")
    objs += load_objects(shared_data / "lvis/lvis_val_100.json", shared_data / "lvis/images")
    assert len(objs) >= 20
    return objs


def outline_silhouette(views, k: int, mesh, mask: np.ndarray) -> np.ndarray:
    """What view ``k`` should show if the object's outline is the mask: cast each pixel's ray onto
    the plane z = 0 and look the hit up in the mask (``patch_to_world`` maps patch pixels there)."""
    R = views.color.shape[1]
    K, pose = views.intrinsics, views.poses[k]
    u, v = np.meshgrid(np.arange(R) + 0.5, np.arange(R) + 0.5)
    ray = np.stack([(u - K[0, 2]) / K[0, 0], -(v - K[1, 2]) / K[1, 1], -np.ones_like(u)], -1) @ pose[:3, :3].T
    origin = pose[:3, 3]
    t = -origin[2] / ray[..., 2]
    hit = origin + t[..., None] * ray
    to_patch = np.linalg.inv(mesh.metadata["patch_to_world"])
    pu, pv, _ = np.moveaxis(np.stack([hit[..., 0], hit[..., 1], np.ones_like(u)], -1) @ to_patch.T, -1, 0)
    pu, pv = np.floor(pu).astype(int), np.floor(pv).astype(int)
    ok = (t > 0) & (pu >= 0) & (pu < mask.shape[1]) & (pv >= 0) & (pv < mask.shape[0])
    out = np.zeros((R, R), bool)
    out[ok] = mask[pv[ok], pu[ok]] > 127
    return out


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_builtin_reconstruction_is_watertight_and_front_view_matches_mask(real_objects):
    from pics_model.geometry import get_reconstructor, get_renderer

    recon = get_reconstructor("builtin")
    # elevation 0: azimuth 0 looks straight at the front, azimuth 180 at the (mirrored) back
    renderer = get_renderer(resolution=224, num_views=4, elevation_deg=0.0)
    front_ious, back_ious = [], []
    for o in real_objects:
        mesh = recon(o["patch"], o["mask"])
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0, o["annotation_id"]
        assert mesh.visual.kind == "texture" and mesh.visual.uv.shape == (len(mesh.vertices), 2)
        views = renderer.render(mesh)
        for k, store in ((0, front_ious), (2, back_ious)):
            store.append(iou(views.color[k, ..., 3] > 0, outline_silhouette(views, k, mesh, o["mask"])))
    worst = int(np.argmin(front_ious))
    assert min(front_ious) >= 0.9, f"annotation {real_objects[worst]['annotation_id']}: IoU {front_ious[worst]:.3f}"
    assert min(back_ious) >= 0.9
    assert np.mean(front_ious) >= 0.95


def test_front_view_carries_the_patch_texture(real_objects):
    """The front view shows the patch: unproject each pixel with its depth to the surface point,
    whose (x, y) is where the texture was sampled, and compare with the patch there."""
    from pics_model.geometry import get_renderer, reconstruct

    cat = next(o for o in real_objects if o["annotation_id"] == 2190839)
    mesh = reconstruct(cat["patch"], cat["mask"])
    views = get_renderer(resolution=224, num_views=4, elevation_deg=0.0).render(mesh)
    d = views.depth[0]
    hit = d > 0
    K, pose = views.intrinsics, views.poses[0]
    v, u = np.nonzero(hit)
    z = d[hit]
    cam = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0] * z, -(v + 0.5 - K[1, 2]) / K[1, 1] * z, -z, np.ones_like(z)], -1)
    world = cam @ pose.T
    assert world[:, 2].min() > -0.03  # the front surface (and a sliver of the outline wall)
    pu, pv, _ = (np.stack([world[:, 0], world[:, 1], np.ones_like(z)], -1)
                 @ np.linalg.inv(mesh.metadata["patch_to_world"]).T).T
    inside = cat["mask"][np.clip(pv.astype(int), 0, 223), np.clip(pu.astype(int), 0, 223)] > 0
    src = cat["patch"][np.clip(pv.astype(int), 0, 223), np.clip(pu.astype(int), 0, 223)].astype(float)
    got = views.color[0][hit, :3].astype(float)
    # Colours agree up to the baked shading factor (grey, in (0, 1]): compare luminance ranks
    # and hue-carrying channel ratios on object pixels.
    lum_got, lum_src = got.mean(1)[inside], src.mean(1)[inside]
    assert np.corrcoef(lum_got, lum_src)[0, 1] > 0.9
    assert np.all(got[inside].mean(0) <= src[inside].mean(0) + 1)  # shading only darkens


def test_broken_inputs_raise_with_reasons():
    from pics_model.geometry import DegenerateMeshError, EmptyMaskError, reconstruct

    patch = np.full((224, 224, 3), 255, np.uint8)
    with pytest.raises(EmptyMaskError) as e:
        reconstruct(patch, np.zeros((224, 224), np.uint8))
    assert e.value.reason == "empty_mask"
    speck = np.zeros((224, 224), np.uint8)
    speck[100:102, 100:102] = 255
    with pytest.raises(DegenerateMeshError) as e:
        reconstruct(patch, speck)
    assert e.value.reason == "degenerate_mesh"
    with pytest.raises(ValueError, match="mask shape"):
        reconstruct(patch, np.zeros((100, 224), np.uint8))
    # RGBA patches carry their mask in alpha
    rgba = np.zeros((224, 224, 4), np.uint8)
    rgba[60:160, 80:140] = 200
    mesh = reconstruct(rgba)
    assert mesh.is_watertight


def test_thin_and_holed_shapes_stay_closed():
    from pics_model.geometry import reconstruct

    yy, xx = np.mgrid[:224, :224]
    ring = (np.hypot(xx - 112, yy - 112) < 90) & (np.hypot(xx - 112, yy - 112) > 50)  # a hole
    ring |= (np.abs(xx - 20) < 2) & (yy > 60)  # a 4 px wire, thinner than two cells
    ring[10:14, 10:14] = ring[14:18, 14:18] = True  # two squares touching at a corner
    mesh = reconstruct(np.full((224, 224, 3), 128, np.uint8), ring)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert mesh.euler_number <= 0  # genus >= 1: the hole is a real tunnel through the solid


# --- plug-ins -------------------------------------------------------------------------------------

def scaled_builtin(weights, **options):
    """A stand-in learned plug-in: its 'weights' file holds the inflation thickness."""
    from pics_model.geometry import InflateConfig, inflate

    thickness = float(np.load(weights)["thickness"])
    return lambda patch, mask: inflate(patch, mask, InflateConfig(thickness=thickness))


scaled_builtin.needs_weights = True


def test_registry_errors_are_clear(tmp_path):
    from pics_model.geometry import (ReconstructorNotFoundError, WeightsNotFoundError, available_reconstructors,
                                     get_reconstructor, register_reconstructor)

    assert "builtin" in available_reconstructors()
    with pytest.raises(ReconstructorNotFoundError, match="'nope'.*available.*builtin"):
        get_reconstructor("nope")
    with pytest.raises(ReconstructorNotFoundError, match="cannot import"):
        get_reconstructor("no_such_module_xyz:build")
    register_reconstructor("needs_w", needs_weights=True)(scaled_builtin)
    with pytest.raises(WeightsNotFoundError, match="reconstructor_weights"):
        get_reconstructor("needs_w")
    with pytest.raises(WeightsNotFoundError, match="missing.npz"):
        get_reconstructor("needs_w", tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="takes no weights"):
        get_reconstructor("builtin", tmp_path / "w.npz")


def test_plugin_by_import_path_loads_its_weights(tmp_path):
    from pics_model.geometry import get_reconstructor

    square = np.zeros((224, 224), np.uint8)
    square[50:170, 50:170] = 255
    patch = np.full((224, 224, 3), 90, np.uint8)
    heights = []
    for thickness in (0.3, 1.0):
        w = tmp_path / f"w{thickness}.npz"
        np.savez(w, thickness=thickness)
        mesh = get_reconstructor(f"{__name__}:scaled_builtin", w)(patch, square)
        heights.append(mesh.extents[2])
    assert heights[1] > 2.5 * heights[0]  # the weights really drive the reconstruction
