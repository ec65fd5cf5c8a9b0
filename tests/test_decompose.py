"""decompose without Prefect: sample contents, determinism, quarantine of every defect, fail-fast
input checks, resume, shard helpers, the WebDataset importer and the sample grid."""
from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile

import cv2
import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from pics_model.data import square_geometry
from tasks import shards
from tasks.decompose import webdataset
from tasks.decompose.inputs import InputError
from tasks.decompose.pipeline import prepare, quarantine_tallies, run_serial
from tasks.decompose.synthetic import rect, write_dataset, write_reference_tar, write_synthetic_lvis
from tasks.decompose.visualize import HEADER, TILE, write_sample_grid
from tasks.params import DecomposeParams
from tasks.quarantine import QuarantineLimitError, check_limit


def params(**kw) -> dict:
    return DecomposeParams(**{"grid_samples": 0, **kw})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return write_synthetic_lvis(d, n_images=24, width=320, height=240, seed=3)


@pytest.fixture(scope="module")
def decomposed(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    manifest, _ = run_serial(params(shard_size=8, pairs_per_image=2), *synth, out)
    return out, manifest


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shards.list_shards(out)}


# -- sample contents -------------------------------------------------------------------------------

def test_samples_match_sources(synth, decomposed):
    out, manifest = decomposed
    ann_path, img_root = synth
    data = json.loads(ann_path.read_text())
    anns = {a["id"]: a for a in data["annotations"]}
    P = 224
    n = 0
    for row in shards.iter_rows(out):
        s = shards.decode_sample(row)
        n += 1
        h, w = s["height"], s["width"]
        assert row["image_bytes"] == (img_root / row["source_image"]).read_bytes()  # stored unchanged
        assert s["image"].shape == (h, w, 3) and s["masks"].shape == (2, h, w)
        for k, aid in enumerate(s["annotation_ids"]):
            a = anns[aid]
            assert a["image_id"] == s["image_id"]
            ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w)))
            np.testing.assert_array_equal(s["masks"][k], ref)
            ys, xs = np.nonzero(ref)
            np.testing.assert_array_equal(s["boxes_tight"][k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            t, e = s["boxes_tight"][k], s["boxes_expanded"][k]
            assert (e[:2] <= t[:2]).all() and (e[2:] >= t[2:]).all()
            grow = (e[2] - e[0]) / (t[2] - t[0])
            if e[0] > 0 and e[2] < w:  # not clipped: the factor is U[1.1, 1.2)
                assert 1.1 - 1e-3 <= grow < 1.2 + 1e-3
            # patch: the object on white, padded by U[1.1, 1.4] and centred in a square
            patch, pm = s["patches"][k], s["patch_masks"][k]
            assert patch.shape == (P, P, 3) and pm.shape == (P, P)
            near = cv2.dilate(pm, np.ones((7, 7), np.uint8))  # resizing blends a pixel or two at the edge
            assert (patch[near == 0] == 255).all() and pm.any()
            ys, xs = np.nonzero(pm)
            extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / P
            assert 1 / 1.4 - 0.03 <= extent <= 1 / 1.1 + 0.03
            assert abs((xs.min() + xs.max()) / 2 - P / 2) < 4 or abs((ys.min() + ys.max()) / 2 - P / 2) < 4
        # region map: bit k inside expanded box k only, nothing in the square padding
        rm = s["region_map"]
        assert rm.shape == (512, 512)
        side, py, px = square_geometry(h, w)
        scale = 512 / side
        x0, y0, x1, y1 = s["content_window"]
        outside = np.ones_like(rm, bool)
        outside[y0:y1, x0:x1] = False
        assert not rm[outside].any()
        for k, (bx0, by0, bx1, by1) in enumerate(s["boxes_expanded"]):
            cx, cy = int((bx0 + bx1) / 2 + px) * scale, int((by0 + by1) / 2 + py) * scale
            assert rm[int(cy), int(cx)] >> k & 1
            area = ((rm >> k) & 1).sum()
            assert area == pytest.approx((bx1 - bx0) * (by1 - by0) * scale ** 2, rel=0.1)
        # pair statistics agree with the masks
        inter = np.logical_and(*s["masks"]).sum()
        union = np.logical_or(*s["masks"]).sum()
        assert s["pair_mask_iou"][0] == pytest.approx(inter / union, abs=1e-6)
        assert s["pair_contact_px"][0] > 0  # interaction rule: every pair touches
        assert s["split"] in ("train", "test")
    assert n == manifest["samples"] > 10


def test_manifest_counts_add_up(decomposed):
    out, m = decomposed
    assert m["images_seen"] == 24
    assert m["images_with_pair"] + sum(m["skipped"].values()) + sum(m["quarantined"].values()) == 24
    assert m["samples"] == sum(s["samples"] for s in m["shards"]) == shards.count_samples(out)
    assert m["samples"] == sum(m["splits"].values())
    assert m["content_hash"] == shards.content_hash(out)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(m))
    for key in ("schema_version", "params", "images_seen", "images_with_pair", "samples", "skipped", "quarantined"):
        assert key in m
    # pairs_per_image=2: some image gives two samples, never the same pair twice
    ids = [r["sample_id"] for r in shards.iter_rows(out, columns=["sample_id"])]
    assert len(ids) == len(set(ids)) and m["samples"] > m["images_with_pair"]


def test_groups_of_three_and_four(synth, tmp_path):
    for g in (3, 4):
        m, _ = run_serial(params(group_size=g, shard_size=100), *synth, tmp_path / f"g{g}")
        rows = list(shards.iter_rows(tmp_path / f"g{g}"))
        assert rows and all(r["n_objects"] == g for r in rows)
        assert all(len(r["pair_box_iou"]) == g * (g - 1) // 2 for r in rows)
        s = shards.decode_sample(rows[0])
        assert s["patches"].shape[0] == g and s["masks"].shape[0] == g
        assert m["images_with_pair"] + sum(m["skipped"].values()) == 24


# -- determinism -----------------------------------------------------------------------------------

def test_byte_identical_for_same_inputs_in_any_file_order(synth, decomposed, tmp_path):
    out, _ = decomposed
    ann_path, img_root = synth
    data = json.loads(ann_path.read_text())
    random.Random(0).shuffle(data["images"])
    random.Random(1).shuffle(data["annotations"])
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(data))
    run_serial(params(shard_size=8, pairs_per_image=2, num_workers=5), shuffled, img_root, tmp_path / "again")
    assert _files(tmp_path / "again") == _files(out)
    run_serial(params(shard_size=8, pairs_per_image=2, seed=1), ann_path, img_root, tmp_path / "seed1")
    assert _files(tmp_path / "seed1") != _files(out)  # the seed does reach the samples


# -- quarantine ------------------------------------------------------------------------------------

def test_every_bad_input_is_quarantined_with_its_reason(tmp_path):
    W, H = 120, 90
    pair = [{"segmentation": rect(10, 10, 60, 60)}, {"segmentation": rect(50, 50, 100, 80)}]

    def img(iid, objects=None, **kw):
        return {"id": iid, "width": W, "height": H, "objects": objects if objects is not None else
                [dict(o, id=iid * 10 + k) for k, o in enumerate(pair)], **kw}

    rle_wrong_size = mask_utils.encode(np.asfortranarray(np.ones((H + 1, W), np.uint8)))
    rle_wrong_size["counts"] = rle_wrong_size["counts"].decode()
    images = [
        img(1),                                               # fine
        img(2, file=False),                                   # missing image
        img(3), img(4), img(5),                               # unreadable, truncated, size mismatch (below)
        img(6, [dict(pair[0], id=60), dict(pair[1], id=61),
                {"id": 62, "segmentation": [[1, 2, 3, 4, 5]]},                      # odd coordinate count
                {"id": 63, "segmentation": [[1, 2, float("nan"), 4, 5, 6]]},        # NaN vertex
                {"id": 64, "segmentation": [[5, 5, 5, 5, 5, 5]]},                   # covers no pixel
                {"id": 65, "segmentation": rle_wrong_size},                        # RLE of another size
                {"id": 66, "segmentation": {"size": [H, W], "counts": "garbage!!"}},
                {"id": 67, "segmentation": rect(0, 0, 10, 10), "category_id": 999}]),  # unknown category
        img(7, [dict(pair[0], id=70), {"id": 71, "segmentation": []}]),   # its only partner is invalid
    ]
    ann, root = write_dataset(tmp_path / "ds", images, fmt="lvis_v1", image_ext="jpg")
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1, "segmentation": rect(0, 0, 5, 5),
                                "area": 25.0, "bbox": [0, 0, 5, 5]})  # unknown image
    ann.write_text(json.dumps(data, allow_nan=True))
    (root / "000000000003.jpg").write_bytes(b"this is not an image")
    good = (root / "000000000004.jpg").read_bytes()
    (root / "000000000004.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (W + 10, H)).save(root / "000000000005.jpg")

    m, _ = run_serial(params(area_ratio=0.01, pairing="reference"), ann, root, tmp_path / "out")
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    got = {(r["image_id"], r["annotation_id"], r["reason"]) for r in q}
    assert got == {
        (2, None, "missing_image"), (3, None, "unreadable_image"), (4, None, "truncated_image"),
        (5, None, "image_size_mismatch"),
        (6, 62, "invalid_polygon"), (6, 63, "invalid_polygon"), (6, 64, "empty_mask"),
        (6, 65, "mask_size_mismatch"), (6, 66, "invalid_rle"), (6, 67, "unknown_category"),
        (7, 71, "invalid_polygon"), (12345, 999, "unknown_image"),
    }
    assert all(r["detail"] and r["stage"] == "decompose" and r["source"] for r in q)
    assert m["quarantined"] == {"image_size_mismatch": 1, "missing_image": 1, "truncated_image": 1,
                                "unreadable_image": 1}
    assert m["skipped"] == {"fewer_than_two_objects": 1}
    assert m["images_with_pair"] == 2  # 1 and 6: bad annotations do not sink a good pair
    assert m["images_with_pair"] + sum(m["skipped"].values()) + sum(m["quarantined"].values()) == m["images_seen"] == 7
    assert sum(m["quarantined_annotations"].values()) == 8
    assert {r["image_id"] for r in shards.iter_rows(tmp_path / "out", columns=["image_id"])} == {1, 6}
    assert m["annotations_seen"] == 21
    with pytest.raises(QuarantineLimitError) as e:  # more than half the images: the run fails, outputs written
        check_limit("decompose", tmp_path / "out", quarantine_tallies(m), 0.5, "decompose.max_quarantine_fraction")
    assert str(e.value).splitlines() == [
        "decompose: images: 4 of 7 quarantined (57.1%: image_size_mismatch 1, missing_image 1, truncated_image 1); "
        "annotations: 8 of 21 quarantined (38.1%: invalid_polygon 3, empty_mask 1, invalid_rle 1)",
        f"quarantined more images than decompose.max_quarantine_fraction = 0.5 allows (or all of them); "
        f"outputs written to {tmp_path / 'out'} (manifest.json, quarantine.parquet)"]
    check_limit("decompose", tmp_path / "out", quarantine_tallies(m), 0.6, "decompose.max_quarantine_fraction")


def test_file_names_outside_the_image_root_are_quarantined_and_never_read(tmp_path):
    pair = [{"segmentation": rect(10, 10, 60, 60)}, {"segmentation": rect(50, 50, 100, 80)}]
    ann, root = write_dataset(tmp_path / "ds", [{"id": i, "width": 120, "height": 90, "objects": pair}
                                                for i in (1, 2, 3, 4)], fmt="coco")
    outside = tmp_path / "ds" / "elsewhere"
    outside.mkdir()
    for i in (2, 3):  # real, readable images, but only reachable by leaving the root
        (root / f"{i:012d}.png").rename(outside / f"x{i}.png")
    (root / "000000000004.png").rename(root.parent / "x4.png")
    data = json.loads(ann.read_text())
    data["images"][1]["file_name"] = "../elsewhere/x2.png"
    data["images"][2]["file_name"] = str(outside / "x3.png")  # absolute
    data["images"][3].pop("file_name")
    data["images"][3]["coco_url"] = "http://host/../x4.png"  # last two parts: ../x4.png
    ann.write_text(json.dumps(data))
    m, _ = run_serial(params(area_ratio=0.01), ann, root, tmp_path / "out")
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert {(r["image_id"], r["reason"]) for r in q} == {(i, "image_path_outside_root") for i in (2, 3, 4)}
    assert all("outside" in r["detail"] and r["source"] == str(ann) for r in q)
    assert m["quarantined"] == {"image_path_outside_root": 3} and m["images_with_pair"] == 1
    assert {r["image_id"] for r in shards.iter_rows(tmp_path / "out", columns=["image_id"])} == {1}


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("annotations"), "annotations"),
    (lambda d: d["annotations"][0].pop("image_id"), "annotations[0].image_id"),
    (lambda d: d["annotations"][1].update(category_id="cup"), "annotations[1].category_id"),
    (lambda d: d["annotations"][0].pop("segmentation"), "annotations[0].segmentation"),
    (lambda d: d["images"][0].pop("width"), "images[0].width"),
    (lambda d: d["images"][0].pop("coco_url"), "images[0].file_name"),
    (lambda d: d["images"].append(dict(d["images"][0])), "images[1].id"),
    (lambda d: d["categories"][0].pop("name"), "categories[0].name"),
])
def test_malformed_annotation_file_fails_at_once_naming_the_field(tmp_path, mutate, field):
    ann, root = write_dataset(tmp_path / "ds", [{"id": 1, "width": 50, "height": 40,
                                                 "objects": [{"segmentation": rect(1, 1, 20, 20)}] * 2}])
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(InputError) as e:
        prepare(params(), ann, root, tmp_path / "out")
    assert str(ann) in str(e.value) and field in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known good


def test_unparseable_file_and_missing_root_fail_at_once(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(InputError, match="not valid JSON"):
        prepare(params(), bad, tmp_path, tmp_path / "out")
    with pytest.raises(InputError, match="annotation file not found"):
        prepare(params(), tmp_path / "nope.json", tmp_path, tmp_path / "out")
    ann, _ = write_dataset(tmp_path / "ds", [{"id": 1, "width": 50, "height": 40}])
    with pytest.raises(InputError, match=r"image root .*decompose\.images"):
        prepare(params(), ann, tmp_path / "no_images", tmp_path / "out")


# -- resume ----------------------------------------------------------------------------------------

def test_resume_keeps_finished_shards_and_redoes_the_rest(synth, decomposed, tmp_path):
    ref_out, _ = decomposed
    out = tmp_path / "out"
    p = params(shard_size=8, pairs_per_image=2)
    run_serial(p, *synth, out)
    names = sorted(_files(out))
    assert len(names) == 3
    kept = {n: os.stat(out / "shards" / n).st_mtime_ns for n in names[1:]}
    # a run killed mid-shard: shard 0's record and file gone, a half-written temporary left behind
    (out / "_progress" / "shard-00000.json").unlink()
    (out / "shards" / "shard-00000.parquet").unlink()
    (out / "shards" / ".tmp-shard-00000.parquet.deadbeef").write_bytes(b"PAR1 half")
    m, results = run_serial(p, *synth, out)
    assert [r["shard"] for r in results] == ["shard-00000"]
    assert {n: os.stat(out / "shards" / n).st_mtime_ns for n in names[1:]} == kept
    assert not list((out / "shards").glob(".tmp-*"))
    assert _files(out) == _files(ref_out)
    assert m["content_hash"] == shards.content_hash(ref_out)
    # a corrupted finished shard is redone, not trusted
    (out / "shards" / names[1]).write_bytes(b"garbage")
    _, results = run_serial(p, *synth, out)
    assert [r["shard"] for r in results] == ["shard-00001"]
    # another parameter value invalidates every shard
    _, results = run_serial(params(shard_size=8, pairs_per_image=2, area_ratio=0.05), *synth, out)
    assert len(results) == 3


# -- shard helpers ---------------------------------------------------------------------------------

def test_shard_helpers(decomposed, tmp_path):
    out, m = decomposed
    listed = shards.list_shards(out)
    assert listed == shards.list_shards(out / "shards") and len(listed) == len(m["shards"])
    test_rows = list(shards.iter_rows(out, split="test", columns=["split"]))
    assert len(test_rows) == m["splits"].get("test", 0) == shards.count_samples(out, "test")
    assert all(s["split"] == "train" for s in shards.iter_samples(out, split="train"))
    copy = tmp_path / "copy" / "shards"
    copy.mkdir(parents=True)
    for p in listed:
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / ".tmp-shard-00009.parquet.x").write_bytes(b"partial")  # never listed, never hashed
    assert shards.content_hash(copy.parent) == m["content_hash"]
    t = pq.read_table(listed[0])
    pq.write_table(t.slice(0, t.num_rows - 1), listed[0].with_name("x.parquet"))
    (copy / listed[0].name).write_bytes(listed[0].with_name("x.parquet").read_bytes())
    listed[0].with_name("x.parquet").unlink()
    assert shards.content_hash(copy.parent) != m["content_hash"]


# -- WebDataset importer ---------------------------------------------------------------------------

def test_webdataset_import(tmp_path):
    tar = tmp_path / "lvis-000000.tar"
    expect = write_reference_tar(tar)
    out = tmp_path / "out"
    res = webdataset.import_tar(str(tar), str(out), 0, params())
    m = webdataset.finalize(out, [res], params(), [str(tar)])
    assert m["images_seen"] == 3 and m["samples"] == 2 and m["quarantined"] == {"missing_member": 1}
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [(r["item_key"], r["reason"]) for r in q] == [(webdataset.sample_id("lvis-000000.tar", "lvis/000002"),
                                                         "missing_member")]
    samples = list(shards.iter_samples(out))
    assert len(samples) == 2
    for s, row in zip(samples, shards.iter_rows(out)):
        key = s["source_image"].split(":", 1)[1].removesuffix(".bg.jpg")
        bg_bytes, masks = expect[key]
        assert row["image_bytes"] == bg_bytes
        np.testing.assert_array_equal(s["masks"], np.stack(masks))
        np.testing.assert_array_equal(s["boxes_tight"], [[10, 10, 60, 70], [40, 30, 110, 80]])
        assert s["patches"].shape == (2, 224, 224, 3) and s["region_map"].shape == (512, 512)
        assert s["pair_mask_iou"][0] == pytest.approx((20 * 40) / (50 * 60 + 70 * 50 - 20 * 40))
        assert s["pair_contact_px"][0] > 0 and s["category_ids"] == [-1, -1]


def _import(tars: list, out) -> tuple[dict, list[dict]]:
    results = [webdataset.import_tar(t, str(out), i, params(), label)
               for i, (t, label) in enumerate(webdataset.tar_labels([str(t) for t in tars]))]
    m = webdataset.finalize(out, results, params(), [str(t) for t in tars])
    return m, pq.read_table(out / "quarantine.parquet").to_pylist()


def test_webdataset_ids_unique_across_same_named_tars_in_different_folders(tmp_path):
    tars = [tmp_path / d / "lvis-000000.tar" for d in ("train", "val")]
    for t in tars:
        t.parent.mkdir()
        write_reference_tar(t)  # the same key names (and here the same bytes) in both
    m, _ = _import([*tars, tmp_path / "val" / ".." / "val" / "lvis-000000.tar"], tmp_path / "out")  # one tar twice
    rows = list(shards.iter_rows(tmp_path / "out", columns=["sample_id", "image_id", "source_image"]))
    assert m["samples"] == 4 and len(shards.list_shards(tmp_path / "out")) == 2
    assert len({r["sample_id"] for r in rows}) == 4 and len({r["image_id"] for r in rows}) == 4
    assert {r["source_image"].split(":")[0] for r in rows} == {"train/lvis-000000.tar", "val/lvis-000000.tar"}


def test_webdataset_member_names_never_become_ids(tmp_path):
    tar = tmp_path / "x.tar"
    write_reference_tar(tar)
    odd = tmp_path / "odd.tar"
    with tarfile.open(tar) as src, tarfile.open(odd, "w", encoding="utf-8", errors="surrogateescape") as dst:
        for mem in src:  # the same samples under hostile names: a climb out, a colon, undecodable bytes
            key, ext = webdataset.split_key(mem.name)
            new = {"lvis/000000": "../../etc/x:y", "lvis/000001": "caf\udce9 \u00e9t\u00e9"}.get(key, key)
            data = src.extractfile(mem).read()
            mem.name = f"{new}.{ext}"
            dst.addfile(mem, io.BytesIO(data))
    m, q = _import([odd], tmp_path / "out")
    rows = list(shards.iter_rows(tmp_path / "out", columns=["sample_id", "source_image"]))
    assert m["samples"] == 2 and len(q) == 1
    ids = [r["sample_id"] for r in rows] + [r["item_key"] for r in q]
    assert all(re.fullmatch(r"wds-[0-9a-f]{20}", i) for i in ids) and len(set(ids)) == 3
    assert sorted(r["source_image"] for r in rows) == ["odd.tar:../../etc/x:y.bg.jpg",
                                                       "odd.tar:caf\\xe9 \u00e9t\u00e9.bg.jpg"]


def test_webdataset_truncated_tar_keeps_its_complete_samples(tmp_path):
    tar = tmp_path / "lvis-000000.tar"
    write_reference_tar(tar, n_good=3)  # keys 0-2 complete, key 3 without mask1
    with tarfile.open(tar) as tf:
        members = {m.name: m for m in tf}
    data = tar.read_bytes()
    cut_in_data = members["lvis/000002.obj1.png"].offset_data + 100
    cut_in_header = members["lvis/000002.bg.jpg"].offset + 100
    for name, cut, kept in [("data", cut_in_data, 2), ("header", cut_in_header, 1)]:
        t = tmp_path / name / "lvis-000000.tar"
        t.parent.mkdir()
        t.write_bytes(data[:cut])
        m, q = _import([t], tmp_path / f"out-{name}")
        assert m["samples"] == kept and m["tars_truncated"] == [str(t)] and m["tars_unreadable"] == []
        cut_key = "lvis/000002" if name == "data" else "lvis/000001"  # a cut after a sample cannot prove it whole
        assert [(r["reason"], r["item_key"]) for r in q] == [
            ("truncated_tar", ""), ("truncated_sample", webdataset.sample_id("lvis-000000.tar", cut_key))]
        assert m["quarantined"] == {"truncated_sample": 1} and m["images_seen"] == kept + 1
    _, q = _import([tar], tmp_path / "out-whole")  # the complete tar: no truncation reported
    assert [r["reason"] for r in q] == ["missing_member"]


def test_webdataset_quarantine_details_are_deterministic(tmp_path):
    tar = tmp_path / "bad.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in [("k.bg.jpg", b"not an image"), ("k.obj0.png", b"x"), ("k.mask0.png", b"x"),
                           ("k.obj1.png", b"x"), ("k.mask1.png", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    _, q1 = _import([tar], tmp_path / "a")
    _, q2 = _import([tar], tmp_path / "b")
    assert [r["reason"] for r in q1] == ["unreadable_image"]
    assert q1 == q2 and " at 0x" not in q1[0]["detail"] and "cannot identify image" in q1[0]["detail"]


# -- the picture -----------------------------------------------------------------------------------

def test_sample_grid(decomposed, tmp_path):
    out, m = decomposed
    png = write_sample_grid(out, tmp_path / "grid.png", n=3)
    with Image.open(png) as im:
        assert im.size == (TILE * 7, HEADER + 3 * TILE)
        arr = np.asarray(im.convert("RGB"))
    regions = arr[HEADER:, TILE * 6:]
    assert (np.abs(regions.astype(int) - (250, 220, 40)).sum(-1) < 10).any()  # overlap drawn in yellow
    html = png.with_suffix(".html").read_text()
    assert "grid.png" in html and html.count("<tr>") == 4
    empty = write_sample_grid(tmp_path / "nothing", tmp_path / "empty.png")
    assert empty.is_file()


def test_show_samples_command(decomposed, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    out, _ = decomposed
    r = CliRunner().invoke(app, ["show-samples", str(out), "--out", str(tmp_path / "g.png"), "--n", "2"])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (TILE * 7, HEADER + 2 * TILE)
