"""decompose on the real fixtures in ../shared/data (skipped when that folder is absent)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest

from tasks import shards
from tasks.decompose.pipeline import quarantine_tallies, run_serial
from tasks.params import DecomposeParams
from tasks.quarantine import QuarantineLimitError, check_limit


def params(**kw) -> dict:
    return DecomposeParams(**{"grid_samples": 0, **kw})


def _lvis(shared_data):
    return shared_data / "lvis" / "lvis_val_100.json", shared_data / "lvis" / "images"


@pytest.mark.parametrize("pairing", ["reference", "interaction"])
def test_lvis_v05_missing_images_quarantined_present_one_decomposes(shared_data, tmp_path, pairing):
    ann, root = _lvis(shared_data)
    # area_ratio 0: at the default 0.02 the baseball scene keeps a single large object (a jersey).
    m, _ = run_serial(params(pairing=pairing, area_ratio=0.0), ann, root, tmp_path / "out")
    assert m["inputs"]["format"] == "lvis_v0.5"
    assert m["images_seen"] == 100
    assert m["quarantined"] == {"missing_image": 99}
    assert m["images_with_pair"] == 1 and m["skipped"] == {}
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    all_ids = {im["id"] for im in json.loads(ann.read_text())["images"]}
    assert {r["image_id"] for r in q if r["reason"] == "missing_image"} == all_ids - {196141}
    rows = list(shards.iter_rows(tmp_path / "out"))
    assert len(rows) == 1 and rows[0]["image_id"] == 196141
    assert rows[0]["source_image"] == "000000196141.jpg"  # COCO_val2014_... resolved to the 2017 name
    assert rows[0]["image_bytes"] == (root / "000000196141.jpg").read_bytes()
    s = shards.decode_sample(rows[0])
    assert s["image"].shape == (429, 640, 3) and s["masks"].shape == (2, 429, 640)
    assert all(n for n in s["category_names"])
    # The fixture holds 1 of its 100 images: a real run on it passes only the limit of 1.0, which
    # fails a run only when every image or annotation is quarantined.
    with pytest.raises(QuarantineLimitError, match=r"images: 99 of 100 quarantined \(99\.0%: missing_image 99\)"):
        check_limit("decompose", tmp_path, quarantine_tallies(m), params().max_quarantine_fraction, "x")
    check_limit("decompose", tmp_path, quarantine_tallies(m), 1.0, "x")


def test_lvis_v1_form_of_the_same_file(shared_data, tmp_path):
    ann, root = _lvis(shared_data)
    data = json.loads(ann.read_text())
    for im in data["images"]:
        im.pop("file_name")  # LVIS v1 names images by coco_url only
    v1 = tmp_path / "lvis_v1.json"
    v1.write_text(json.dumps(data))
    m, _ = run_serial(params(area_ratio=0.0), v1, root, tmp_path / "out")
    assert m["inputs"]["format"] == "lvis_v1"
    assert m["quarantined"] == {"missing_image": 99} and m["images_with_pair"] == 1
    m0, _ = run_serial(params(area_ratio=0.0), ann, root, tmp_path / "out05")
    assert m["content_hash"] == m0["content_hash"]


def _hf(shared_data):
    d = shared_data / "coco_hf_39769"
    return d / "instances_39769.json", d


def test_coco_reference_rule_finds_nothing_inside_couch_and_bed(shared_data, tmp_path):
    ann, root = _hf(shared_data)
    m, _ = run_serial(params(pairing="reference"), ann, root, tmp_path / "out")
    assert m["inputs"]["format"] == "coco"
    assert m["images_with_pair"] == 0 and m["skipped"] == {"no_valid_pair": 1}
    assert shards.list_shards(tmp_path / "out") == []


def test_coco_interaction_rule_finds_cat_on_couch(shared_data, tmp_path):
    ann, root = _hf(shared_data)
    m, _ = run_serial(params(pairing="interaction"), ann, root, tmp_path / "one")
    assert m["images_with_pair"] == 1 and m["samples"] == 1
    (row,) = shards.iter_rows(tmp_path / "one")
    assert sorted(row["category_names"]) in (["cat", "couch"], ["bed", "cat"])
    assert row["pair_contact_px"][0] > 0
    m, _ = run_serial(params(pairing="interaction", pairs_per_image=20), ann, root, tmp_path / "all")
    pairs = {tuple(sorted(r["category_names"])) for r in shards.iter_rows(tmp_path / "all")}
    assert ("cat", "couch") in pairs
    assert ("bed", "couch") not in pairs  # couch and bed outline the same furniture: a duplicate label
    assert ("remote", "remote") not in pairs  # below area_ratio


def _panoptic(shared_data):
    d = shared_data / "coco_panopticapi"
    return d / "panoptic_coco_detection_format.json", d / "input_images"


@pytest.mark.parametrize("pairing", ["reference", "interaction"])
def test_panoptic_rle_crowd_and_disjoint_masks(shared_data, tmp_path, pairing):
    ann, root = _panoptic(shared_data)
    data = json.loads(ann.read_text())
    by_id = {a["id"]: a for a in data["annotations"]}
    crowd = {a["id"] for a in data["annotations"] if a["iscrowd"]}
    assert crowd and all(isinstance(a["segmentation"], dict) for a in data["annotations"])
    m, _ = run_serial(params(pairing=pairing, area_ratio=0.0, pairs_per_image=100), ann, root, tmp_path / "out")
    assert m["images_with_pair"] == 2 and m["quarantined"] == {} and m["quarantined_annotations"] == {}
    rows = list(shards.iter_rows(tmp_path / "out"))
    assert len(rows) > 10
    for row in rows:
        assert not crowd & set(row["annotation_ids"])  # crowd regions are never chosen
        assert row["pair_mask_iou"] == [0.0]  # panoptic segments never overlap...
        if pairing == "reference":
            assert row["pair_box_iou"][0] > 0  # ...while their boxes do
        else:
            assert row["pair_contact_px"][0] > 0
    s = shards.decode_sample(rows[0])
    for k, aid in enumerate(s["annotation_ids"]):  # RLE decodes to the source's mask
        rle = dict(by_id[aid]["segmentation"])
        np.testing.assert_array_equal(s["masks"][k], mask_utils.decode(rle))
