"""Evaluate stage units: occlusion accuracy, baselines, summary, plan checks, quarantine."""
from __future__ import annotations

import math
import numpy as np
import pyarrow as pa
import pytest
import torch

from tasks.evaluate import baselines, occlusion
from tasks.evaluate.inference import GROUND_TRUTH, RESULT_SCHEMA, EvalConfig, Evaluator
from tasks.evaluate.metrics import frechet_distance
from tasks.evaluate.summary import dvc_metrics, summarize
from tasks.params import EvaluateParams


def test_cell_fraction_uses_the_square_padded_frame():
    m = np.zeros((1, 4, 8), np.uint8)  # H=4, W=8 -> square 8x8, image rows 2..5
    m[0, :, :4] = 1
    f = occlusion.cell_fraction(m, 2)[0]  # cells of 4x4 px
    assert f.tolist() == [[0.5, 0.0], [0.5, 0.0]]


def test_paste_object_scales_the_silhouette_onto_the_box():
    patch = np.full((20, 20, 3), 255, np.uint8)
    pmask = np.zeros((20, 20), np.uint8)
    patch[5:15, 5:15], pmask[5:15, 5:15] = (10, 200, 30), 1
    canvas = np.zeros((40, 50, 3), np.uint8)
    out = baselines.paste_object(canvas, patch, pmask, (10, 8, 30, 28))
    assert (out[8:28, 10:30] == (10, 200, 30)).all()
    out[8:28, 10:30] = 0
    assert not out.any()


def test_painter_order_far_to_near():
    s = {"boxes_tight": np.array([[0, 0, 5, 30], [0, 0, 5, 10], [0, 0, 5, 20]], np.float32), "depth_ranks": [0, 2, 1]}
    assert baselines.far_to_near(s) == [1, 2, 0]
    s["depth_ranks"] = None  # lower box bottom = nearer = painted last
    assert baselines.far_to_near(s) == [1, 2, 0]


def _row(sid, method, **kw):
    r = {c: None for c in RESULT_SCHEMA.names}
    r.update(sample_id=sid, method=method, **kw)
    return r


def _occ(credit):
    return {"occ_levels": [4, 2], "occ_credit": credit, "occ_ties": [0.0] * 4, "occ_routed": [4.0, 0.0],
            "occ_pixels": [8.0, 0.0]}


def test_summary_means_fid_and_trained_minus_untrained():
    gen = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(4, 8, generator=gen) for k in (GROUND_TRUTH, "pics", "untrained")}
    rows = []
    for i in range(4):
        sid = f"s{i}"
        rows.append(_row(sid, GROUND_TRUTH, fid_features=feats[GROUND_TRUTH][i].tolist()))
        rows.append(_row(sid, "pics", seconds=1.0, mpsnr=10.0 + i, mssim=0.5,
                         mlpips_mobilenetv2_proxy=0.2, fid_features=feats["pics"][i].tolist(),
                         **_occ([1.0, 0.0, 3.0, 0.0])))
        rows.append(_row(sid, "untrained", seconds=1.0, mpsnr=9.0 if i else None, mssim=0.6,
                         mlpips_mobilenetv2_proxy=0.3, fid_features=feats["untrained"][i].tolist(),
                         **_occ([2.0, 0.0, 2.0, 0.0])))
    rows.append(_row("bad", "", error="ValueError: broken"))
    s = summarize(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    assert s["n_samples"] == 4 and s["n_failed"] == 1
    p, u = s["methods"]["pics"], s["methods"]["untrained"]
    assert p["mpsnr"] == pytest.approx(11.5) and u["mpsnr"] == pytest.approx(9.0) and u["n_overlap"] == 3
    assert p["fid_mobilenetv2_proxy"] == pytest.approx(frechet_distance(feats[GROUND_TRUTH], feats["pics"]), rel=1e-5)
    # two steps x two levels (4x4 routed 4 of 8 pixels, 2x2 none): pooled over steps and samples
    assert p["occlusion_curve"] == [0.25, 0.75] and p["occlusion_accuracy"] == 0.5 and u["occlusion_accuracy"] == 0.5
    assert p["occlusion_coverage"] == 0.5 and p["occlusion_accuracy_by_level"] == {"4x4": 0.5}
    assert p["occlusion_coverage_by_level"] == {"4x4": 0.5} and p["occlusion_accuracy_ci95"] == [0.5, 0.5]
    d = s["trained_minus_untrained"]
    assert d["mpsnr"] == pytest.approx(2.5) and d["mssim"] == pytest.approx(-0.1)
    assert d["mlpips_mobilenetv2_proxy"] == pytest.approx(0.1)  # lower is better: sign flipped
    pr = s["paired"]["pics_vs_untrained"]["mpsnr"]  # paired over the 3 samples both have: diffs 2, 3, 4
    assert pr["mean"] == pytest.approx(3.0) and pr["wins"] == 3 and pr["n"] == 3
    assert pr["sem"] == pytest.approx(1 / math.sqrt(3)) and 2.0 <= pr["ci95"][0] < 3.0 < pr["ci95"][1] <= 4.0
    assert s["paired"]["pics_vs_untrained"]["occlusion_accuracy"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 4}
    flat = dvc_metrics(s)
    assert "occlusion_curve" not in flat["pics"] and flat["pics"]["occlusion_accuracy"] == 0.5
    assert flat["pics"]["occlusion_accuracy_ci95"] == [0.5, 0.5] and flat["paired"] == s["paired"]
    assert not any(k in ("fid", "lpips", "clip_score") for k in flat["pics"])  # proxies never standard names


def test_untrained_baseline_is_the_init_train_exports_beside_final(tmp_path):
    """evaluate reads the untrained model from a declared train output (dvc pull brings it), not
    from the run folder a run.json names (which exists only on the machine that trained)."""
    from tasks.evaluate.inference import find_untrained

    (tmp_path / "train" / "final").mkdir(parents=True)
    assert find_untrained(tmp_path / "train" / "final") is None
    (tmp_path / "train" / "init").mkdir()
    (tmp_path / "train" / "init" / "config.json").write_text("{}")
    assert find_untrained(tmp_path / "train" / "final") == tmp_path / "train" / "init"


def test_bad_sample_is_an_error_row_not_a_crash(tmp_path):
    ev = Evaluator(EvalConfig(checkpoint="", params=EvaluateParams(methods=["copy_paste"], record_alpha=False)))
    bad = {"sample_id": "x-1-2", "image_bytes": b"not an image", "height": 10, "width": 10}
    out = ev(pa.Table.from_pylist([bad]))
    r = out.to_pylist()
    assert len(r) == 1 and r[0]["sample_id"] == "x-1-2" and r[0]["error"]
    assert out.schema == RESULT_SCHEMA


def test_plan_rejects_missing_inputs_with_the_key(tmp_path, schema_defaults):
    from tasks.evaluate.stage import EvaluateInputError, make_plan
    from tasks.params import load_params

    p = load_params(schema_defaults, [f"evaluate.samples={tmp_path}"])
    with pytest.raises(EvaluateInputError, match=r"evaluate.samples.*no decompose shards"):
        make_plan(p)



def test_plan_rejects_a_corrupted_checkpoint_naming_the_file(tmp_path, schema_defaults):
    import pyarrow.parquet as pq

    from pics_model.config import get_preset
    from pics_model.modeling_pics import PICSModel
    from tasks.evaluate.stage import EvaluateInputError, make_plan
    from tasks.params import load_params

    pq.write_table(pa.table({"sample_id": ["a"], "split": ["test"]}), tmp_path / "shard-00000.parquet")
    ckpt = PICSModel(get_preset("tiny")).save_pretrained(tmp_path / "model")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    p = load_params(schema_defaults, [f"evaluate.samples={tmp_path}", f"evaluate.checkpoint={ckpt}",
                                             "evaluate.methods=[pics]"])
    with pytest.raises(EvaluateInputError, match=f"{weights}: its sha256 differs.*evaluate.checkpoint"):
        make_plan(p)


@pytest.fixture(scope="module")
def coco_rows(shared_data, tmp_path_factory):
    """A real COCO image (two cats, remotes, couch) decomposed into test samples."""
    from tasks.decompose.pipeline import run_serial
    from tasks.params import DecomposeParams
    from tasks.shards import iter_rows

    d = shared_data / "coco_hf_39769"
    out = tmp_path_factory.mktemp("coco") / "decomposed"
    run_serial(DecomposeParams(test_fraction=1.0, area_ratio=0.01), d / "instances_39769.json", d, out)
    rows = list(iter_rows(out, split="test"))
    assert rows, "the real COCO image gave no test sample"
    return rows


def test_nan_model_output_fails_the_evaluation_instead_of_scoring_black(coco_rows, tmp_path):
    from pics_model.config import get_preset
    from pics_model.modeling_pics import PICSModel
    from pics_model.pipeline_pics import NonFiniteOutputError

    model = PICSModel(get_preset("tiny"))
    with torch.no_grad():
        model.unet.conv_out.bias.fill_(float("nan"))
    model.save_pretrained(tmp_path / "model")
    ev = Evaluator(EvalConfig(checkpoint=str(tmp_path / "model"),
                              params=EvaluateParams(methods=["pics"], steps=1, record_alpha=False)))
    with pytest.raises(NonFiniteOutputError, match="NaN or inf"):
        ev(pa.Table.from_pylist(coco_rows[:1]))


def test_evaluator_on_a_real_coco_sample_with_a_local_standard_backbone(coco_rows, tmp_path):
    """copy-paste re-inserts the real object pixels (high mPSNR); a DINOv2 folder named in the
    config adds its standard-named score; COCO has no depth order -> no occlusion score."""
    from pics_model.config import DinoV2Arch
    from pics_model.dinov2 import DinoV2ViT
    from pics_model.testing import write_dinov2_hf_folder

    torch.manual_seed(0)
    path = write_dinov2_hf_folder(DinoV2ViT(DinoV2Arch(embed_dim=32, depth=1, num_heads=4, pos_embed_size=28,
                                                       ffn="mlp")), tmp_path / "dinov2")
    ev = Evaluator(EvalConfig(checkpoint="", params=EvaluateParams(methods=["copy_paste"]),
                              backbones={"dinov2": str(path)}))
    rows = ev(pa.Table.from_pylist(coco_rows[:1])).to_pylist()
    assert [r["method"] for r in rows] == [GROUND_TRUTH, "copy_paste"] and rows[1]["error"] is None
    cp = rows[1]
    assert cp["mpsnr"] > 15 and cp["psnr"] > cp["mpsnr"] - 1 and 0 < cp["mssim"] <= 1
    assert -1 <= cp["dinov2_score"] <= 1 and cp["clip_score"] is None and cp["objsim_mobilenetv2_proxy"] > 0.5
    assert cp["occ_credit"] is None
