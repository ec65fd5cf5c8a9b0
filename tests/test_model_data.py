"""Item building: geometry of target/hint/routing masks, object augmentation, collate."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pics_model.data import (
    AugmentConfig, augment_object, build_item, collate, expand_boxes, rasterize_boxes, rotate_object,
    tight_box_from_mask,
)
from pics_model.testing import synthetic_sample


def test_build_item_geometry():
    rng = np.random.default_rng(0)
    s = synthetic_sample(rng, n=2, height=48, width=80, views=3)
    s["boxes_expanded"] = np.array([[0, 0, 40, 24], [20, 12, 80, 48]], np.float32)
    it = build_item(s, 64, None)
    assert it["target"].shape == (3, 64, 64) and it["hint"].shape == (4, 64, 64)
    assert it["objects"].shape == (2, 3, 64, 64) and it["priors"].shape == (2, 3, 3, 64, 64)
    assert it["target"].min() >= -1 and it["target"].max() <= 1
    assert 0 <= it["objects"].min() and it["objects"].max() <= 1
    # 80x48 -> centred in an 80x80 square (16 px bands top and bottom) -> 64: scale 0.8
    top = 16 * 0.8
    assert torch.allclose(it["crop"], torch.tensor([0, top, 64, top + 48 * 0.8]))
    assert torch.allclose(it["boxes"][0], torch.tensor([0, top, 32, top + 24 * 0.8]))
    valid, mask = it["valid"], it["hint"][3]
    assert valid[:12].sum() == 0 and valid[13:51].all() and valid[52:].sum() == 0
    assert (mask[valid == 0] == -1).all()  # square padding
    union = it["routing_masks"].amax(0)
    assert (mask[(valid == 1) & (union == 1)] == 1).all() and (mask[(valid == 1) & (union == 0)] == 0).all()
    # every expanded box is zeroed in the hint's RGB, the rest is the target
    assert (it["hint"][:3][:, union == 1] == 0).all()
    assert torch.equal(it["hint"][:3][:, union == 0], it["target"][:, union == 0])
    # the two boxes overlap
    assert (it["routing_masks"].sum(0) == 2).any()


def test_build_item_errors_name_the_field():
    rng = np.random.default_rng(0)
    s = synthetic_sample(rng)
    with pytest.raises(ValueError, match="shard-7.parquet: sample field 'patches'"):
        build_item({**s, "patches": s["patches"][:1]}, 64, None, source="shard-7.parquet")
    with pytest.raises(ValueError, match="'boxes_expanded'.*empty box"):
        build_item({**s, "boxes_expanded": np.array([[10, 10, 10, 30], [0, 0, 5, 5]], np.float32)}, 64, None)
    with pytest.raises(ValueError, match="'image'"):
        build_item({**s, "image": s["image"].astype(np.float32)}, 64, None)


def test_rotate_object_refills_white_and_moves_mask_with_patch():
    patch = np.full((33, 33, 3), 255, np.uint8)
    mask = np.zeros((33, 33), np.uint8)
    patch[2:8, 14:19] = (200, 10, 10)  # a red bar near the top
    mask[2:8, 14:19] = 255
    priors = np.full((2, 33, 33, 3), 255, np.uint8)
    priors[:, 2:8, 14:19] = (10, 200, 10)
    p, m, pr = rotate_object(patch, mask, priors, 90.0)  # counter-clockwise: top -> left
    assert m[14:19, 2:8].min() == 255 and m[2:8, 14:19].max() == 0
    assert (p[m > 0] == (200, 10, 10)).all() and (pr[:, m > 0] == (10, 200, 10)).all()
    # corners rotated in from outside the canvas are white, mask zero
    p, m, _ = rotate_object(np.zeros((33, 33, 3), np.uint8), np.full((33, 33), 255, np.uint8), None, 45.0)
    assert (p[0, 0] == 255).all() and m[0, 0] == 0 and (p[16, 16] == 0).all()


def test_augmentation_is_shared_by_patch_mask_and_priors():
    rng = np.random.default_rng(3)
    s = synthetic_sample(rng, n=1, views=2, view_size=64)
    s["priors"][0] = s["patches"][0]  # priors identical to the patch ...
    cfg = AugmentConfig(flip_p=1.0, color_p=0.0, rotate_p=1.0)
    p, m, pr = augment_object(s["patches"][0], s["patch_masks"][0], s["priors"][0], rng, cfg)
    assert (pr == p).all()  # ... stay identical after the shared flip + rotation
    # outside the rotated mask: white background / refill (bilinear blends a 1-px rim)
    assert (p[m == 0] > 200).all(-1).mean() > 0.95
    assert not (p == s["patches"][0]).all()
    assert math.isclose(AugmentConfig().rotate_max_deg, 30.0)  # the paper's pi/6


def test_expand_and_rasterize():
    b = expand_boxes(np.array([[10, 10, 30, 50]]), 1.2, 100, 52)
    assert np.allclose(b, [[8, 6, 32, 52]])  # height clipped to the image
    assert np.allclose(tight_box_from_mask(np.pad(np.ones((3, 4)), ((2, 0), (5, 0)))), [5, 2, 9, 5])
    m = rasterize_boxes(np.array([[0, 0, 2, 2], [3.1, 3.1, 3.2, 3.2]]), 4)
    assert m[0].sum() == 4 and m[1].sum() == 1  # a box holding no pixel centre keeps one pixel


def test_collate_pads_objects_and_priors():
    rng = np.random.default_rng(1)
    a = build_item(synthetic_sample(rng, n=2, views=2), 32, None, object_size=32)
    b = build_item(synthetic_sample(rng, n=3, views=None), 32, None, object_size=32)
    batch = collate([a, b])
    assert batch["objects"].shape == (2, 3, 3, 32, 32) and batch["routing_masks"].shape == (2, 3, 32, 32)
    assert batch["object_valid"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["prior_valid"].tolist() == [[True, True, False], [False, False, False]]
    assert batch["objects"][0, 2].abs().sum() == 0 and batch["routing_masks"][0, 2].sum() == 0


def test_box_masks_rules_and_region_map():
    """One rasteriser, two named rules: pixel centres (routing, metrics) and covered pixels (region map)."""
    from pics_model.data import box_masks, content_window, region_map

    box = [[0.6, 0.2, 2.4, 1.5]]
    centre = box_masks(box, 3, 4)[0]
    assert np.argwhere(centre).tolist() == [[0, 1]]  # x + .5 in [0.6, 2.4), y + .5 in [0.2, 1.5)
    cover = box_masks(box, 3, 4, rule="cover")[0]
    assert cover[:2, :3].all() and cover.sum() == 6  # floor(x0) <= x < ceil(x1), likewise y
    with pytest.raises(ValueError, match="rule"):
        box_masks(box, 3, 4, rule="corner")
    # 200 x 100 image on a 64 px square: 16 px of padding above and below the content window
    assert content_window(100, 200, 64) == (0, 16, 64, 48)
    rm = region_map([[0, 0, 100, 100], [50, 0, 200, 100]], 100, 200, 64)
    assert rm.dtype == np.uint8 and rm.shape == (64, 64)
    assert rm[20, 10] == 1 and rm[20, 20] == 3 and rm[20, 40] == 2 and not rm[:16].any() and not rm[48:].any()
def _swap(sample: dict) -> dict:
    """The same sample with its objects in reverse order."""
    keys = ("boxes_expanded", "boxes_tight", "patches", "patch_masks")
    return {**sample, **{k: sample[k][::-1].copy() for k in keys}}


def test_collage_hint_shows_the_objects_and_ignores_their_order():
    rng = np.random.default_rng(0)
    s = synthetic_sample(rng, n=2, height=48, width=80, views=None)
    plain, it = build_item(s, 64, None), build_item(s, 64, None, collage=True)
    assert plain["hint"].shape == (4, 64, 64) and it["hint"].shape == (5, 64, 64)
    assert torch.equal(it["hint"][3], plain["hint"][3])  # the mask channel is unchanged
    coverage = it["hint"][4]
    assert {0.0, 1.0, 2.0} <= set(coverage.unique().tolist())  # the silhouettes overlap
    assert coverage.min() >= 0 and coverage.max() <= 2  # fractions at the silhouettes' edges
    assert torch.equal(it["hint"][:3][:, coverage == 0], plain["hint"][:3][:, coverage == 0])
    # one silhouette alone: its patch's colours, not the zeroed background (the patches are noise
    # inside their silhouettes; bicubic downscaling averages it, hence the mean over the region)
    single = it["hint"][:3][:, coverage == 1]
    assert single.shape[1] > 50 and (single.abs().sum(0) > 0).all()
    assert torch.allclose(single.mean(1), torch.zeros(3), atol=0.15)  # mean of uniform noise
    swapped = build_item(_swap(s), 64, None, collage=True)
    assert torch.equal(swapped["hint"], it["hint"])
    assert not torch.equal(swapped["objects"], it["objects"])  # the objects themselves did swap


def test_collage_hint_mean_in_the_overlap():
    s = synthetic_sample(np.random.default_rng(0), n=2, height=64, width=64, views=None,
                         boxes=np.array([[0, 0, 46, 46], [18, 18, 64, 64]], np.float32))
    s["patches"][0][s["patch_masks"][0] > 0] = (255, 0, 0)
    s["patches"][1][s["patch_masks"][1] > 0] = (0, 0, 255)
    hint = build_item(s, 64, None, collage=True)["hint"]
    both = hint[4] == 2
    assert both.sum() > 20
    assert torch.allclose(hint[:3][:, both], torch.tensor([0.0, -1.0, 0.0])[:, None])  # (red + blue) / 2


def test_collage_is_drawn_at_the_source_resolution():
    """A silhouette edge that falls inside a frame pixel gives that pixel a fractional coverage
    and the silhouette's own colour (not darkened towards the zeroed box); the residual's start
    blends that colour over the fill by the coverage (the rule of `PICSModel.hint_latents`)."""
    from pics_model.data import push_pull_fill

    # 128 x 128 source on a 64 px frame: one frame pixel = 2 x 2 source pixels; the tight box
    # [21, 21, 41, 41] starts and ends half-way through frame pixels 10 and 20
    s = synthetic_sample(np.random.default_rng(0), n=1, height=128, width=128, views=None,
                         boxes=np.array([[21, 21, 41, 41]], np.float32))
    s["boxes_tight"] = np.array([[21, 21, 41, 41]], np.float32)
    s["boxes_expanded"] = np.array([[10, 10, 52, 52]], np.float32)
    s["patch_masks"][0][:] = 255  # the whole patch is the object: a red square
    s["patches"][0][:] = (255, 0, 0)
    hint = build_item(s, 64, None, collage=True)["hint"]
    cov = hint[4]
    assert cov[15, 10] == 0.5 and cov[15, 20] == 0.5 and cov[10, 10] == 0.25 and cov[15, 15] == 1.0
    assert cov[15, 9] == 0 and cov[15, 21] == 0
    assert torch.allclose(hint[:3, 15, 10], torch.tensor([1.0, -1.0, -1.0]))  # red, not half red
    known = torch.where(hint[3:4] < 0.5, 1.0, hint[4:5].clamp(0, 1))
    filled = push_pull_fill(hint[None, :3], known[None])[0]
    assert torch.allclose(filled[:, 15, 15], torch.tensor([1.0, -1.0, -1.0]))
    edge = filled[:, 15, 10]  # half red, half the fill of the box around it
    assert -1.0 < edge[1] < 0.5 and edge[0] > edge[1]


def test_collage_is_drawn_from_the_patches_before_augmentation():
    """Augmentation (flip, rotation, colour) reaches the encoder's objects, not the collage: the
    hint of an augmented item is the deterministic one (what inference builds)."""
    s = synthetic_sample(np.random.default_rng(0), n=2, views=None)
    always = AugmentConfig(flip_p=1.0, color_p=1.0, rotate_p=1.0)
    aug = build_item(s, 64, np.random.default_rng(3), always, collage=True)
    ref = build_item(s, 64, None, collage=True)
    assert torch.equal(aug["hint"], ref["hint"]) and not torch.equal(aug["objects"], ref["objects"])


def test_collage_hint_needs_patch_masks_and_tight_boxes():
    s = synthetic_sample(np.random.default_rng(0), views=None)
    with pytest.raises(ValueError, match="s1: sample field 'boxes_tight'"):
        build_item({k: v for k, v in s.items() if k != "boxes_tight"}, 64, None, source="s1", collage=True)
    with pytest.raises(ValueError, match="'patch_masks'"):
        build_item({k: v for k, v in s.items() if k != "patch_masks"}, 64, None, collage=True)


def test_silhouette_on_box_keeps_scale_at_the_canvas_edge():
    from pics_model.data import silhouette_on_box

    patch = np.full((10, 10, 3), 255, np.uint8)
    mask = np.zeros((10, 10), np.uint8)
    patch[:, :5], mask[:, :5] = (200, 0, 0), 255  # left half red: the silhouette is 5 x 10
    window, rgb, inside = silhouette_on_box(patch, mask, (-10, 0, 10, 20), 30, 30)
    assert window == (0, 0, 10, 20) and rgb.shape == (20, 10, 3) and inside.all()  # the right half of the box
    assert silhouette_on_box(patch, np.zeros_like(mask), (0, 0, 5, 5), 30, 30) is None


def test_push_pull_fill_keeps_known_pixels_and_fills_holes_smoothly():
    from pics_model.data import push_pull_fill

    rgb = torch.zeros(1, 1, 16, 16)
    rgb[..., :8] = 1.0  # left half white, right half black
    known = torch.ones(1, 1, 16, 16)
    known[..., 4:12, 6:10] = 0  # a hole across the edge
    filled = push_pull_fill(rgb * known, known)
    assert torch.equal(filled[known.bool()], rgb[known.bool()])
    hole = filled[~known.bool()]
    assert 0.0 <= hole.min() and hole.max() <= 1.0
    # the hole's left side takes after the white pixels around it, its right side after the black
    assert filled[0, 0, 8, 6] > filled[0, 0, 8, 9]
    assert torch.equal(push_pull_fill(rgb, torch.ones_like(known)), rgb)
