"""The train stage end to end on Ray Train (2 CPU workers, gloo) with the real tiny PICSModel.

Ray Train runs cost 20-60 s each on 2 cores, so the module shares two runs between its tests:
an uninterrupted one (through the Prefect flow: init, autoencoder fit, training, export, metrics)
and one whose rank-1 worker is killed once after step 3 (resumes from the step-2 checkpoint).
Inputs are small shards written here in the real SAMPLE_SCHEMA / PRIOR_SCHEMA.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from tasks import atomic
from tasks.schema import PRIOR_SCHEMA, SAMPLE_SCHEMA, object_key

STEPS = 4  # the killed run dies after step 3, resumes from the step-2 checkpoint and runs step 4


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _patch(image, mask, box, size):
    x0, y0, x1, y1 = [int(round(v)) for v in box]
    side = max(x1 - x0, y1 - y0)
    canvas = np.full((side, side, 3), 255, np.uint8)
    mcanvas = np.zeros((side, side), np.uint8)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    m = mask[y0:y1, x0:x1].astype(bool)
    canvas[oy:oy + y1 - y0, ox:ox + x1 - x0][m] = image[y0:y1, x0:x1][m]
    mcanvas[oy:oy + y1 - y0, ox:ox + x1 - x0] = m * 255
    p = np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BILINEAR))
    pm = np.asarray(Image.fromarray(mcanvas).resize((size, size), Image.Resampling.NEAREST))
    return p, pm


def write_fixture(root: Path, n_images: int = 20, test_every: int = 5, seed: int = 0, patch: int = 64,
                  views: int = 6) -> tuple[Path, Path]:
    """``root/decomposed/shards`` and ``root/priors/shards``: two overlapping shapes per image."""
    import pycocotools.mask as mask_utils

    rng = np.random.default_rng(seed)
    w, h, res = 96, 72, 64
    rows, priors = [], {}
    for i in range(n_images):
        bg = np.linspace(rng.integers(0, 120, 3), rng.integers(120, 255, 3), w).astype(np.uint8)
        img = Image.fromarray(np.broadcast_to(bg[None], (h, w, 3)).copy())
        masks, boxes = [], []
        for k in range(2):
            cx, cy = 30 + 30 * k + rng.integers(-6, 6), 36 + rng.integers(-8, 8)
            rx, ry = rng.integers(12, 22), rng.integers(10, 20)
            box = [int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry)]
            m = Image.new("L", (w, h), 0)
            (ImageDraw.Draw(m).ellipse if k == 0 else ImageDraw.Draw(m).rectangle)(box, fill=255)
            img.paste(tuple(int(c) for c in rng.integers(0, 255, 3)), mask=m)
            masks.append(np.asarray(m) > 0)
        # the later shape occludes the earlier one: visible masks (the whole shapes are the amodal ones)
        amodal = [m.copy() for m in masks]
        masks[0] &= ~masks[1]
        image = np.asarray(img)
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        exp = []
        for b in boxes:
            cx, cy, hw, hh = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) * 0.575, (b[3] - b[1]) * 0.575
            exp.append([max(0.0, cx - hw), max(0.0, cy - hh), min(float(w), cx + hw), min(float(h), cy + hh)])
        patches, pmasks = zip(*[_patch(image, m, b, patch) for m, b in zip(masks, boxes)])
        side = max(w, h)
        scale, px, py = res / side, (side - w) // 2, (side - h) // 2
        region = np.zeros((res, res), np.uint8)
        for k, (x0, y0, x1, y1) in enumerate(exp):
            region[int((y0 + py) * scale):math.ceil((y1 + py) * scale),
                   int((x0 + px) * scale):math.ceil((x1 + px) * scale)] |= 1 << k
        p_png, m_png = [_png(p) for p in patches], [_png(m) for m in pmasks]
        rle, amodal_rle = ([mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in ms]
                           for ms in (masks, amodal))
        rows.append({
            "sample_id": f"{i}-{2 * i}-{2 * i + 1}", "split": "test" if i % test_every == 0 else "train",
            "source_image": f"{i}.png", "image_id": i, "width": w, "height": h, "image_bytes": _png(image),
            "n_objects": 2, "annotation_ids": [2 * i, 2 * i + 1], "category_ids": [1, 2],
            "category_names": ["ellipse", "box"], "masks_rle": rle, "boxes_tight": boxes, "boxes_expanded": exp,
            "patches": p_png, "patch_masks": m_png, "region_map": _png(region), "pair_box_iou": [0.1],
            "pair_mask_iou": [0.0], "pair_contact_px": [3], "depth_ranks": [1, 0], "amodal_rle": amodal_rle})
        for k in range(2):
            rgba = np.concatenate([patches[k], pmasks[k][..., None]], -1)
            vs = [_png(np.asarray(Image.fromarray(rgba, "RGBA").rotate(60 * v))) for v in range(views)]
            priors[object_key(p_png[k], m_png[k])] = {
                "object_key": object_key(p_png[k], m_png[k]), "num_views": views, "resolution": patch,
                "elevation_deg": 15.0, "azimuths_deg": [60.0 * v for v in range(views)], "views": vs,
                "depths": [b""] * views, "reconstructor": "test-fixture"}
    dec, pri = root / "decomposed" / "shards", root / "priors" / "shards"
    atomic.write_parquet(dec / "shard-00000.parquet", pa.Table.from_pylist(rows, SAMPLE_SCHEMA))
    atomic.write_parquet(pri / "shard-00000.parquet", pa.Table.from_pylist(list(priors.values()), PRIOR_SCHEMA))
    return dec.parent, pri.parent


def overrides(root: Path, out: str, **train) -> list[str]:
    base = {"steps": STEPS, "batch_size": 4, "num_workers": 2, "warmup_steps": 2, "log_every": 2,
            "checkpoint_every": 2, "keep_checkpoints": 2, "heldout_samples": 2, "sample_every": 0,
            "autoencoder_steps": 2, "autoencoder_batch": 2, "max_failures": 2, "out": str(root / out)}
    base.update(train)
    return ([f"decompose.out={root / 'decomposed'}", f"render_priors.out={root / 'priors'}", "ray.num_cpus=2"]
            + [f"train.{k}={'null' if v is None else v}" for k, v in base.items()])


# -- fail before any worker starts ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_fixture(root)
    return root


@pytest.mark.parametrize("extra, message", [
    (["decompose.out=/nonexistent/decomposed"], r"decompose.out='/nonexistent/decomposed'.*no \*.parquet shards"),
    (["train.batch_size=3"], r"train.batch_size=3 cannot be split evenly over train.num_workers=2"),
    (["train.batch_size=64"], r"train split has 16 samples.*fewer than one batch of 32 per worker"),
    (["model.preset=sd99"], r"model.preset.*'tiny', 'sd15' or 'sd21'"),
    (["render_priors.out=/nonexistent/priors"], r"model.use_shape_prior is true but render_priors.out"),
    (["train.strategy=fsdp"], r"train.strategy=fsdp needs train.use_gpu=true"),
    (["ray.storage_path=s3://bucket/x"], r"ray.storage_path='s3://bucket/x'.*filesystem path"),
])
def test_bad_params_fail_before_any_worker(fixture_root, extra, message):
    from tasks.params import ParamsError, load_params
    from tasks.train.plan import plan_run

    with pytest.raises(ParamsError, match=message):
        plan_run(load_params(None, overrides(fixture_root, "bad") + extra))
    assert not (fixture_root / "bad").exists()  # nothing was written, no run folder, no init


def test_too_many_workers_for_local_ray(fixture_root):
    from tasks.params import ParamsError, load_params
    from tasks.train.plan import check_resources, plan_run

    plan = plan_run(load_params(None, overrides(fixture_root, "bad", num_workers=4)))
    with pytest.raises(ParamsError, match=r"needs 4 CPUs; the local Ray has 2"):
        check_resources(plan, {"CPU": 2.0})


def test_v_prediction_reaches_the_saved_model_config(fixture_root):
    """train.prediction_type is what the saved model (init, hence every checkpoint export) says it
    predicts, so the samplers do not read v as epsilon."""
    from pics_model.modeling_pics import PICSModel
    from pics_model.pipeline_pics import make_scheduler
    from tasks.params import load_params
    from tasks.train.plan import plan_run
    from tasks.train.run import prepare_init

    plan = plan_run(load_params(None, overrides(fixture_root, "vpred", prediction_type="v_prediction",
                                                autoencoder_steps=0) + ["model.collage_residual=false"]))
    prepare_init(plan, log=lambda *_: None)
    model = PICSModel.from_pretrained(plan.init_dir)
    assert model.config.scheduler.prediction_type == "v_prediction"
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    for name in ("ddim", "dpmsolver++"):
        assert make_scheduler(name, model).config.prediction_type == "v_prediction"


def test_a_changed_preset_is_a_new_run(fixture_root, monkeypatch):
    """The run name hashes the resolved network config: after a preset change in
    pics_model/config.py, the finished run of the old network is not reused as this one."""
    from pics_model import config as model_config
    from tasks.params import load_params
    from tasks.train.plan import plan_run

    params = load_params(None, overrides(fixture_root, "bad"))
    before = plan_run(params).run_name
    tiny = model_config.PRESETS["tiny"]
    monkeypatch.setitem(model_config.PRESETS, "tiny", lambda: tiny().model_copy(update={"box_expand": 1.3}))
    assert plan_run(params).run_name != before


def test_resume_ignores_unmarked_checkpoint(tmp_path):
    """A newer folder without its marker (killed writer) loses to an older committed one, whether
    Ray reports it or the scan finds it."""
    import torch

    from tasks.train import checkpoint as ckpt
    from tasks.train.state import find_resume

    def state(step):
        return ckpt.CheckpointState(step, {"w": torch.full((2,), float(step))}, {"history": {}})

    ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(2), state(2))
    newer = ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(4), state(4))
    (newer / ckpt.MARKER).unlink()
    for reported in (None, newer):
        s, path = find_resume(reported, tmp_path)
        assert s.step == 2 and path.endswith("step-00000002") and float(s.weights["w"][0]) == 2.0
    assert find_resume(None, tmp_path / "empty") == (None, None)


# -- two Ray Train runs shared by the tests below -------------------------------------------------

@pytest.fixture(scope="module")
def runs(fixture_root, prefect_harness):
    """'plain': 2 workers, STEPS steps. 'killed': the same, rank 1 exits hard after step 3 once."""
    from flows.train import train_flow

    from tasks.train.fault_injection import ENV

    plain = train_flow(overrides=overrides(fixture_root, "plain"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, json.dumps({"step": 3, "rank": 1, "mode": "exit"}))
        killed = train_flow(overrides=overrides(fixture_root, "killed"))
    return plain, killed


def _history(summary):
    from tasks.train.report import load_history

    return load_history(Path(summary["checkpoint"]))


@pytest.mark.slow
def test_two_gloo_workers_end_with_identical_weights(runs):
    import torch

    from pics_model.modeling_pics import PICSModel
    from tasks.train.checkpoint import load_checkpoint
    from tasks.train.state import weights_digest

    plain, _ = runs
    h = _history(plain)
    assert plain["steps"] == STEPS and len(h["loss"]) == STEPS
    assert len(h["rank_digests"]) == 2 and h["rank_digests"][0] == h["rank_digests"][1]
    init = PICSModel.from_pretrained(Path(plain["out"]) / "init")  # exported for evaluate's untrained baseline
    names = [n for n, p in init.named_parameters() if id(p) in {id(q) for q in init.set_trainable("reference")}]
    assert weights_digest(init, names) != h["rank_digests"][0]  # they trained, not merely stayed equal
    # the exported model is what evaluate loads; it carries the checkpoint's (EMA) weights
    final = PICSModel.from_pretrained(plain["final"])
    ema = load_checkpoint(plain["checkpoint"]).ema
    some = names[0]
    assert torch.equal(dict(final.named_parameters())[some], ema[some])
    m = json.loads((Path(plain["out"]) / "metrics.json").read_text())
    assert m["heldout_loss_initial"] > 0 and m["heldout_loss_final"] > 0 and m["ranks_identical"] is True
    assert m["autoencoder_psnr_heldout"] >= 30.0  # the tiny preset's exact latent (issue 12 target)
    assert (Path(plain["out"]) / "loss.png").stat().st_size > 0
    assert (Path(plain["out"]) / "loss.csv").read_text().count("\n") == STEPS + 1
    # the gate's held-out occlusion accuracy: a curve (start, eval steps, end raw + EMA), the final value
    occ = (Path(plain["out"]) / "occlusion.csv").read_text().splitlines()
    assert occ[0].startswith("step,weights,accuracy,ci95_low,ci95_high,coverage") and len(occ) == 1 + 3
    assert [r["step"] for r in h["occlusion"]] == [0, STEPS, STEPS] and h["occlusion"][-1]["weights"] == "ema"
    acc, ci = m["occlusion_accuracy_final"], m["occlusion_accuracy_final_ci95"]  # ci: None under 2 routed samples
    assert 0 <= acc <= 1 and (ci is None or ci[0] <= acc <= ci[1]) and 0 < m["occlusion_coverage"] <= 1
    assert 1 <= m["occlusion_samples"] <= 2  # held-out samples whose shapes overlap
    assert set(h["occlusion"][0]["occlusion_by_timestep"]) == {"100", "300", "500", "700", "900"}


@pytest.mark.slow
def test_killed_worker_resumes_and_continues_the_same_run(runs):
    plain, killed = runs
    h_plain, h_killed = _history(plain), _history(killed)
    assert killed["steps"] == STEPS and killed["restarts"] == 1
    resumed = [e for e in h_killed["events"] if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2  # the step-2 checkpoint, not step 0
    # the loss continues exactly: same batches, noise and optimizer state as the uninterrupted run
    assert [s for s, _ in h_killed["loss"]] == list(range(1, STEPS + 1))
    assert h_killed["loss"] == h_plain["loss"]
    assert h_killed["rank_digests"] == h_plain["rank_digests"]
    assert h_killed["occlusion"] == h_plain["occlusion"]  # the probe's noise depends on the item only
