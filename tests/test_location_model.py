"""The location model: box tokens, causal decoding, KV-cached sampling, the DPO objective, saving."""
import pytest
import torch

from pics_model.location_model import (LocationConfig, LocationModel, box_values, causal_mask, dequantize, dpo_loss,
                                       mle_loss, quantize)

CLASSES = ["ball", "can", "cone"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LocationModel(LocationConfig(class_names=CLASSES, bins=16, image_size=32, d_model=32, layers=2,
                                        heads=4, encoder={"kind": "small", "small_channels": [8, 16]})).eval()


def _prefix(model, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.condition(torch.rand(n, 3, 40, 48, generator=g), torch.arange(n) % len(CLASSES))


def test_quantize_round_trip_within_half_a_bin():
    boxes = torch.rand(100, 4)
    back = dequantize(quantize(boxes, 64), 64)
    assert (back - boxes).abs().max() <= 0.5 / 64 + 1e-6
    assert quantize(torch.tensor([0.0, 1.0, -0.2, 1.3]), 64).tolist() == [0, 63, 0, 63]
    assert torch.equal(quantize(back, 64), quantize(boxes, 64))


def test_causal_mask_hides_the_future(model):
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    prefix = _prefix(model)
    a, b = torch.tensor([[3, 4, 9, 10]]), torch.tensor([[3, 4, 9, 15]])
    # the last token is never input: changing it changes no logit; changing x1 changes later ones
    assert torch.equal(model.logits(prefix, a), model.logits(prefix, b))
    c = torch.tensor([[7, 4, 9, 10]])
    la, lc = model.logits(prefix, a), model.logits(prefix, c)
    assert torch.equal(la[:, 0], lc[:, 0]) and not torch.allclose(la[:, 1], lc[:, 1])


def test_cached_sampling_equals_uncached_and_teacher_forcing(model):
    prefix = _prefix(model)
    t1, lp1 = model.sample(prefix, 12, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(1))
    t2, lp2 = model.sample(prefix, 12, temperature=0.9, top_p=0.9, use_cache=False,
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    torch.testing.assert_close(lp1, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp1, model.box_logprob(prefix.expand(12, -1, -1), t1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["support", "xyxy"])
def test_samples_are_valid_boxes_inside_the_region(model, layout):
    m = LocationModel(LocationConfig(**{**vars(model.cfg), "box_tokens": layout})).eval()
    prefix = _prefix(m)
    for region, inside in (("left", lambda b: (b[:, [0, 2]] <= 0.5).all()),
                           ("bottom", lambda b: (b[:, [1, 3]] >= 0.5).all())):
        boxes = m.boxes_of(m.sample(prefix, 200, generator=torch.Generator().manual_seed(0), region=region)[0])
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert inside(boxes), region
    t, _ = m.sample(prefix, 200, generator=torch.Generator().manual_seed(0))
    assert (m.boxes_of(t)[:, 2] > 0.5).any()  # unrestricted: the right half is reachable


def test_support_tokens_put_the_bottom_edge_first_then_centre_and_size():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(box_values(boxes, "support"), torch.tensor([[0.9, 0.3, 0.7, 0.4], [1.0, 0.5, 1.0, 1.0]]))
    rand = torch.rand(500, 4)
    rand = torch.cat([torch.minimum(rand[:, :2], rand[:, 2:]), torch.maximum(rand[:, :2], rand[:, 2:])], 1)
    back = dequantize(quantize(rand, 64, "support"), 64, "support")
    assert (back[:, 3] - rand[:, 3]).abs().max() <= 0.5 / 64 + 1e-6  # the bottom edge: half a bin
    assert (back - rand).abs().max() <= 1 / 64 + 1e-6  # the others: one bin at most
    assert (back[:, 2:] >= back[:, :2]).all() and (back >= 0).all() and (back <= 1).all()


def test_dpo_loss_sign_and_gradient_direction():
    ref_w, ref_l = torch.tensor([-5.0]), torch.tensor([-5.0])
    at_ref = dpo_loss(ref_w, ref_l, ref_w, ref_l, beta=0.1)
    assert at_ref.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    # policy prefers the positive more than the reference does: lower loss; the reverse: higher
    assert dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), ref_w, ref_l, 0.1) < at_ref
    assert dpo_loss(torch.tensor([-6.0]), torch.tensor([-4.0]), ref_w, ref_l, 0.1) > at_ref
    w, l_ = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    dpo_loss(w, l_, ref_w, ref_l, 0.1).backward()
    assert w.grad.item() < 0 < l_.grad.item()  # descent raises the positive, lowers the negative


def test_mle_step_raises_the_likelihood_of_the_positive(model):
    m = LocationModel(model.cfg)
    m.load_state_dict(model.state_dict())
    prefix_in = torch.rand(1, 3, 32, 32), torch.tensor([1])
    box = torch.tensor([[2, 8, 6, 14]])
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    before = m.box_logprob(m.condition(*prefix_in), box).item()
    for _ in range(5):
        opt.zero_grad()
        mle_loss(m, m.condition(*prefix_in), box).backward()
        opt.step()
    assert m.box_logprob(m.condition(*prefix_in), box).item() > before


def test_save_and_load_round_trip_and_refuse_a_flipped_byte(model, tmp_path):
    from pics_model.modeling_pics import WeightsError

    model.save_pretrained(tmp_path / "m")
    back = LocationModel.from_pretrained(tmp_path / "m")
    prefix_in = torch.rand(1, 3, 32, 32), torch.tensor([2])
    torch.testing.assert_close(back.box_logprob(back.condition(*prefix_in), torch.tensor([[1, 2, 3, 4]])),
                               model.box_logprob(model.condition(*prefix_in), torch.tensor([[1, 2, 3, 4]])))
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="model.safetensors"):
        LocationModel.from_pretrained(tmp_path / "m")


def test_a_model_saved_before_box_tokens_loads_as_xyxy(model, tmp_path):
    import json

    from pics_model.file_hashes import save_model_folder

    m = LocationModel(LocationConfig(**{**vars(model.cfg), "box_tokens": "xyxy"}))
    old_cfg = {k: v for k, v in json.loads(m.cfg.to_json()).items() if k != "box_tokens"}
    save_model_folder(tmp_path / "old", m, json.dumps(old_cfg), {"pics_location": "1"})
    assert LocationModel.from_pretrained(tmp_path / "old").cfg.box_tokens == "xyxy"
    with pytest.raises(ValueError, match="box_tokens"):
        LocationConfig(class_names=CLASSES, box_tokens="yxyx")


def test_smoothed_targets_are_distributions_peaked_at_the_token_and_one_hot_at_zero_sigma():
    from pics_model.location_model import smoothed_targets

    tok = torch.tensor([[0, 5, 15, 9]])
    t = smoothed_targets(tok, 16, 1.5)
    assert t.shape == (1, 4, 16)
    torch.testing.assert_close(t.sum(-1), torch.ones(1, 4))
    assert torch.equal(t.argmax(-1), tok)
    assert t[0, 1, 4] == t[0, 1, 6] and t[0, 1, 6] > t[0, 1, 8] > 0  # symmetric, falling with distance
    assert torch.equal(smoothed_targets(tok, 16, 0.0), torch.nn.functional.one_hot(tok, 16).float())


def test_smoothed_mle_calls_a_near_miss_better_than_a_far_one(model):
    prefix = _prefix(model)
    target = torch.tensor([[8, 8, 8, 8]])
    logits = torch.full((1, 4, 16), -5.0)

    def loss_with_mass_at(b, sigma):
        lg = logits.clone()
        lg[..., b] = 5.0
        m = model.logits  # the loss reads the model's logits: replace them with a fixed guess
        model.logits = lambda p, t: lg
        try:
            return mle_loss(model, prefix, target, sigma).item()
        finally:
            model.logits = m

    assert loss_with_mass_at(9, 1.5) < loss_with_mass_at(14, 1.5)
    assert loss_with_mass_at(9, 0.0) == pytest.approx(loss_with_mass_at(14, 0.0))  # hard targets: no difference


@pytest.fixture(scope="module")
def frozen_model():
    """The frozen ImageNet MobileNetV2 cut after 7 blocks (32 channels, stride 8), pooled by 2,
    with Fourier position/value features: the default configuration's kind, at a small size."""
    torch.manual_seed(0)
    cfg = LocationConfig(class_names=CLASSES, bins=16, image_size=64, d_model=32, layers=1, heads=4,
                         encoder={"kind": "mobilenetv2", "feature_blocks": 7}, token_pool=2, feature_norm=True,
                         fourier=4)
    return LocationModel(cfg).eval()


def test_frozen_encoder_features_computed_once_give_the_same_prefix(frozen_model):
    m = frozen_model
    assert m.frozen_encoder and m.map_side == 4  # 64 px / 8 (stride) / 2 (pool)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = m.image_features(images)
    assert feats.shape == (3, 1 + 16, 32)
    cls = torch.tensor([0, 1, 2])
    torch.testing.assert_close(m.condition(images, cls, features=feats), m.condition(images, cls))
    # the pooled map tokens are the mean of 2 x 2 cells of the unpooled map, row-major
    full = m.encoder.backbone_tokens(images)[:, 1:].reshape(3, 8, 8, 32)
    torch.testing.assert_close(feats[:, 1 + 4 * 1 + 2], full[:, 2:4, 4:6].mean((1, 2)))
    # the frozen backbone is not a trainable parameter; the projection and positions are
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.backbone") for n in trainable)
    assert {"position_proj.weight", "value_proj.weight", "feature_norm.weight"} <= trainable


def test_fourier_model_samples_the_same_with_and_without_the_cache(frozen_model):
    prefix = frozen_model.condition(torch.rand(1, 3, 64, 64), torch.tensor([1]))
    t1, lp1 = frozen_model.sample(prefix, 8, generator=torch.Generator().manual_seed(3))
    t2, lp2 = frozen_model.sample(prefix, 8, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2)
    torch.testing.assert_close(lp1, frozen_model.box_logprob(prefix.expand(8, -1, -1), t1), rtol=1e-5, atol=1e-5)


def test_default_options_keep_the_encoder_forward_of_models_saved_before(model):
    """token_pool 1, no feature norm, no Fourier features: the prefix's image part is the encoder's
    own forward plus the position embedding, as before these options existed."""
    img = torch.rand(2, 3, 32, 32)
    prefix = model.condition(img, torch.tensor([0, 1]))
    torch.testing.assert_close(prefix[:, :-2], model.encoder(img) + model.image_pos)


def test_feature_cache_holds_plain_and_mirrored_features_of_a_frozen_encoder(frozen_model, model):
    from tasks.location.train import FeatureCache

    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cache = FeatureCache(frozen_model, images, chunk=3)
    q, mirror = torch.tensor([2, 0, 2]), torch.tensor([False, True, True])
    got = cache.get(q, mirror)
    torch.testing.assert_close(got[0], frozen_model.image_features(images[2:3])[0])
    torch.testing.assert_close(got[1:], frozen_model.image_features(images[[0, 2]].flip(-1)))
    assert FeatureCache(model, torch.rand(2, 3, 32, 32)).get(q, mirror) is None  # a trainable encoder: none


def test_mobilenet_feature_blocks_cut_the_backbone():
    from pydantic import ValidationError

    from pics_model.config import ObjectEncoderConfig
    from pics_model.object_encoder import ObjectEncoder

    enc = ObjectEncoder(ObjectEncoderConfig(kind="mobilenetv2", image_size=64, feature_blocks=14), 8,
                        load_weights=False)
    assert enc.backbone_dim == 96 and enc.backbone_tokens(torch.rand(1, 3, 64, 64)).shape == (1, 1 + 16, 96)
    with pytest.raises(ValidationError, match="feature_blocks"):
        ObjectEncoderConfig(kind="small", feature_blocks=7)
