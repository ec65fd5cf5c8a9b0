"""Location data: removal renders with proven positives and negatives; the OPA importer."""
import csv

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.decompose.pairing import box_iou
from tasks import sharded_stage
from tasks.location.data import LOCATION_DATA, data_params, read_queries
from tasks.location.opa import OPAFormatError, import_opa
from tasks.location.scenes import (REASONS, Camera, SceneGeometry, mesh_box, off_ground_box, render_color,
                                   scene_queries, vertices_at)
from tasks.make_sample.layout import CONTACT_GAP, compose_scene
from tasks.make_sample.renderer import get_renderer
from tasks.params import LocationParams

W, H = 96, 72


@pytest.fixture(scope="module")
def scene():
    renderer = get_renderer(W, H)
    rng = np.random.default_rng(3)
    spec = compose_scene(rng, renderer, 3, W / H)
    return renderer, spec, SceneGeometry(spec, renderer), Camera(spec.camera_pose, spec.yfov, W, H)


def test_queries_have_distinct_positives_and_reasoned_negatives():
    renderer = get_renderer(W, H)
    queries = [q for s in range(3) for q in scene_queries(renderer, 0, s, W, H, (2, 3), 1, 4, 2, False)]
    assert queries and any(len(q.positives) > 1 for q in queries)
    assert {r for q in queries for r in q.reasons} <= set(REASONS)
    assert len({r for q in queries for r in q.reasons}) >= 3
    for q in queries:
        assert q.image.shape == (H, W, 3) and len(q.reasons) == len(q.negatives) == len(q.details)
        assert all(q.details)
        pos = np.asarray(q.positives)
        assert (pos[:, 2] > pos[:, 0]).all() and (pos[:, 3] > pos[:, 1]).all()
        assert (pos[:, [0, 2]] <= W).all() and (pos[:, [1, 3]] <= H).all()
        if q.negatives:  # every negative is far from every positive: evaluation is unambiguous
            assert box_iou(np.asarray(q.negatives), pos).max() < 0.5


def test_generator_runs_on_the_sharded_stage_skeleton_and_resumes_finished_shards(tmp_path):
    p = LocationParams(num_scenes=3, shard_size=2, width=W, height=H, max_objects=3, removals_per_scene=1)
    out = tmp_path / "data"
    plan, manifest, results = sharded_stage.run_serial(LOCATION_DATA, data_params(p), out)
    assert [w.scenes for w in plan.works] == [[0, 1], [2]] and len(results) == 2
    assert manifest["queries"] == len(read_queries(out)) > 0 and manifest["scenes"] == 3
    assert manifest["queries"] == sum(r["rows"] for r in results)
    assert sum(manifest["quarantined"].values()) == sum(len(r["quarantine"]) for r in results)
    assert (out / ".pics-stage.json").is_file()
    # a run killed after shard 0: only shard 1 is rendered again, to the same bytes
    (out / "_progress" / "shard-00001.json").unlink()
    plan2, manifest2, results2 = sharded_stage.run_serial(LOCATION_DATA, data_params(p), out)
    assert [r["shard"] for r in results2] == ["shard-00001"] and manifest2["kept_from_earlier_runs"] == 1
    assert manifest2["content_hash"] == manifest["content_hash"]


def test_removal_image_does_not_show_the_removed_object(scene):
    renderer, spec, geo, cam = scene
    j = next(j for j in range(len(spec.objects)) if geo.removable(j))
    import dataclasses

    full = render_color(renderer, spec, W, H, False)
    without = render_color(renderer, dataclasses.replace(spec, objects=[o for k, o in enumerate(spec.objects)
                                                                        if k != j]), W, H, False)
    box = mesh_box(cam, vertices_at(spec.objects[j].shape.mesh, spec.objects[j].center, spec.objects[j].pose[2, 3]))
    assert box is not None
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    diff = np.abs(full.astype(int) - without.astype(int)).sum(-1) > 30
    assert diff[y0:y1, x0:x1].mean() > 0.2  # the object was there ...
    assert diff.sum() == diff[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2].sum()  # ... and nowhere else


def test_negative_proofs_hold_in_the_height_field(scene):
    renderer, spec, geo, cam = scene
    j, k = 0, 1
    ground = geo.field({j})
    top, bottom = geo.maps[j]
    other = ground.clamp(spec.objects[k].center)
    assert ground.collides(other, top, bottom, CONTACT_GAP)  # intersecting: at another object's place
    assert not geo.on_ground(ground, j, other)
    assert geo.field(set()).collides(ground.clamp(spec.objects[j].center), top, bottom,
                                     float(spec.objects[j].pose[2, 3]))  # itself: the field sees it
    # off_ground: the moved box's bottom-centre ray misses the ground in front of the wall
    low = [W * 0.4, H * 0.7, W * 0.6, H * 0.95]
    moved = off_ground_box(geo, cam, low)
    if moved is not None:
        box, detail = moved
        o, d = cam.ray((box[0] + box[2]) / 2, box[3])
        assert d[2] >= 0 or not geo.ground_point_ok((o + d * (-o[2] / d[2]))[:2])
        assert "bottom edge" in detail


def test_a_flat_based_object_fits_its_own_place_once_removed(scene):
    """Where a ground-resting object stood is free ground without it. A flat base's height map sits
    ~1e-8 below z = 0, which once made every drop of such an object "rest on something"."""
    renderer, spec, geo, cam = scene
    flat = [j for j, o in enumerate(spec.objects)
            if float(o.pose[2, 3]) < 2 * CONTACT_GAP and np.nanmin(geo.maps[j][1]) < 0]
    assert flat  # the case the test is about
    assert any(geo.on_ground(geo.field({j}), j, geo.field({j}).clamp(spec.objects[j].center)) for j in flat)


def _opa_fixture(root):
    """A tiny folder in OPA's layout: 2 categories, 3 backgrounds, train and test CSVs."""
    for cat, fg, bgs in (("dog", "101", ["5", "6"]), ("cup", "202", ["7"])):
        (root / "foreground" / cat).mkdir(parents=True)
        (root / "background" / cat).mkdir(parents=True)
        Image.new("RGB", (20, 30), (200, 10, 10)).save(root / "foreground" / cat / f"{fg}.jpg")
        Image.new("L", (20, 30), 255).save(root / "foreground" / cat / f"mask_{fg}.jpg")
        for bg in bgs:
            Image.new("RGB", (160, 120), (10, 100, 10)).save(root / "background" / cat / f"{bg}.jpg")

    def write(name, rows):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["fg_id", "bg_id", "position", "scale", "label", "img_name", "mask_name"])
            w.writerows(rows)

    write("train_set.csv", [
        ["101", "5", "[10, 20, 30, 40]", "0.25", "1", "composite/train_set/a.jpg", "composite/train_set/ma.jpg"],
        ["101", "5", "[50, 20, 30, 40]", "0.25", "1", "composite/train_set/b.jpg", "composite/train_set/mb.jpg"],
        ["101", "5", "[100, 0, 50, 20]", "0.31", "0", "composite/train_set/c.jpg", "composite/train_set/mc.jpg"],
        ["101", "6", "[1, 2, oops]", "0.1", "1", "composite/train_set/d.jpg", "composite/train_set/md.jpg"],
        ["202", "7", "[5, 5, 10, 10]", "0.1", "1", "composite/train_set/e.jpg", "composite/train_set/me.jpg"],
        ["202", "9", "[5, 5, 10, 10]", "0.1", "1", "composite/train_set/f.jpg", "composite/train_set/mf.jpg"],
    ])
    write("test_set.csv", [
        ["202", "7", "[40, 30, 20, 20]", "0.13", "1", "composite/test_set/g.jpg", "composite/test_set/mg.jpg"],
        ["202", "7", "[0, 0, 20, 20]", "0.13", "0", "composite/test_set/h.jpg", "composite/test_set/mh.jpg"],
    ])


def test_opa_importer_groups_rows_into_queries(tmp_path):
    _opa_fixture(tmp_path / "OPA")
    manifest = import_opa(tmp_path / "OPA", tmp_path / "out")
    qs = {q["query_id"]: q for q in read_queries(tmp_path / "out")}
    assert sorted(qs) == ["opa-test-7-cup", "opa-train-5-dog", "opa-train-7-cup"]
    dog = qs["opa-train-5-dog"]
    assert dog["split"] == "train" and dog["category"] == "dog" and dog["image"].shape == (120, 160, 3)
    np.testing.assert_array_equal(dog["positives"], [[10, 20, 40, 60], [50, 20, 80, 60]])  # [x, y, w, h] -> xyxy
    np.testing.assert_array_equal(dog["negatives"], [[100, 0, 150, 20]])
    assert dog["negative_reasons"] == ["opa_label_0"]
    assert [len(q) for q in read_queries(tmp_path / "out", split="test")] and qs["opa-test-7-cup"]["split"] == "test"
    assert manifest["queries"] == 3 and manifest["positives"] == 4
    bad = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    by_reason = {r["reason"]: r["detail"] for r in bad}
    assert set(by_reason) == {"bad_opa_row", "missing_background"}
    assert "train_set.csv:5" in by_reason["bad_opa_row"] and "position" in by_reason["bad_opa_row"]
    assert "9.jpg" in by_reason["missing_background"]


def test_opa_import_replaces_generated_data_in_the_same_folder(tmp_path):
    p = LocationParams(num_scenes=2, shard_size=1, width=W, height=H, max_objects=3, removals_per_scene=1)
    sharded_stage.run_serial(LOCATION_DATA, data_params(p), tmp_path / "out")
    _opa_fixture(tmp_path / "OPA")
    manifest = import_opa(tmp_path / "OPA", tmp_path / "out")
    assert {q["source"] for q in read_queries(tmp_path / "out")} == {"opa"}  # no generated shard left behind
    assert manifest["queries"] == 3 and not (tmp_path / "out" / "_progress").exists()


def test_opa_importer_names_a_missing_column(tmp_path):
    _opa_fixture(tmp_path / "OPA")
    (tmp_path / "OPA" / "test_set.csv").write_text("fg_id,bg_id,scale,label\n202,7,0.1,1\n")
    with pytest.raises(OPAFormatError, match=r"test_set.csv: missing column\(s\) position"):
        import_opa(tmp_path / "OPA", tmp_path / "out")
