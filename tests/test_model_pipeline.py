"""PICSPipeline end to end on the tiny preset (CPU): samplers, guidance, order invariance,
paste-back, alpha maps, N = 1..4."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pics_model.config import get_preset
from pics_model.data import expand_boxes
from pics_model.modeling_pics import PICSModel
from pics_model.pipeline_pics import NonFiniteOutputError, PICSPipeline
from tasks.params import ModelParams


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = PICSModel(get_preset("tiny")).eval()
    with torch.no_grad():  # open the zero-initialised paths so objects and routing affect the output
        for blk in m.itb_blocks():
            blk.back_attn.to_out[0].weight.normal_(0, 0.05)
        for conv in [*m.controlnet.controlnet_down_blocks, m.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    objs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    boxes = np.array([[4, 4, 40, 36], [24, 10, 70, 45], [8, 20, 30, 46], [50, 2, 78, 26]], np.float32)
    return bg, objs, boxes


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_pipeline_runs_and_is_order_invariant(model, scene, sampler):
    bg, objs, boxes = scene
    pipe = PICSPipeline(model, sampler)
    out = pipe(bg, objs[:2], boxes=boxes[:2], num_inference_steps=3, guidance_scale=5.0, seed=3,
               record_alpha=True, output_type="np")
    img = out.images[0]
    assert img.shape == (48, 80, 3) and np.isfinite(img).all()
    swapped = pipe(bg, objs[:2][::-1], boxes=boxes[:2][::-1], num_inference_steps=3, guidance_scale=5.0,
                   seed=3, record_alpha=True, output_type="np")
    assert np.abs(swapped.images[0] - img).max() < 1e-4
    other = pipe(bg, [objs[2], objs[1]], boxes=boxes[:2], num_inference_steps=3, seed=3, output_type="np")
    assert np.abs(other.images[0] - img).max() > 1e-3  # the objects do matter
    # paste-back: outside the union of expanded boxes the background is untouched
    union = out.union_masks[0]
    assert union.any() and not union.all()
    assert np.abs(img[~union] - bg[~union] / 255.0).max() < 1e-6
    assert np.abs(out.generated[0][union] - img[union]).max() < 1e-6
    # alpha maps: one per step, per object, in [0, 1], a distribution where objects overlap
    assert len(out.alpha_maps) == 3 and out.alpha_maps[0].shape == (2, 16, 16)
    a = out.alpha_maps[-1]
    assert a.min() >= 0 and a.max() <= 1 + 1e-6 and ((a > 0) & (a < 1)).any()
    _check_gate_maps(out, swapped, boxes[:2], bg.shape[:2])


def _check_gate_maps(out, swapped, boxes, hw):
    """Per-block gate maps: each block on its own token grid, weights only where routed, alpha pairs
    summing to 1; the occlusion accuracy they give does not depend on the objects' order."""
    from tasks.evaluate import occlusion

    assert len(out.gate_maps) == 3
    sides = set()
    for w, routed in out.gate_maps[-1]:
        sides.add(w.shape[-1])
        assert w.shape == routed.shape and routed.dtype == bool and ((w > 0) <= routed).all()
        both = routed[0] & routed[1]
        np.testing.assert_allclose((w[0] + w[1])[both], 1.0, atol=1e-5)
    assert len(sides) >= 2
    amodal = np.zeros((2, *hw), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        amodal[k, y0:y1, x0:x1] = 1
    modal = amodal.copy()
    modal[0][amodal[1] > 0] = 0  # object 1 in front
    acc = [occlusion.summarize([occlusion.sample_stats(o.gate_maps, occlusion.occlusion_truth(
        {"amodal_masks": amodal[order], "masks": modal[order]}))]) for o, order in ((out, [0, 1]), (swapped, [1, 0]))]
    assert acc[0]["occlusion_accuracy"] == pytest.approx(acc[1]["occlusion_accuracy"], abs=1e-6)
    assert acc[0]["occlusion_coverage"] == acc[1]["occlusion_coverage"] > 0


def test_pipeline_seed_masks_and_object_counts(model, scene):
    bg, objs, boxes = scene
    pipe = PICSPipeline(model)
    a = pipe(Image.fromarray(bg), objs[:3], boxes=boxes[:3], num_inference_steps=2, seed=7)
    b = pipe(bg, objs[:3], boxes=boxes[:3], num_inference_steps=2, seed=7)
    assert isinstance(a.images[0], Image.Image) and a.images[0].size == (80, 48)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    masks = np.zeros((4, 48, 80), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[i, y0:y1, x0:x1] = True
    out = pipe(bg, objs, masks=masks, num_inference_steps=2, guidance_scale=1.0, seed=7, output_type="np")
    # tight boxes come from the masks, then the same expansion as with explicit boxes
    assert np.allclose(out.boxes[0], expand_boxes(boxes, 1.15, 80, 48), atol=1e-4)
    assert out.images[0].shape == (48, 80, 3)
    single = pipe(bg, objs[:1], boxes=boxes[:1], num_inference_steps=2, seed=7, output_type="np")
    assert np.isfinite(single.images[0]).all()
    with pytest.raises(ValueError, match="1..4"):
        pipe(bg, objs + objs[:1], boxes=np.concatenate([boxes, boxes[:1]]), num_inference_steps=1)
    with pytest.raises(ValueError, match="masks or boxes"):
        pipe(bg, objs[:2], num_inference_steps=1)


def test_box_expansion_matches_training_midpoint(model, scene):
    bg, objs, boxes = scene
    pipe = PICSPipeline(model)
    assert pipe.box_expand == pytest.approx(1.15)
    out = pipe(bg, objs[:2], boxes=boxes[:2], num_inference_steps=1, seed=0, output_type="np")
    w0 = boxes[0, 2] - boxes[0, 0]
    assert out.boxes[0][0, 2] - out.boxes[0][0, 0] == pytest.approx(w0 * 1.15, rel=1e-5)


def test_non_finite_decoded_image_raises_instead_of_pasting_black(scene):
    """NaN from the VAE decoder used to become a black region in an image that looked valid."""
    bg, objs, boxes = scene
    torch.manual_seed(0)
    broken = PICSModel(ModelParams(latent="kl").pics_config()).eval()  # a decoder that can overflow
    with torch.no_grad():
        broken.vae.decoder.conv_out.bias[1] = float("inf")  # the latents stay finite, the image does not
    with pytest.raises(NonFiniteOutputError, match="of the decoded image are NaN or inf"):
        PICSPipeline(broken)(bg, objs[:1], boxes=boxes[:1], num_inference_steps=1, seed=0)



def test_pipeline_hint_is_the_training_hint(model):
    """One hint function for training and inference: the pipeline's inputs for a sample equal the
    training item of that sample (augmented: the collage ignores augmentation), collage included."""
    from pics_model.data import AugmentConfig, build_item
    from pics_model.testing import synthetic_sample

    cfg = model.config
    assert cfg.collage_hint
    s = synthetic_sample(np.random.default_rng(0), n=2, height=48, width=80, views=None)
    s["boxes_expanded"] = expand_boxes(s["boxes_tight"], 1.15, 80, 48)
    train = build_item(s, cfg.resolution, np.random.default_rng(1), AugmentConfig(),
                       object_size=cfg.object_encoder.image_size, collage=cfg.collage_hint)
    batch, expanded, _ = PICSPipeline(model).prepare(s["image"], list(s["patches"]), boxes=s["boxes_tight"],
                                                     patch_masks=s["patch_masks"])
    assert np.allclose(expanded, s["boxes_expanded"])
    assert batch["hint"].shape == (1, 5, 64, 64) and torch.equal(batch["hint"][0], train["hint"])
    assert torch.equal(batch["routing_masks"][0], train["routing_masks"])
    # without patch masks the pipeline takes the non-white pixels: these patches are on white
    guessed, _, _ = PICSPipeline(model).prepare(s["image"], list(s["patches"]), boxes=s["boxes_tight"])
    assert torch.equal(guessed["hint"], batch["hint"])


def test_full_resolution_composite_keeps_the_sharp_collage_where_the_network_changes_nothing():
    """A collage-residual model whose network outputs zero: at full resolution the composite is the
    full-resolution start (sharp silhouettes) up to the small gap between the two starts' fills;
    the 64 px frame upsampled 5x is blurred. An ordinary model has no start and ignores the flag."""
    from pics_model.data import build_item, collage_start, square_geometry
    from pics_model.testing import synthetic_sample

    torch.manual_seed(0)
    model = PICSModel(ModelParams(collage_residual=True).pics_config()).eval()
    torch.nn.init.zeros_(model.unet.conv_out.weight)
    torch.nn.init.zeros_(model.unet.conv_out.bias)
    h, w = 192, 320
    s = synthetic_sample(np.random.default_rng(0), n=2, height=h, width=w, views=None,
                         boxes=np.array([[60, 40, 180, 170], [130, 50, 260, 180]], np.float32))
    kw = dict(boxes=s["boxes_tight"], patch_masks=s["patch_masks"], num_inference_steps=2, guidance_scale=1.0,
              output_type="np", seed=0)
    sharp = PICSPipeline(model)(s["image"], list(s["patches"]), **kw).generated[0]
    coarse = PICSPipeline(model, full_resolution=False)(s["image"], list(s["patches"]), **kw).generated[0]
    size, top, _ = square_geometry(h, w)
    s["boxes_expanded"] = expand_boxes(s["boxes_tight"], model.config.box_expand, w, h)
    start = collage_start(build_item(s, size, None, collage=True)["hint"][None])[0, :, top:top + h]
    start = start.add(1).div(2).clamp(0, 1).permute(1, 2, 0).numpy()
    err_sharp, err_coarse = np.abs(sharp - start).mean(), np.abs(coarse - start).mean()
    assert err_sharp < 0.03 and err_coarse > 5 * err_sharp  # the patches are noise: blurring costs
    assert not PICSPipeline(PICSModel(get_preset("tiny")).eval()).full_resolution
