"""Training-time object augmentation (pics_model.data, owned by the model) applied to real priors:
does a transform of the patch stay consistent with the rendered views of the same object?

Reference for "consistent": reconstruct and render the transformed patch itself, and compare its
views with the transformed views of the original.
"""
from __future__ import annotations

import numpy as np
import pytest

from tasks.render_priors.coco_objects import load_objects

K = 6


@pytest.fixture(scope="module")
def cat(shared_data):
    objs = load_objects(shared_data / "coco_hf_39769/instances_39769.json", shared_data / "coco_hf_39769")
    return next(o for o in objs if o["annotation_id"] == 2190842)


def silhouettes(patch, mask, elevation_deg):
    from pics_model.geometry import get_renderer, reconstruct

    views = get_renderer(resolution=224, num_views=K, elevation_deg=elevation_deg).render(reconstruct(patch, mask))
    return views.color[..., 3] > 0


def as_prior_channel(sil: np.ndarray) -> np.ndarray:
    """Silhouettes as the [K, R, R, 3] uint8 priors rotate_object takes: object black on white,
    so its white refill is background and the silhouette survives the transform exactly."""
    return np.repeat(np.where(sil, 0, 255).astype(np.uint8)[..., None], 3, -1)


def normalised(sil: np.ndarray, size: int = 128) -> np.ndarray:
    """Centroid to the centre, area to a fixed share: compares shapes whatever the framing."""
    import cv2

    ys, xs = np.nonzero(sil)
    s = np.sqrt(0.12 * size * size / len(xs))
    M = np.array([[s, 0, size / 2 - s * xs.mean()], [0, s, size / 2 - s * ys.mean()]])
    return cv2.warpAffine(sil.astype(np.uint8), M, (size, size), flags=cv2.INTER_NEAREST) > 0


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_rotation_keeps_the_front_view_consistent(cat):
    """An in-plane rotation of the patch is a roll of the object about the front camera's axis:
    exactly an in-plane rotation of the front view (elevation 0). rotate_object turns every view by
    the same angle, i.e. it rolls every camera of the ring about its own axis: each view stays a
    true view of the object, but the set is not the ring of the rolled object (its back view would
    turn the other way, its side views would change shape). Only the front view is asserted."""
    from pics_model.data import rotate_object

    angle = 25.0
    sil = silhouettes(cat["patch"], cat["mask"], 0.0)
    patch_r, mask_r, priors_r = rotate_object(cat["patch"], cat["mask"], as_prior_channel(sil), angle)
    rotated_views = priors_r[..., 0] < 128
    assert priors_r.shape == (K, 224, 224, 3)
    physical = silhouettes(patch_r, mask_r, 0.0)  # the rotated object, reconstructed and rendered
    assert iou(normalised(rotated_views[0]), normalised(physical[0])) > 0.9
    # and the rotation really turned it: the unrotated front view does not match
    assert iou(normalised(sil[0]), normalised(physical[0])) < iou(normalised(rotated_views[0]), normalised(physical[0])) - 0.1


def test_flip_keeps_priors_consistent_when_azimuths_are_reversed(cat):
    """Mirroring an object in x maps its view at azimuth a to the mirror of its view at -a. Checked
    on the renderer's own output, whatever the augmentation code does."""
    sil = silhouettes(cat["patch"], cat["mask"], 15.0)
    physical = silhouettes(cat["patch"][:, ::-1].copy(), cat["mask"][:, ::-1].copy(), 15.0)
    for k in range(K):
        assert iou(physical[k], sil[(-k) % K][:, ::-1]) > 0.97


def test_augment_object_flip_gives_the_mirrored_objects_views_in_reversed_order(cat):
    """pics_model.data.augment_object flips every view in place. That is the mirrored object's view
    set with azimuth a relabelled -a: right as a set, which is all the order-invariant ShapeEncoder
    sees; anything that reads the view order or ``azimuths_deg`` after a flip must reverse them."""
    from pics_model.data import AugmentConfig, augment_object

    sil = silhouettes(cat["patch"], cat["mask"], 15.0)
    physical = silhouettes(cat["patch"][:, ::-1].copy(), cat["mask"][:, ::-1].copy(), 15.0)
    cfg = AugmentConfig(flip_p=1.0, color_p=0.0, rotate_p=0.0)
    _, _, priors = augment_object(cat["patch"], cat["mask"], as_prior_channel(sil), np.random.default_rng(0), cfg)
    flipped = priors[..., 0] < 128
    for k in range(K):
        assert iou(flipped[k], physical[(-k) % K]) > 0.97, f"view {k} (azimuth {k * 360 // K} deg)"
    # the order does matter for a generic object: the side views are not their own mirror images
    assert min(iou(flipped[k], physical[k]) for k in (1, 2)) < 0.9
