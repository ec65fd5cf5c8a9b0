"""The embedded dataset: a valid LVIS file whose masks are the rendered ones, objects that really
touch and occlude, a depth order consistent with occlusion, and byte-for-byte determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tasks.make_sample import dataset
from tasks.make_sample.annotate import decode, depth_order, mask_to_polygons, segmentation
from tasks.params import load_params

N_IMAGES = 12


def _params(**kw):
    sets = [f"make_sample.{k}={v}" for k, v in {"num_images": N_IMAGES, **kw}.items()]
    return load_params(overrides=sets).make_sample


def _generate(p, out: Path, parts: list[list[int]]) -> Path:
    results = []
    for part in parts:
        results += dataset.render_images(p, part, out / dataset.IMAGES)
    (out / dataset.ANNOTATIONS).write_bytes(dataset.dumps(dataset.assemble(p, results)))
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    p = _params()
    return _generate(p, tmp_path_factory.mktemp("sample"), dataset.chunks(p.num_images, 5))


@pytest.fixture(scope="module")
def lvis_api(sample):
    from lvis import LVIS

    return LVIS(str(sample / dataset.ANNOTATIONS))


def _masks(api, img):
    anns = api.img_ann_map[img["id"]]
    vis = [api.ann_to_mask(a).astype(bool) for a in anns]
    amo = [decode(a["amodal_segmentation"], img["height"], img["width"]).astype(bool) for a in anns]
    return anns, vis, amo


def test_lvis_loads_with_the_lvis_v1_fields(sample, lvis_api):
    data = json.loads((sample / dataset.ANNOTATIONS).read_text())
    assert len(lvis_api.get_img_ids()) == N_IMAGES
    assert len(lvis_api.get_ann_ids()) >= 2 * N_IMAGES - 2
    for img in data["images"]:
        assert {"id", "width", "height", "file_name", "coco_url", "not_exhaustive_category_ids",
                "neg_category_ids"} <= img.keys()
        assert (img["width"], img["height"]) == (320, 240)
        assert (sample / dataset.IMAGES / img["file_name"]).is_file()
        assert img["coco_url"].rsplit("/", 1)[-1] == img["file_name"]
        present = {a["category_id"] for a in lvis_api.img_ann_map[img["id"]]}
        assert present.isdisjoint(img["neg_category_ids"])
    for c in data["categories"]:
        assert {"id", "name", "synset", "synonyms", "def", "frequency", "image_count", "instance_count"} <= c.keys()
        assert c["frequency"] in {"r", "c", "f"}
        assert c["instance_count"] == len(lvis_api.cat_img_map[c["id"]])
    assert sum(c["instance_count"] for c in data["categories"]) == len(data["annotations"])
    for a in data["annotations"]:
        assert a["area"] > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0
        assert {"amodal_segmentation", "depth_rank", "occluded_by", "visible_fraction"} <= a.keys()


def test_masks_decode_to_the_rendered_visible_masks(sample, lvis_api):
    p = _params()
    for index in (0, 5):
        _, views, _ = dataset.render_views(p, index)
        for a in lvis_api.img_ann_map[index + 1]:
            rendered = views.labels == a["object_index"] + 1
            assert np.array_equal(lvis_api.ann_to_mask(a).astype(bool), rendered)
            amodal = decode(a["amodal_segmentation"], p.height, p.width).astype(bool)
            assert np.array_equal(amodal, views.amodal[a["object_index"]])
            assert a["area"] == rendered.sum()


def test_every_object_is_annotated_or_left_out_with_a_reason(sample, lvis_api):
    data = json.loads((sample / dataset.ANNOTATIONS).read_text())
    p = _params()
    for img in data["images"]:
        rng = np.random.default_rng(np.random.SeedSequence([p.seed, img["id"] - 1]))
        n = int(rng.integers(p.min_objects, p.max_objects + 1))  # the first draw of render_views
        kept = {a["object_index"] for a in lvis_api.img_ann_map[img["id"]]}
        left = {o["object_index"]: o for o in data["omitted_objects"] if o["image_id"] == img["id"]}
        assert kept.isdisjoint(left) and kept | set(left) == set(range(n))
        for o in left.values():
            assert o["reason"] in {"fully_hidden", "out_of_frame", "too_few_visible_pixels"}
            assert o["visible_pixels"] < p.min_visible_pixels


def test_objects_touch_or_overlap_in_almost_every_image(lvis_api):
    interacting = 0
    for img in lvis_api.load_imgs(lvis_api.get_img_ids()):
        anns, vis, amo = _masks(lvis_api, img)
        for i in range(len(anns)):
            near = ndimage.binary_dilation(vis[i], iterations=2)
            if any((amo[i] & amo[j]).any() or (near & vis[j]).any() for j in range(i + 1, len(anns))):
                interacting += 1
                break
    assert interacting >= N_IMAGES - 1


def test_depth_rank_agrees_with_occlusion(lvis_api):
    """Over the overlap of two amodal masks, the nearer object is the one you see."""
    pairs = occluding = wrong = 0
    for img in lvis_api.load_imgs(lvis_api.get_img_ids()):
        anns, vis, amo = _masks(lvis_api, img)
        assert sorted(a["depth_rank"] for a in anns) == list(range(len(anns)))
        for i in range(len(anns)):
            assert (vis[i] <= amo[i]).all()
            for j in range(i + 1, len(anns)):
                both = amo[i] & amo[j]
                if not both.any():
                    continue
                near, far = (i, j) if anns[i]["depth_rank"] < anns[j]["depth_rank"] else (j, i)
                seen_near, seen_far = (vis[near] & both).sum(), (vis[far] & both).sum()
                pairs += 1
                occluding += seen_near > 0
                wrong += seen_far > seen_near
                if seen_near:
                    assert anns[near]["id"] in anns[far]["occluded_by"]
    assert pairs >= N_IMAGES and occluding >= N_IMAGES // 2
    assert wrong <= max(1, pairs // 50)


def test_same_seed_same_bytes_whatever_the_chunking(tmp_path):
    p = _params(num_images=4)
    a = _generate(p, tmp_path / "a", [[0, 1, 2, 3]])
    b = _generate(p, tmp_path / "b", [[3], [2, 0], [1]])
    assert (a / dataset.ANNOTATIONS).read_bytes() == (b / dataset.ANNOTATIONS).read_bytes()
    for f in sorted((a / dataset.IMAGES).iterdir()):
        assert f.read_bytes() == (b / dataset.IMAGES / f.name).read_bytes()
    c = _generate(_params(num_images=4, seed=1), tmp_path / "c", [[0, 1, 2, 3]])
    assert (a / dataset.ANNOTATIONS).read_bytes() != (c / dataset.ANNOTATIONS).read_bytes()


def test_polygons_are_exact_with_holes_and_pieces():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = ndimage.binary_opening(rng.uniform(size=(60, 80)) > 0.45, iterations=1)
        m[20:40, 30:50] = True
        m[25:35, 35:45] = False  # a hole
        polys = mask_to_polygons(m)
        assert np.array_equal(decode(polys, 60, 80).astype(bool), m)
    segm, fmt = segmentation(m, "rle")
    assert fmt == "rle" and np.array_equal(decode(segm, 60, 80).astype(bool), m)


def test_depth_order_ranks_the_occluder_first():
    amodal = np.zeros((3, 10, 10), bool)
    depth = np.zeros((3, 10, 10), np.float32)
    amodal[0, 2:8, 2:8], depth[0][amodal[0]] = True, 5.0  # behind
    amodal[1, 4:9, 4:9], depth[1][amodal[1]] = True, 3.0  # in front of 0
    amodal[2, 0:2, 0:2], depth[2][amodal[2]] = True, 4.0  # alone, between by mean depth
    assert depth_order(amodal, depth) == [2, 0, 1]


@pytest.mark.slow
def test_flow_writes_the_dataset_atomically_and_ray_gives_the_same_bytes(prefect_harness, local_ray, tmp_path):
    from flows.make_sample import make_sample_flow

    out1, out2 = tmp_path / "one", tmp_path / "ray"
    common = ["make_sample.num_images=6", "make_sample.chunk_size=3"]
    s1 = make_sample_flow(overrides=common + [f"make_sample.out={out1}"])
    s2 = make_sample_flow(overrides=common + [f"make_sample.out={out2}", "make_sample.num_workers=2"])
    assert s1["images"] == s2["images"] == 6 and s1["instances"] == s2["instances"] > 6
    assert (out1 / dataset.ANNOTATIONS).read_bytes() == (out2 / dataset.ANNOTATIONS).read_bytes()
    names = sorted(f.name for f in (out1 / dataset.IMAGES).iterdir())
    assert names == [dataset.file_name(i, "jpg") for i in range(6)]
    for n in names:  # Ray workers render the very same pixels as the driver
        assert (out1 / dataset.IMAGES / n).read_bytes() == (out2 / dataset.IMAGES / n).read_bytes()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp-")]


def test_each_image_has_its_scene_as_a_point_set(sample, lvis_api):
    from tasks.analogy.scenes import load_scene

    for img in lvis_api.dataset["images"]:
        scene = load_scene(sample / dataset.SCENES / f"{Path(img['file_name']).stem}.npz")
        # every object of the scene is in the point set, annotated or left out of the image
        shown = {a["object_index"]: a["category_id"] for a in lvis_api.img_ann_map[img["id"]]}
        for k, cat in shown.items():
            assert set(scene.label[scene.instance == k]) == {cat}
        assert len(scene.object_ids()) >= len(shown) and (scene.label[scene.instance < 0] == -1).all()
