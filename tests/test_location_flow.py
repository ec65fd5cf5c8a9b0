"""The location stage's evaluation counts, `pics propose`, and the whole flow on a shrunk config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pics_model.location_model import LocationConfig, LocationModel
from tasks.location.evaluate import hits, metrics, paired_interval, rates

ROOT = Path(__file__).resolve().parents[1]


def test_hits_count_a_sample_only_for_its_best_match_above_the_threshold():
    pos = np.array([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])
    neg = np.array([[0.0, 0.0, 0.22, 0.2]])  # overlaps the first positive
    drawn = np.array([[0.0, 0.0, 0.219, 0.2],  # best match: the negative (IoU ~1) -> a false positive
                      [0.8, 0.8, 0.9, 0.9],  # matches nothing: ignored
                      [0.5, 0.5, 0.7, 0.69],  # the second positive
                      [0.5, 0.5, 0.7, 0.7]])  # the same positive again: still one hit
    np.testing.assert_array_equal(hits(drawn, pos, neg, [1, 2, 4], 0.5), [[0, 1], [0, 1], [1, 1]])
    tpr, fpr = rates(np.array([[[1, 1]], [[0, 0]]]), np.array([[2, 1], [2, 3]]))
    assert tpr.tolist() == [0.25] and fpr.tolist() == [0.25]


def test_paired_interval_of_identical_methods_is_zero_and_a_better_one_is_below():
    rng = np.random.default_rng(0)
    totals = np.tile([[3, 3]], (40, 1))
    a = rng.integers(0, 3, (40, 2, 2))
    same = paired_interval(a, a, totals, 1, 50, 0)
    assert all(d["diff"] == 0 and d["ci95"] == [0, 0] for d in same)
    b = a.copy()
    b[..., 1] = 0  # never hits a negative
    lower = paired_interval(a, b, totals, 1, 200, 0)
    assert all(d["ci95"][1] < 0 for d in lower)
    m = metrics({"hits": {"random": a, "class_prior": a, "stage1": a, "dpo": b}, "totals": totals}, [10, 20], 0.5, 50, 0)
    assert set(m["tpr_at_k"]) == {"random", "class_prior", "stage1", "dpo"} and len(m["fpr_at_k"]["dpo"]) == 2


def test_baselines_are_the_mean_of_their_draws_and_models_one_draw():
    from tasks.location.evaluate import evaluate, prior_boxes, random_boxes

    q = {"category": "ball", "width": 100, "height": 100, "image": np.zeros((100, 100, 3), np.uint8),
         "positives": np.array([[0, 0, 60, 60], [40, 40, 100, 100]], np.float32),
         "negatives": np.array([[0, 50, 50, 100]], np.float32)}
    ks = [5, 20]
    out = evaluate({}, [q], [q], ks, 0.3, 1.0, 1.0, seed=4, baseline_draws=7)
    rng = np.random.default_rng([4, 0])  # the query's generator: 7 random draws, then 7 prior draws
    pos, neg = q["positives"] / 100, q["negatives"] / 100
    want_random = np.mean([hits(random_boxes(20, rng), pos, neg, ks, 0.3) for _ in range(7)], 0)
    sizes = np.array([[0.6, 0.6], [0.6, 0.6]])
    want_prior = np.mean([hits(prior_boxes(20, sizes, rng), pos, neg, ks, 0.3) for _ in range(7)], 0)
    np.testing.assert_allclose(out["hits"]["random"][0], want_random)
    np.testing.assert_allclose(out["hits"]["class_prior"][0], want_prior)
    assert not np.allclose(want_random, np.round(want_random))  # a mean, not one draw's counts


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LocationModel(LocationConfig(class_names=["ball", "can"], bins=16, image_size=32, d_model=32, layers=1,
                                         heads=2, encoder={"kind": "small", "small_channels": [8, 16]}))
    return model.save_pretrained(tmp_path_factory.mktemp("loc") / "final")


def test_propose_writes_pixel_boxes_scores_and_a_drawing(tiny_checkpoint, tmp_path):
    from flows.cli import app

    bg = tmp_path / "bg.png"
    Image.new("RGB", (200, 100), (90, 120, 90)).save(bg)
    out = tmp_path / "boxes.json"
    r = CliRunner().invoke(app, ["propose", "--background", str(bg), "--class", "can", "--checkpoint",
                                 str(tiny_checkpoint), "-k", "7", "--out", str(out), "--region", "left"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    boxes = np.asarray(res["boxes"])
    assert boxes.shape == (7, 4) and len(res["scores"]) == 7
    assert res["scores"] == sorted(res["scores"], reverse=True)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, [0, 2]] <= 100).all() and (boxes[:, [1, 3]] <= 100).all()  # left half of a 200 px width
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size[0] / im.size[1] == 2
    r = CliRunner().invoke(app, ["propose", "--background", str(bg), "--class", "giraffe", "--checkpoint",
                                 str(tiny_checkpoint), "--out", str(out)])
    assert r.exit_code == 2 and "giraffe" in r.output and "ball, can" in r.output


@pytest.mark.slow
def test_location_flow_trains_evaluates_and_proposes(tmp_path, prefect_api_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_api_url}  # the session's server: no temporary one (20-30 s)
    out = tmp_path / "location"
    sets = ["location.num_scenes=10", "location.shard_size=5", "location.mle_steps=40", "location.dpo_steps=10",
            "location.ks=[10,20]", "location.bootstrap=20", "location.test_fraction=0.3"]
    cmd = [sys.executable, "-m", "flows.cli", "location", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    for what in ("tpr_at_k", "fpr_at_k"):
        assert set(m[what]) == {"random", "class_prior", "stage1", "dpo"} and all(len(v) == 2 for v in m[what].values())
    assert len(m["dpo_vs_stage1"]["fpr"]) == 2
    for d in ("stage1", "final"):
        assert {"config.json", "model.safetensors", "sha256.json"} <= {p.name for p in (out / d).iterdir()}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["queries"] > 0 and manifest["negatives_by_reason"]
    assert (out / "curves.png").is_file() and "TPR" in (out / "report.md").read_text()
    from tasks.location.data import read_queries

    q = read_queries(out / "data", "test")[0]
    bg = tmp_path / "bg.png"
    Image.fromarray(q["image"]).save(bg)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "propose", "--background", str(bg), "--class", q["category"],
                        "--checkpoint", str(out / "final"), "-k", "5", "--out", str(tmp_path / "b.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((tmp_path / "b.json").read_text())["boxes"]) == 5


def test_composite_object_without_box_gets_a_proposed_box(tiny_checkpoint, tmp_path):
    from flows.composite import CompositeInputError, _proposed

    bg, obj = tmp_path / "bg.png", tmp_path / "obj.png"
    Image.new("RGB", (120, 90), (90, 120, 90)).save(bg)
    Image.new("RGB", (30, 30), (200, 20, 20)).save(obj)
    spec = _proposed(str(obj), str(bg), "ball", str(tiny_checkpoint))
    x0, y0, x1, y1 = spec.box
    assert spec.mask is None and 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 90
    with pytest.raises(CompositeInputError, match="giraffe"):
        _proposed(str(obj), str(bg), "giraffe", str(tiny_checkpoint))
